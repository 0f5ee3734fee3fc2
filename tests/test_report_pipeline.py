"""Reports from a real run: ``run_manifest`` on a tiny model writes audits/<id>.json + .html and
index.html next to results.json, and both JSON files validate against the shipped schema."""
from __future__ import annotations

import json

from cdi_ray.pipeline.run import run_manifest
from cdi_ray.spec import parse_manifest
from _pipeline_helpers import write_images


def test_run_manifest_writes_reports_that_validate(ray_session, tiny_pixel_dir, tmp_path):
    from cdi_ray.results_schema import AuditDocument, ResultsFile

    write_images(tmp_path / "p", 12, seed=1)
    write_images(tmp_path / "u", 12, seed=2)
    (tmp_path / "p" / "bad.png").write_bytes(b"<b>not a png</b>")
    out = tmp_path / "out"
    m = parse_manifest({
        "models": {"m": {"uri": str(tiny_pixel_dir), "access": "gray-box", "batch_size": 16}},
        "audits": [{"id": "r1", "model": "m", "published": str(tmp_path / "p"), "unpublished": str(tmp_path / "u"),
                    "overrides": {"dl": {"n_draws": 2}}, "test": {"min_samples": 5}},
                   {"id": "r2", "model": "m", "published": str(tmp_path / "missing"),
                    "unpublished": str(tmp_path / "u")}],
        "output": str(out),
    })
    b = run_manifest(m)
    assert [a["status"] for a in b.audits] == ["done", "failed"]
    results = ResultsFile.model_validate_json((out / "results.json").read_text())
    assert results.audits[0].audit_id == "r1"
    doc = json.loads((out / "audits" / "r1.json").read_text())
    AuditDocument.model_validate(doc)
    assert doc["audit"] == json.loads((out / "results.json").read_text())["audits"][0]
    rep, prov = doc["report"], doc["provenance"]
    assert rep["collections"]["published"]["n"] == 12 and rep["features"] and prov["feature_config"]
    assert sum(rep["scores"]["histogram"]["published"]) == 12
    assert prov["model"]["fingerprint"] == b.audits[0]["model_fingerprint"] and prov["manifest_entry"]["id"] == "r1"
    assert prov["software"]["cdi-ray"] and prov["run"]["timings"]["aggregate"] >= 0
    failed = json.loads((out / "audits" / "r2.json").read_text())
    AuditDocument.model_validate(failed)
    assert failed["report"] is None
    for name in ("audits/r1.html", "audits/r2.html", "index.html"):
        assert (out / name).stat().st_size > 1000, name
    page = (out / "audits" / "r1.html").read_text()
    assert 'id="plot-scores"' in page and rep["collections"]["published"]["fingerprint"] in page
    assert 'href="audits/r2.html"' in (out / "index.html").read_text()

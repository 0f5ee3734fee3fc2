"""Reports: the aggregator's report payload, per-audit JSON + HTML, the index, the schema, `cdi-ray report`.

No Ray: the batch folder is built by the same functions the pipeline calls (the aggregator's
``_run_one`` on synthetic feature matrices, ``build_entries``, ``audit_document``, ``provenance``,
``write_reports``), so what is rendered has the shape a real run writes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cdi_ray.pipeline.aggregator import AuditAggregator, AuditJob, ImageRef
from cdi_ray.pipeline.payload import collection_fingerprint
from cdi_ray.pipeline.results import (BatchResult, audit_document, build_entries, diff_results, software_versions,
                                      summarize, write_reports, write_results)
from cdi_ray.report import fmt_p, render_audit_html, render_index_html
from cdi_ray.spec import parse_manifest

HOSTILE = '<script>alert("x")</script>&'
COLUMNS = [f"feat_{j}" for j in range(6)]


def _manifest(out: Path):
    common = {"test": {"min_samples": 20, "alpha": 0.01}}
    return parse_manifest({
        "models": {"m1": {"uri": str(out / "model"), "access": "gray-box"}},
        "audits": [
            {"id": "strong", "model": "m1", "published": str(out / "p"), "unpublished": str(out / "u"), **common},
            {"id": "null", "model": "m1", "published": str(out / "p2"), "unpublished": str(out / "u"), "seed": 1, **common},
            {"id": "broken", "model": "m1", "published": str(out / "missing"), "unpublished": str(out / "u"), **common},
        ],
        "output": str(out),
    })


def build_results_folder(out: Path, *, n: int = 80, seed: int = 0) -> dict:
    """A results folder as ``run_manifest`` writes it, for 3 audits: one with a planted membership
    signal (``used``), one null (``not_detected``) and one failed (``inconclusive``), with hostile
    strings in an unusable image's URI and reason. Returns the results JSON."""
    from cdi_ray.controls.descriptors import DESCRIPTOR_NAMES
    from cdi_ray.pipeline.describe import ModelInfo
    from cdi_ray.pipeline.plan import AuditPlan
    from cdi_ray.pipeline.results import provenance

    rng = np.random.default_rng(seed)
    k = len(COLUMNS)
    pub = rng.normal(size=(n, k))
    pub[:, 0] -= 1.0  # membership signal in two features (members have lower losses)
    pub[:, 3] -= 1.0
    pub2, unp = rng.normal(size=(n, k)), rng.normal(size=(n, k))
    matrix = np.vstack([pub, pub2, unp])
    hashes = [f"{i:064x}" for i in range(3 * n)]
    rows = {h: i for i, h in enumerate(hashes)}
    status, errors = ["ok"] * len(hashes), [None] * len(hashes)
    desc = (rows, status, errors, rng.normal(size=(len(hashes), len(DESCRIPTOR_NAMES))))  # no shift in descriptors
    refs = lambda lo, name: tuple(ImageRef(f"{out}/{name}/{i:04d}.png", hashes[lo + i]) for i in range(n))  # noqa: E731
    bad = ImageRef(f"{out}/p/{HOSTILE}.png", None, f"unreadable: {HOSTILE}")
    manifest = _manifest(out)
    agg = AuditAggregator()
    controls = {"model_free": {"alpha": 0.05}}
    outcomes = {
        "strong": agg._run_one(AuditJob("strong", refs(0, "p") + (bad,), refs(2 * n, "u"), "crossfit-permutation",
                                        0.01, 0, {}, controls=controls), rows, status, errors, matrix, desc,
                               columns=COLUMNS),
        "null": agg._run_one(AuditJob("null", refs(n, "p2"), refs(2 * n, "u"), "crossfit-permutation", 0.01, 1, {},
                                      controls=controls), rows, status, errors, matrix, desc, columns=COLUMNS),
    }
    cfg = {"features": ["dl", "pia"], "seed": 0}
    info = ModelInfo("f" * 64, 16, 1, "pixel-ddpm")
    rows_in = []
    for a in manifest.audits:
        o = outcomes.get(a.id)
        rows_in.append({
            "audit_id": a.id, "model": a.model, "model_fingerprint": info.fingerprint, "feature_key": "k" * 64,
            "status": o.status if o else "failed", "result": o.result if o else None,
            "error": o.error if o else f"listing failed: {HOSTILE}", "controls": o.controls if o else [],
            "n_published": o.n_published if o else 0, "n_unpublished": o.n_unpublished if o else 0,
            "unusable": o.unusable if o else [], "alpha": a.test.alpha, "seed": a.seed,
            "procedure": a.test.procedure, "min_samples": a.test.min_samples,
        })
    entries, fdr = build_entries(rows_in, fdr_method=manifest.fdr.method, q=manifest.fdr.q)
    run = {"run_id": "0" * 32, "output": str(out), "feature_store": str(out / "features"),
           "manifest_hash": manifest.content_hash(), "started_at": "2026-11-28T00:00:00+00:00",
           "finished_at": "2026-11-28T00:01:00+00:00", "seconds": 60.0, "timings": {"aggregate": 1.0},
           "images": {"listed": 3 * n}, "max_permutations": 9999}
    batch = BatchResult(output=str(out), audits=entries, summary=summarize(entries), fdr=fdr, run=run)
    write_results(batch)
    software = software_versions()
    docs = [audit_document(e, fdr=fdr, report=outcomes[a.id].report if a.id in outcomes else None,
                           provenance=provenance(manifest, a, e, AuditPlan(a.id, a.model, feature_config=cfg), info,
                                                 run, software))
            for a, e in zip(manifest.audits, entries)]
    write_reports(str(out), batch.to_dict(), docs)
    return batch.to_dict()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, build_results_folder(out)


# ---------------------------------------------------------------------------------------------- payload
def test_payload_is_bounded_and_describes_the_test(folder):
    out, res = folder
    doc = json.loads((out / "audits" / "strong.json").read_text())
    assert doc["schema"] == "cdi-ray/audit/v1" and doc["audit"] == res["audits"][0]
    rep = doc["report"]
    hist = rep["scores"]["histogram"]
    assert len(hist["edges"]) == 31 and sum(hist["published"]) == 80 and sum(hist["unpublished"]) == 80
    # the planted features separate most, and their AUCs point the planted way
    feats = {f["feature"]: f for f in rep["features"]}
    assert feats["feat_0"]["auc"] < 0.4 and feats["feat_3"]["auc"] < 0.4
    assert {rep["features"][0]["feature"], rep["features"][1]["feature"]} == {"feat_0", "feat_3"}
    assert sum(f["share"] for f in rep["features"]) == pytest.approx(1.0)
    # p vs n: nested subsets up to all images, ≤ 20 points, evidence grows with n
    pts = rep["pvalue_curve"]["points"]
    assert 2 <= len(pts) <= 20 and pts[-1]["n_published"] == 80 and pts[0]["n_published"] == 10
    assert pts[-1]["pvalue"] < pts[0]["pvalue"]
    assert rep["test"]["pvalue"] == doc["audit"]["p_value"]
    # collection fingerprints: over the sorted content hashes of the images used
    assert rep["collections"]["published"]["fingerprint"] == collection_fingerprint([f"{i:064x}" for i in range(80)])
    assert collection_fingerprint(["b", "a", "a"]) == collection_fingerprint(["a", "b"])
    prov = doc["provenance"]
    assert prov["manifest_entry"]["id"] == "strong" and prov["seed"] == 0 and prov["software"]["numpy"]
    assert prov["feature_config"] and prov["model"]["fingerprint"] == "f" * 64
    assert len(json.dumps(doc)) < 60_000


def test_verdicts_of_the_fixture(folder):
    _, res = folder
    assert [a["verdict"] for a in res["audits"]] == ["used", "not_detected", "inconclusive"]


# ---------------------------------------------------------------------------------------------- HTML
def test_audit_page_verdict_first_numbers_plots_provenance(folder):
    out, res = folder
    page = (out / "audits" / "strong.html").read_text()
    a = res["audits"][0]
    order = [page.index(s) for s in ('id="verdict"', 'id="p-raw"', 'id="plot-scores"', 'id="plot-pcurve"',
                                     'id="plot-weights"', 'id="plot-auc"', "Provenance")]
    assert order == sorted(order)
    assert "Evidence that model “m1” was trained on the published collection of audit “strong”: <strong>strong</strong>" in page
    assert fmt_p(a["p_value"]) in page and fmt_p(a["p_adjusted"]) in page
    assert 'class="alpha-line"' in page and "f" * 64 in page
    # self-contained: nothing fetched
    assert not re.search(r'<(script|link|img)[^>]+(src|href)=', page)


def test_every_string_is_escaped(folder):
    out, _ = folder
    for name in ("audits/strong.html", "audits/broken.html", "index.html"):
        page = (out / name).read_text()
        assert HOSTILE not in page and "<script>alert" not in page, name
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in (out / "audits" / "strong.html").read_text()


def test_failed_audit_renders_with_its_reason(folder):
    out, _ = folder
    page = (out / "audits" / "broken.html").read_text()
    assert "<strong>inconclusive</strong>, because the audit could not be run" in page
    assert 'id="failure"' in page and "listing failed: &lt;script&gt;" in page and 'id="no-plots"' in page


def test_missing_optional_fields_render():
    minimal = {"audit": {"audit_id": "x", "model": "m", "verdict": "not_detected", "status": "done"}}
    page = render_audit_html(minimal)
    assert "<strong>none</strong>" in page and 'id="no-plots"' in page
    assert "<svg" not in page
    page = render_audit_html({"audit": {"audit_id": "x", "verdict": "used", "status": "done"},
                              "report": {"scores": {}, "features": [], "pvalue_curve": {"points": [], "skipped": "why"}}})
    assert page.count("<svg") == 4 and ">why<" in page
    assert "<tbody></tbody>" in render_index_html({"audits": []})


def test_index_links_every_audit_and_shows_the_diff(folder):
    out, res = folder
    page = (out / "index.html").read_text()
    for a in res["audits"]:
        assert f'href="audits/{a["audit_id"]}.html"' in page
    assert page.count("<tr data-audit=") == 3 and 'class="sortable"' in page
    prev = json.loads(json.dumps(res))
    prev["audits"][0]["verdict"] = "not_detected"
    diff = diff_results(prev, res)
    page = render_index_html(res, diff=diff)
    assert 'id="diff"' in page and 'id="new-used"' in page and "New “used” verdicts (1)" in page


# ---------------------------------------------------------------------------------------------- schema
def test_shipped_schema_is_generated_and_validates_results(folder):
    from cdi_ray.results_schema import SCHEMA_PATH, AuditDocument, ResultsFile, schema_json

    assert Path(SCHEMA_PATH).read_text() == schema_json(), "regenerate: python -m cdi_ray.results_schema"
    out, res = folder
    ResultsFile.model_validate_json((out / "results.json").read_text())
    for name in ("strong", "null", "broken"):
        AuditDocument.model_validate_json((out / "audits" / f"{name}.json").read_text())
    try:  # the shipped file itself, by an independent validator (jsonschema comes with moto[server])
        import jsonschema
    except ImportError:
        return
    schema = json.loads(Path(SCHEMA_PATH).read_text())
    jsonschema.validate(json.loads((out / "results.json").read_text()), schema)
    audit_schema = {**schema, "$ref": "#/$defs/AuditDocument"}
    for name in ("strong", "broken"):
        jsonschema.validate(json.loads((out / "audits" / f"{name}.json").read_text()), audit_schema)
    bad = json.loads((out / "results.json").read_text())
    bad["audits"][0]["verdict"] = "guilty"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_report_rerenders_and_rejects_empty(folder, tmp_path, capsys):
    from cdi_ray.cli import main

    out, _ = folder
    dest = tmp_path / "html"
    assert main(["report", str(out), "--out", str(dest)]) == 0
    assert (dest / "index.html").exists() and (dest / "audits" / "strong.html").exists()
    assert (dest / "audits" / "strong.html").read_text() == (out / "audits" / "strong.html").read_text()
    assert main(["report", str(out / "results.json"), "--out", str(tmp_path / "h2")]) == 0
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "no results" in capsys.readouterr().err

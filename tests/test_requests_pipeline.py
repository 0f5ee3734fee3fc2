"""Bulk requests end to end on the session's Ray, with tiny models.

One batch (module fixture) holds four requests and two bad rows; the tests read what it wrote:
rejections never stop the others, each owner's folder holds only their own things, ``verify``
recomputes every request exactly and names what a tampered folder changed, an owner's results
are identical when their request runs alone, and a re-run recomputes only what failed or is new
(counted in features and audits).
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from cdi_ray.cli import main as cli_main
from cdi_ray.models.testing import make_tiny_pixel_ddpm
from cdi_ray.requests import run_requests, verify_request
from cdi_ray.requests.deliverable import REGISTRY_FILE, REQUEST_FILE
from _pipeline_helpers import write_images

N = 6  # images per collection: tiny, but enough for 5 cross-fitting folds
OWNERS = {  # request id → (owner, models); distinctive strings, so a leak would be found by a plain search
    "request-alpha-1c2d": ("Owner Alpha Ltd", ""),
    "request-bravo-7f3a": ("Owner Bravo Ltd", "m-one"),
    "request-charlie-9e8b": ("Owner Charlie Ltd", "m-one m-two"),
    "request-delta-4a5b": ("Owner Delta Ltd", ""),  # too few images: fails in the test, is fixed later
}
DEFAULTS = {"features": ["dl", "pia"], "overrides": {"dl": {"n_draws": 1}}, "test": {"min_samples": 5}}


def _row(rid, owner, models, root):
    slug = rid.split("-")[1]
    return {"request_id": rid, "owner": owner, "contact": f"{slug}@example.org",
            "published": str(root / f"{slug}-collection" / "published"),
            "unpublished": str(root / f"{slug}-collection" / "unpublished"), "models": models}


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["request_id", "owner", "contact", "published", "unpublished", "models"])
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def batch(ray_session, tiny_pixel_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bulk")
    other = make_tiny_pixel_ddpm(root / "model-two", image_size=16, channels=1, seed=1)
    (root / "registry.yaml").write_text(yaml.safe_dump({
        "models": {"m-one": {"uri": str(tiny_pixel_dir), "access": "gray-box", "batch_size": 16},
                   "m-two": {"uri": str(other), "access": "gray-box", "batch_size": 16}},
        "defaults": DEFAULTS}))
    for i, rid in enumerate(OWNERS):
        slug = rid.split("-")[1]
        n = 2 if slug == "delta" else N
        write_images(root / f"{slug}-collection" / "published", n, seed=10 + i)
        write_images(root / f"{slug}-collection" / "unpublished", n, seed=20 + i)
    rows = [_row(rid, owner, models, root) for rid, (owner, models) in OWNERS.items()]
    rows += [{**rows[0], "request_id": "request-echo-0000", "models": "m-three"},  # unknown model
             {**rows[1], "request_id": "request-alpha-1c2d"}]  # duplicate id
    _write_csv(root / "requests.csv", rows)
    out = root / "out"
    res = run_requests(str(root / "requests.csv"), str(root / "registry.yaml"), str(out))
    return {"root": root, "out": out, "res": res, "rows": rows, "store": out / "features"}


def _folder(batch, rid) -> Path:
    return batch["out"] / "requests" / rid


def _ledger(out) -> dict:
    return {r["request_id"]: r for r in pq.read_table(out / "requests.parquet").to_pylist()}


def test_rejected_rows_are_named_and_never_stop_the_others(batch):
    s = batch["res"].summary
    assert batch["res"].exit_code == 3 and s["states"] == {"done": 3, "failed": 1, "rejected": 2}
    rejected = list(csv.DictReader(open(batch["out"] / "rejected.csv")))
    assert [(r["row"], r["request_id"], r["reason"]) for r in rejected] == [
        ("5", "request-echo-0000", "unknown_model"), ("6", "request-alpha-1c2d", "duplicate_id")]
    ledger = _ledger(batch["out"])
    assert {k: v["state"] for k, v in ledger.items()} == {
        "request-alpha-1c2d": "done", "request-bravo-7f3a": "done", "request-charlie-9e8b": "done",
        "request-delta-4a5b": "failed", "request-echo-0000": "rejected"}
    delta = ledger["request-delta-4a5b"]
    assert "too small" in delta["reason"] and delta["verdict"] == "inconclusive"
    assert ledger["request-echo-0000"]["rejection"] == "unknown_model"
    alpha = ledger["request-alpha-1c2d"]
    assert [x["model"] for x in alpha["results"]] == ["m-one", "m-two"]  # no models given: every registry model
    assert all(x["p_value"] is not None and x["p_batch_bh"] is not None for x in alpha["results"])
    assert (batch["out"] / "index.html").exists()


def test_every_done_request_verifies_exactly_from_its_own_folder(batch):
    for rid in ("request-alpha-1c2d", "request-bravo-7f3a", "request-charlie-9e8b", "request-delta-4a5b"):
        v = verify_request(str(_folder(batch, rid)))
        assert v.matches, [str(d) for d in v.differences]
        assert v.audits_checked == len(_ledger(batch["out"])[rid]["models"])
    v = verify_request(str(_folder(batch, "request-charlie-9e8b")), feature_store=str(batch["store"]),
                       check_images=True)
    assert v.matches and v.images_checked == 2 * N  # against the batch's store, and the image bytes too


def test_verify_names_what_a_tampered_folder_changed(batch, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(_folder(batch, "request-charlie-9e8b"), folder)
    results = json.loads((folder / "results.json").read_text())
    results["audits"][1]["verdict"] = "used"
    (folder / "results.json").write_text(json.dumps(results))
    # the published images' stored features of m-one, shifted: P now separates from U
    evidence = json.loads((folder / "evidence.json").read_text())
    a = evidence["audits"][0]
    part = next((folder / "features" / f"model={a['model_fingerprint']}" / f"cfg={a['feature_key']}").glob("*.parquet"))
    table = pq.read_table(part)
    published = pa.array([r["store_key"] or r["content_hash"] for r in pq.read_table(folder / "evidence-images.parquet").to_pylist()
                          if r["set"] == "published" and r["audit_id"] == a["audit_id"]])
    shift = pc.if_else(pc.is_in(table.column("content_hash"), value_set=published), 100.0, 0.0)
    for col in a["test"]["columns"]:
        table = table.set_column(table.schema.get_field_index(col), col, pc.add(table.column(col), shift))
    pq.write_table(table, part)
    v = verify_request(str(folder))
    named = {(d.where, d.field) for d in v.differences}
    assert (a["audit_id"], "p_value") in named  # the recomputed test sees the change
    assert (results["audits"][1]["audit_id"], "verdict") in named  # the edited verdict is caught too
    assert all(d.where != "evidence-images.parquet" for d in v.differences)
    # the command line: 3 and the differences when something differs, 0 when identical, 2 for no deliverable
    assert cli_main(["verify", str(folder)]) == 3 and "p_value" in capsys.readouterr().out
    assert cli_main(["verify", str(_folder(batch, "request-bravo-7f3a"))]) == 0
    assert "identical" in capsys.readouterr().out
    assert cli_main(["verify", str(tmp_path)]) == 2


def test_nothing_of_another_owner_is_in_an_owners_folder(batch):
    mine = "request-bravo-7f3a"
    others = [r for r in batch["rows"][:4] if r["request_id"] != mine]
    needles = [s for r in others for s in (r["request_id"], r["owner"], r["contact"], r["published"], r["unpublished"])]
    other_hashes = set()
    for r in pq.read_table(_folder(batch, "request-alpha-1c2d") / "evidence-images.parquet").to_pylist():
        other_hashes |= {h for h in (r["content_hash"], r["store_key"]) if h}
    folder = _folder(batch, mine)
    own = next(r for r in batch["rows"] if r["request_id"] == mine)
    assert own["owner"] in (folder / "results.json").read_text() and own["published"] in (folder / "evidence.json").read_text()
    for f in folder.rglob("*"):
        if f.suffix in (".json", ".html", ".yaml", ".jsonl"):
            text = f.read_text()
            assert not [n for n in needles if n in text], f
            assert not [h for h in other_hashes if h in text], f
        elif f.suffix == ".parquet":
            strings = {v for col in pq.read_table(f).columns if pa.types.is_string(col.type)
                       for v in col.to_pylist() if v}
            assert not strings & (set(needles) | other_hashes), f
    assert (folder / "features").is_dir() and (folder / "index.html").exists()
    assert len(list((folder / "audits").glob("*.html"))) == 1  # bravo asked for m-one only


def test_an_owners_results_are_the_same_alone_as_in_the_batch(batch, tmp_path):
    """Run the owner's own request (the folder's reproduce files) as a batch of one."""
    rid = "request-charlie-9e8b"
    folder = _folder(batch, rid)
    alone = run_requests(str(folder / REQUEST_FILE), str(folder / REGISTRY_FILE), str(tmp_path / "alone"),
                         feature_store=str(batch["store"]))
    assert alone.exit_code == 0 and alone.summary["features"]["computed"] == 0
    keep = ("audit_id", "p_value", "p_adjusted", "verdict", "verdict_reason", "n_published", "n_unpublished",
            "controls", "statistic")
    in_batch = json.loads((folder / "results.json").read_text())["audits"]
    by_itself = json.loads((tmp_path / "alone" / "requests" / rid / "results.json").read_text())["audits"]
    assert [{k: a[k] for k in keep} for a in by_itself] == [{k: a[k] for k in keep} for a in in_batch]
    assert len(in_batch) == 2 and all(a["p_adjusted"] >= a["p_value"] for a in in_batch)


def test_the_reference_models_run_is_evidence_and_verifies(batch, tmp_path):
    """A registry with a reference model: every audit's test is re-run on it (the reference-model
    control), that run's images and feature rows are in the owner's evidence, and verify re-runs both."""
    from cdi_ray.requests.evidence import REFERENCE

    registry = yaml.safe_load((batch["root"] / "registry.yaml").read_text())
    registry["defaults"] = {**registry["defaults"], "controls": {"reference_model": "m-two"}}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(registry))
    _write_csv(tmp_path / "requests.csv", [{**batch["rows"][0], "models": ""}])  # alpha: every audited model
    res = run_requests(str(tmp_path / "requests.csv"), str(tmp_path / "registry.yaml"), str(tmp_path / "out"),
                       feature_store=str(batch["store"]))
    assert res.exit_code == 0 and res.summary["features"]["computed"] == 0  # both models' rows are stored already
    folder = tmp_path / "out" / "requests" / "request-alpha-1c2d"
    (entry,) = json.loads((folder / "results.json").read_text())["audits"]
    assert entry["model"] == "m-one"
    control = next(c for c in entry["controls"] if c["name"] == "reference-model")
    assert control["pvalue"] is not None
    (audit,) = json.loads((folder / "evidence.json").read_text())["audits"]
    assert audit["reference"]["fingerprint"] != audit["test"]["fingerprint"]
    images = pq.read_table(folder / "evidence-images.parquet").to_pylist()
    assert sum(r["role"] == REFERENCE for r in images) == 2 * N
    assert (folder / "features" / f"model={audit['reference']['fingerprint']}").is_dir()
    v = verify_request(str(folder))
    assert v.matches and v.audits_checked == 1, [str(d) for d in v.differences]


def test_a_rerun_recomputes_only_what_failed_or_is_new(batch):
    root, out = batch["root"], batch["out"]
    write_images(root / "delta-collection" / "published", N - 2, seed=13, start=2)  # delta fixed: 2 → N each
    write_images(root / "delta-collection" / "unpublished", N - 2, seed=23, start=2)
    write_images(root / "foxtrot-collection" / "published", N, seed=40)
    write_images(root / "foxtrot-collection" / "unpublished", N, seed=41)
    rows = batch["rows"] + [_row("request-foxtrot-2b2b", "Owner Foxtrot Ltd", "m-two", root)]
    _write_csv(root / "requests-2.csv", rows)
    before = {rid: (_folder(batch, rid) / "results.json").stat().st_mtime_ns for rid in
              ("request-alpha-1c2d", "request-bravo-7f3a", "request-charlie-9e8b")}
    res = run_requests(str(root / "requests-2.csv"), str(root / "registry.yaml"), str(out))
    s = res.summary
    assert s["carried_over"] == 3 and s["run"] == 2 and s["audits_run"] == 2 + 1
    # delta's new images under both models, foxtrot's under m-two: nothing else is computed again
    assert s["features"]["computed"] == (2 * (N - 2)) * 2 + (2 * N) * 1
    assert s["states"] == {"done": 5, "failed": 0, "rejected": 2}
    assert {rid: (_folder(batch, rid) / "results.json").stat().st_mtime_ns for rid in before} == before
    ledger = _ledger(out)
    assert ledger["request-delta-4a5b"]["state"] == "done" and ledger["request-foxtrot-2b2b"]["state"] == "done"
    assert verify_request(str(_folder(batch, "request-delta-4a5b"))).matches

"""The Ray pipeline end to end on tiny models: de-duplication, store reuse, atomicity, failures, S3, nightly.

One local Ray for the module (8 logical CPUs on the 2-core CI box: a read → decode → actor →
write stream needs more than 2 slots). Counts come from the feature actors' own output rows
(``run.features.computed`` = rows the actors computed), never from mocks.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cdi_ray import storage
from cdi_ray.models.testing import make_tiny_pixel_ddpm
from cdi_ray.pipeline.actors import SUMMARY_SCHEMA, FeatureActor
from cdi_ray.pipeline.aggregator import AuditJob, ImageRef, gather
from cdi_ray.pipeline.nightly import run_nightly
from cdi_ray.pipeline.results import diff_markdown, diff_results
from cdi_ray.pipeline.run import run_manifest
from cdi_ray.pipeline.store import FeatureStore
from cdi_ray.spec import parse_manifest
from _pipeline_helpers import write_images

# Small per-feature settings keep the tiny models fast; the full gray-box column set is kept.
FAST = {"dl": {"n_draws": 2}}
TEST = {"min_samples": 5}


@pytest.fixture(scope="module")
def models(tiny_pixel_dir, tmp_path_factory):
    other = make_tiny_pixel_ddpm(tmp_path_factory.mktemp("models2") / "pixel-b", image_size=16, channels=1, seed=1)
    return {"m1": str(tiny_pixel_dir), "m2": str(other)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """U (10), P1 (10 + a duplicate + an undecodable file + a copy of a U image), P2 (8 + a copy of a P1 image)."""
    root = tmp_path_factory.mktemp("data")
    write_images(root / "u", 10, seed=1)
    write_images(root / "p1", 10, seed=2)
    write_images(root / "p2", 8, seed=3)
    shutil.copy(root / "p1" / "0000.png", root / "p1" / "dup.png")
    shutil.copy(root / "u" / "0000.png", root / "p1" / "shared.png")
    shutil.copy(root / "p1" / "0001.png", root / "p2" / "also.png")
    (root / "p1" / "bad.png").write_bytes(b"definitely not a png")
    p2 = sorted(str(p) for p in (root / "p2").iterdir())
    (root / "p2.txt").write_text("\n".join(os.path.relpath(p, root) for p in p2) + "\n")
    return root


def manifest_dict(models, data, out):
    common = {"overrides": FAST, "test": TEST}
    return {
        "models": {
            # m1 in an actor pool, m2 (small, on CPU) in warm tasks: both ways are exactly-once
            "m1": {"uri": models["m1"], "access": "gray-box", "batch_size": 8, "max_replicas": 2, "pool": "actors"},
            "m2": {"uri": models["m2"], "access": "gray-box", "batch_size": 16},
            "m3": {"uri": str(data / "u"), "access": "gray-box"},  # a folder of images, not a model
        },
        "audits": [
            {"id": "a1", "model": "m1", "published": str(data / "p1"), "unpublished": str(data / "u"), **common},
            {"id": "a2", "model": "m2", "published": str(data / "p1"), "unpublished": str(data / "u"), **common},
            {"id": "a3", "model": "m1", "published": {"list_file": str(data / "p2.txt")}, "unpublished": str(data / "u"), **common},
            {"id": "a4", "model": "m1", "published": str(data / "missing"), "unpublished": str(data / "u"), **common},
            {"id": "a5", "model": "m1", "published": sorted(str(p) for p in (data / "p2").iterdir()),
             "unpublished": str(data / "u"), "seed": 1, **common},
            {"id": "a6", "model": "m3", "published": str(data / "p1"), "unpublished": str(data / "u"), **common},
        ],
        "output": str(out),
    }


def comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "run"}


# ---------------------------------------------------------------------------------------------- end to end
def test_batch_dedup_reuse_and_crash_safety(ray_session, models, data, tmp_path):
    out = tmp_path / "out"
    m = parse_manifest(manifest_dict(models, data, out))

    # 1. first run: every (image content, model, config) computed exactly once
    b = run_manifest(m)
    by_id = {a["audit_id"]: a for a in b.audits}
    assert [a["status"] for a in b.audits] == ["done", "done", "done", "failed", "done", "failed"]
    assert b.exit_code == 3
    assert "missing" in by_id["a4"]["error"] and by_id["a4"]["verdict"] == "inconclusive"
    assert "model 'm3'" in by_id["a6"]["error"] and "cannot be used" in by_id["a6"]["error"]
    feats = b.run["features"]
    # m1 seed 0 (a1, a3): U 10 + P1 10 + P2 8 distinct decodable contents (+1 undecodable);
    # m1 seed 1 (a5): P2 9 + U 10; m2 (a2): U 10 + P1 10 (+1 undecodable)
    assert b.run["features"]["per_model"]["m1"]["computed"] == 28 + 19
    assert b.run["features"]["per_model"]["m2"]["computed"] == 20
    assert feats["computed"] == 67 and feats["decode_errors"] == 2 and feats["to_compute"] == 69
    # m1: the model is loaded once per actor, never more actors than the pool's max; m2: warm task workers
    assert 1 <= len(feats["per_model"]["m1"]["actors"]) <= 2
    assert feats["per_model"]["m2"]["actors"] and all(a.startswith("task-") for a in feats["per_model"]["m2"]["actors"])
    # model-free descriptors (controls on by default): m1 and m2 share a geometry, so each of the 29
    # distinct contents (bad.png as an error row) is described once, in the decode stage of m1's stream
    assert b.run["descriptors"]["needed"] == 29 and b.run["descriptors"]["in_feature_streams"] == 29
    assert b.run["descriptors"]["separate"]["rows"] == 0
    assert all(a["controls"][0]["name"] == "model-free" for a in b.audits if a["status"] == "done")

    a1 = by_id["a1"]
    assert (a1["n_published"], a1["n_unpublished"]) == (10, 9)
    reasons = {(u["set"], os.path.basename(u["uri"])): u["reason"] for u in a1["unusable_images"]}
    assert set(reasons) == {("published", "dup.png"), ("published", "bad.png"), ("published", "shared.png"), ("unpublished", "0000.png")}
    assert reasons[("published", "dup.png")].startswith("duplicate_content")
    assert reasons[("published", "shared.png")].startswith("in_both_sets")
    assert "not a recognised image format" in reasons[("published", "bad.png")]
    assert (by_id["a3"]["n_published"], by_id["a3"]["n_unpublished"]) == (9, 10)

    # FDR across the batch: BH over the done audits' p-values
    from cdi_ray.stats import benjamini_hochberg

    done = [a for a in b.audits if a["status"] == "done"]
    bh = benjamini_hochberg([a["p_value"] for a in done], 0.05)
    assert [a["p_adjusted"] for a in done] == pytest.approx(list(bh.adjusted))
    assert by_id["a4"]["p_adjusted"] is None

    # files
    res = json.loads((out / "results.json").read_text())
    assert res["summary"] == {"audits": 6, "done": 4, "failed": 2, "used": res["summary"]["used"],
                              "not_detected": res["summary"]["not_detected"], "inconclusive": res["summary"]["inconclusive"]}
    table = pq.read_table(out / "results.parquet")
    assert table.column("audit_id").to_pylist() == ["a1", "a2", "a3", "a4", "a5", "a6"]
    for col in ("status", "verdict", "p_value", "p_adjusted", "n_published", "n_unpublished", "error"):
        assert col in table.column_names
    images = pq.read_table(out / "images.parquet")
    assert images.num_rows == sum(a["n_unusable"] for a in b.audits)

    # 2. re-run: nothing computed, nothing re-read, identical results
    b2 = run_manifest(m)
    assert b2.run["features"]["computed"] == 0 and b2.run["features"]["to_compute"] == 0
    assert b2.run["images"]["hashed"] == 0 and b2.run["images"]["hash_index_hits"] == b.run["images"]["listed"]
    assert b2.run["descriptors"]["stored_before"] == 29 and b2.run["descriptors"]["separate"]["rows"] == 0
    res2 = json.loads((out / "results.json").read_text())
    assert comparable(res2) == comparable(res)
    assert pq.read_table(out / "results.parquet").equals(table)

    # 3. a crash mid-write: a truncated part file and a stray temp file are never trusted —
    #    the rows they held are computed again, and the results do not change
    store = FeatureStore(str(out / "features"))
    fp, key = by_id["a2"]["model_fingerprint"], by_id["a2"]["feature_key"]
    part = store.part_files(fp, key)[0]
    lost = pq.read_table(part).num_rows
    raw = open(part, "rb").read()
    with open(part, "wb") as f:
        f.write(raw[: len(raw) // 2])
    open(os.path.join(os.path.dirname(part), ".tmp-deadbeef-part-x.parquet"), "wb").write(raw[:100])
    b3 = run_manifest(m)
    assert b3.run["features"]["computed"] + b3.run["features"]["decode_errors"] == lost
    assert comparable(json.loads((out / "results.json").read_text())) == comparable(res)


def test_plan_only_says_what_a_run_would_compute_and_computes_nothing(ray_session, models, data, tmp_path, capsys):
    from cdi_ray.cli import EXIT_PARTIAL, main

    out = tmp_path / "out"
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest_dict(models, data, out)))
    assert main(["plan", str(path)]) == EXIT_PARTIAL  # a4 (unlisted source) and a6 (not a model) cannot run
    text = capsys.readouterr().out
    assert "a4: cannot list sources" in text and "a6: model 'm3'" in text and "69 to compute" in text
    plan = json.loads((out / "plan" / "plan.json").read_text())
    assert plan["to_compute"] == 69 and sorted(plan["models"]) == ["m1", "m2"]
    assert not list((out / "features").glob("model=*"))  # nothing computed, nothing stored
    # the plan was right: the run computes (or finds undecodable) exactly those rows, and then nothing is left
    b = run_manifest(parse_manifest(manifest_dict(models, data, out)))
    assert b.run["features"]["computed"] + b.run["features"]["decode_errors"] == 69 and b.run["images"]["hashed"] == 0
    assert main(["plan", str(path)]) == EXIT_PARTIAL and "0 to compute" in capsys.readouterr().out


def test_nightly_computes_only_new_images_and_diffs(ray_session, models, data, tmp_path):
    root = tmp_path / "nightly"
    p = tmp_path / "p"
    shutil.copytree(data / "p1", p)
    (p / "bad.png").unlink()
    man = {
        "models": {"m1": {"uri": models["m1"], "access": "gray-box", "batch_size": 16}},
        "audits": [{"id": "n1", "model": "m1", "published": str(p), "unpublished": str(data / "u"), "overrides": FAST, "test": TEST}],
        "output": str(root),
    }
    first = run_nightly(parse_manifest(man), date="2026-11-27")
    assert first["previous"] is None and first["run"]["features"]["computed"] == 20  # P ∪ U, one image in both
    # overnight: two new published images, and a second audit on a new model over the same images
    write_images(p, 2, seed=9, start=100)
    man["models"]["m2"] = {"uri": models["m2"], "access": "gray-box", "batch_size": 16}
    man["audits"].append({**man["audits"][0], "id": "n2", "model": "m2"})
    second = run_nightly(parse_manifest(man), date="2026-11-28")
    assert second["previous"] == str(root / "2026-11-27")
    # m1: only the 2 new images; m2 (new model): all 22 images of n2
    assert second["run"]["features"]["per_model"]["m1"]["computed"] == 2
    assert second["run"]["features"]["per_model"]["m2"]["computed"] == 22
    assert second["diff"]["new_audits"] == ["n2"]
    assert any(c["audit_id"] == "n1" and c["n_published"] == {"before": 10, "after": 12} for c in second["diff"]["changed"])
    for name in ("results.json", "results.parquet", "images.parquet", "diff.json", "diff.md"):
        assert (root / "2026-11-28" / name).exists(), name
    index = (root / "2026-11-28" / "index.html").read_text()
    assert "n2" in index and "diff" in index.lower()  # the index carries the night's diff view
    assert sorted(os.listdir(root)) == ["2026-11-27", "2026-11-28", "features"]


def test_s3_round_trip(ray_session, models, tmp_path):
    """Model, images, feature store and results all on (moto) S3."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="cdi")
    for root, _, files in os.walk(models["m1"]):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), models["m1"])
            storage.atomic_write_bytes(f"s3://cdi/models/m1/{rel}", open(os.path.join(root, f), "rb").read())
    for name, seed in (("p", 4), ("u", 5)):
        for path in write_images(tmp_path / name, 6, seed=seed):
            storage.atomic_write_bytes(f"s3://cdi/owners/{name}/{os.path.basename(path)}", open(path, "rb").read())
    man = parse_manifest({
        "models": {"m": {"uri": "s3://cdi/models/m1", "access": "gray-box"}},
        "audits": [{"id": "s", "model": "m", "published": "s3://cdi/owners/p/", "unpublished": "s3://cdi/owners/u/",
                    "overrides": FAST, "test": {"procedure": "split", "min_samples": 2}}],
        "output": "s3://cdi/audits/2026-11-28/",
    })
    b = run_manifest(man)
    assert b.exit_code == 0 and b.run["features"]["computed"] == 12
    res = json.loads(storage.read_bytes("s3://cdi/audits/2026-11-28/results.json"))
    assert res["audits"][0]["status"] == "done" and res["audits"][0]["n_published"] == 6
    parts = [e.uri for e in storage.iter_files("s3://cdi/audits/2026-11-28/features/")
             if os.path.basename(e.uri).startswith("part-")]
    assert any("/model=" in u and "/cfg=" in u for u in parts)
    assert run_manifest(man).run["features"]["computed"] == 0


# ---------------------------------------------------------------------------------------------- pieces, no Ray
def _listed(tmp_path, name: str, uris: list[str], size: int = 3) -> str:
    """A listing file of ``uris`` (as stage 1 writes one), each ``size`` bytes at version v1."""
    from cdi_ray.sources import ImageEntry, entries_table

    path = str(tmp_path / "run" / "listings" / f"{name}.parquet")
    storage.write_parquet(path, entries_table([ImageEntry(u, size, "v1") for u in uris]))
    return path


def test_plan_batch_dedups_across_audits_models_and_the_store(tmp_path):
    """Planning alone (no Ray): every (fingerprint, config, image) once, minus what the store holds;
    one decode per image for all its configs; models with the same weights share one stream."""
    from cdi_ray.features.config import FeatureConfig
    from cdi_ray.pipeline.describe import ModelInfo, ModelInfos
    from cdi_ray.pipeline.hashing import HashedImages
    from cdi_ray.pipeline.listing import Listings, SourceListing
    from cdi_ray.pipeline.plan import Role, plan_batch, store_key
    from cdi_ray.pipeline.rows import decode
    from cdi_ray.sources import source_id

    store = FeatureStore(str(tmp_path / "store"))
    hashes = {f"/img/{h}.png": h for h in ("h1", "h2", "h3", "h4", "h5")}
    hashes["/img/h1-copy.png"] = "h1"  # the same bytes under another name
    store.add_hashes(pa.table({"uri": list(hashes), "size": [3] * len(hashes), "version": ["v1"] * len(hashes),
                               "content_hash": list(hashes.values())}))
    sources = {"p1": ["/img/h1.png", "/img/h2.png", "/img/h3.png"], "p2": ["/img/h1-copy.png", "/img/h4.png"],
               "u": ["/img/h5.png", "/img/gone.png"]}
    m = parse_manifest({"models": {"A": {"uri": "/m/a", "access": "gray-box"}, "B": {"uri": "/m/b", "access": "gray-box"},
                                   "A2": {"uri": "/m/a-copy", "access": "gray-box"}},
                        "audits": [{"id": "a1", "model": "A", "published": sources["p1"], "unpublished": sources["u"],
                                    "features": ["dl"]},
                                   {"id": "a2", "model": "A", "published": sources["p2"], "unpublished": sources["u"],
                                    "features": ["pia"]},
                                   {"id": "a3", "model": "B", "published": sources["p2"], "unpublished": sources["u"],
                                    "features": ["dl"]},
                                   {"id": "a4", "model": "A2", "published": sources["p1"], "unpublished": sources["u"],
                                    "features": ["dl"], "controls": {"model_free": False}}],
                        "output": str(tmp_path / "out")})
    ids = {name: source_id(uris) for name, uris in sources.items()}
    listings = Listings({ids[n]: SourceListing(ids[n], (_listed(tmp_path, n, uris),), len(uris)) for n, uris in sources.items()},
                        {a.id: (source_id(a.published), source_id(a.unpublished)) for a in m.audits})
    info = lambda fp: ModelInfo(fp, 16, 1, "pixel-ddpm")  # noqa: E731
    models = ModelInfos({"A": info("fpA"), "B": info("fpB"), "A2": info("fpA")}, {})
    dl, pia = (store_key(FeatureConfig(features=(f,)), m.models["A"]) for f in ("dl", "pia"))
    store.write("fpA", dl, pa.table({"content_hash": ["h3"], "model_fingerprint": ["fpA"], "config_hash": [dl],
                                     "status": ["ok"], "error": pa.array([None], pa.string()), "dl": [0.5]}))
    run = str(tmp_path / "run")
    plan = plan_batch(m, listings, models, HashedImages(7, 6, 0, 1, storage.join(run, "hashing", "results")),
                      store_root=store.root, run_dir=run)

    assert sorted(plan.streams) == ["A", "B"]  # A2 has A's weights: one stream
    work = {name: {r.content_hash: r for r in decode(pq.read_table(s.work).to_pydict())} for name, s in plan.streams.items()}
    # A: h3 stored for dl; h1 decoded once for both configs, at its smallest URI
    assert {h: set(r.configs) for h, r in work["A"].items()} == {"h1": {dl, pia}, "h2": {dl}, "h4": {pia}, "h5": {dl, pia}}
    assert work["A"]["h1"].uri == "/img/h1-copy.png"
    assert set(work["B"]) == {"h1", "h4", "h5"} and plan.streams["B"].rows == 3
    assert plan.to_compute == 6 + 3 and plan.needed == 4 + 3 + 3 + 4  # per (model name, config): A dl, A pia, B, A2
    # the missing image is reported, not planned; model-free descriptors of each content are planned once
    a1 = plan.audits["a1"]
    assert a1.main.role is Role.AUDIT and a1.reference is None and plan.audits["a4"].descriptor_key is None
    resolved = pq.read_table(a1.main.unpublished.images).to_pydict()
    assert resolved["reason"] == [None, "unreadable"]
    # descriptors: 5 contents; the first stream decoding one describes it, h3 (stored) is left to its own stream
    assert [d.needed for d in plan.descriptors.values()] == [5] and plan.streams["A"].described == 4
    assert plan.streams["B"].described == 0
    assert json.loads(open(os.path.join(run, "plan.json")).read())["models"]["A"]["images"] == 4


def test_hash_index_reuse_only_when_size_and_version_match():
    from cdi_ray.pipeline.hashing import with_index

    index = pa.table({"uri": ["/a.png", "/b.png", "/e.png"], "size": [3, 3, 3], "version": ["v1", "v1", ""],
                      "content_hash": ["H1", "H2", "H5"]})
    listed = pa.table({"uri": ["/a.png", "/b.png", "/c.png", "/e.png"], "size": [3, 3, 3, 3],
                       "version": ["v1", "v2", "v1", ""]})
    got = with_index(listed, index).sort_by("uri")
    assert dict(zip(got.column("uri").to_pylist(), got.column("indexed_hash").to_pylist())) == {
        "/a.png": "H1", "/b.png": None, "/c.png": None, "/e.png": None}


def test_gather_counts_each_hash_once():
    job = AuditJob("x", published=(ImageRef("p/a", "ha"), ImageRef("p/a2", "ha"), ImageRef("p/b", "hb"), ImageRef("p/s", "hs"),
                                   ImageRef("p/r", None, "unreadable: boom"), ImageRef("p/m", "hm")),
                   unpublished=(ImageRef("u/c", "hc"), ImageRef("u/s", "hs"), ImageRef("u/e", "he")),
                   procedure="split", alpha=0.01, seed=0)
    rows = {"ha": 0, "hb": 1, "hc": 2, "hs": 3, "he": 4}
    status = ["ok", "ok", "ok", "ok", "error"]
    errors = [None, None, None, None, "image 'u/e': truncated"]
    P, U, unusable = gather(job, rows, status, errors, np.arange(10.0).reshape(5, 2))
    assert P.tolist() == [[0, 1], [2, 3]] and U.tolist() == [[4, 5]]
    got = {(u["set"], u["uri"]): u["reason"].split(":")[0] for u in unusable}
    assert got == {("published", "p/a2"): "duplicate_content", ("published", "p/s"): "in_both_sets",
                   ("unpublished", "u/s"): "in_both_sets", ("published", "p/r"): "unreadable",
                   ("published", "p/m"): "features_missing", ("unpublished", "u/e"): "image 'u/e'"}


def test_store_ignores_incomplete_foreign_and_temp_files_and_dedupes(tmp_path, monkeypatch):
    store = FeatureStore(str(tmp_path / "fs"))

    def rows(hashes, value, fp="fp", cfg="c"):
        n = len(hashes)
        return pa.table({"content_hash": hashes, "model_fingerprint": [fp] * n, "config_hash": [cfg] * n,
                         "status": ["ok"] * n, "error": pa.array([None] * n, pa.string()), "f0": [value] * n})

    store.write("fp", "c", rows(["h1", "h2"], 1.0))
    store.write("fp", "c", rows(["h2", "h3"], 1.0))  # a retried batch wrote h2 again
    assert store.keys("fp", "c") == {"h1", "h2", "h3"}
    t = store.read("fp", "c")
    assert sorted(t.column("content_hash").to_pylist()) == ["h1", "h2", "h3"]
    assert store.read("fp", "c", {"h3"}).column("content_hash").to_pylist() == ["h3"]

    folder = store.partition("fp", "c")
    good = store.part_files("fp", "c")[0]
    raw = open(good, "rb").read()
    open(os.path.join(folder, "part-truncated.parquet"), "wb").write(raw[:-20])
    open(os.path.join(folder, ".tmp-x-part-y.parquet"), "wb").write(raw)
    pq.write_table(rows(["h9"], 2.0, fp="other"), os.path.join(folder, "part-foreign.parquet"))
    assert store.keys("fp", "c") == {"h1", "h2", "h3"}

    # a crash between writing and publishing leaves no part file
    def crash(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write("fp", "c", rows(["h7"], 1.0))
    assert "h7" not in store.keys("fp", "c")


def test_feature_actor_one_to_one_and_batch_invariant(tiny_pixel_dir, data):
    from cdi_ray.features.config import FeatureConfig
    from cdi_ray.models.fingerprint import model_fingerprint
    from cdi_ray.pipeline.actors import decode_batch
    from cdi_ray.images import content_hash

    cfg = FeatureConfig(features="gray-box", overrides=FAST)
    key = cfg.config_hash()
    actor = FeatureActor(model_uri=str(tiny_pixel_dir), fingerprint=model_fingerprint(tiny_pixel_dir),
                         configs={key: cfg.model_dump(mode="json", exclude={"device"})})
    uris = [str(data / "u" / f"000{i}.png") for i in range(3)] + [str(data / "p1" / "bad.png")]
    hashes = [content_hash(open(u, "rb").read()) for u in uris]
    batch = decode_batch({"uri": np.array(uris, dtype=object), "content_hash": np.array(hashes, dtype=object),
                          "configs": np.array([key] * 4, dtype=object)}, size=16, channels=1)
    out = actor(batch)
    assert out.column("key").to_pylist() == hashes
    assert out.column("status").to_pylist() == ["ok", "ok", "ok", "error"]
    # the same image alone gives the same features as inside a batch
    alone = actor({k: v[2:3] for k, v in batch.items()})
    assert alone.column("features").to_pylist()[0] == pytest.approx(out.column("features").to_pylist()[2], rel=1e-5)
    # a batch that asks for a config the actor does not hold is refused, not silently dropped
    bad = dict(batch, configs=np.array(["nope"] * 4, dtype=object))
    with pytest.raises(RuntimeError, match="one-to-one"):
        actor(bad)
    assert set(SUMMARY_SCHEMA.names).isdisjoint({"image", "features"})  # only counters reach the driver


def test_warm_tasks_compute_what_the_actor_computes_and_keep_one_model(tiny_pixel_dir, data, tmp_path, monkeypatch):
    """``warm_features`` (small CPU streams) gives the actor's rows; its worker process loads a
    model once, whatever the configs, and holds one model at most."""
    from cdi_ray.features.config import FeatureConfig
    from cdi_ray.images import content_hash
    from cdi_ray.models.fingerprint import model_fingerprint
    from cdi_ray.pipeline import actors

    other = make_tiny_pixel_ddpm(tmp_path / "other", image_size=16, channels=1, seed=5)
    loads = []
    original = actors.FeatureStage.load
    monkeypatch.setattr(actors.FeatureStage, "load", lambda self: loads.append(self.model_uri) or original(self))
    monkeypatch.setattr(actors, "_WARM_MODEL", {})

    def kwargs(model, **overrides):
        cfg = FeatureConfig(features="gray-box", overrides={**FAST, **overrides})
        return dict(model_uri=str(model), fingerprint=model_fingerprint(model),
                    configs={cfg.config_hash(): cfg.model_dump(mode="json", exclude={"device"})}), cfg.config_hash()

    uris = [str(data / "u" / f"000{i}.png") for i in range(3)]
    hashes = [content_hash(open(u, "rb").read()) for u in uris]
    stage, key = kwargs(tiny_pixel_dir)
    batch = actors.decode_batch({"uri": np.array(uris, dtype=object), "content_hash": np.array(hashes, dtype=object),
                                 "configs": np.array([key] * 3, dtype=object)}, size=16, channels=1)
    warm = actors.warm_features(batch, **stage)
    assert warm.drop(["actor"]).equals(FeatureActor(**stage)(batch).drop(["actor"]))
    assert set(warm.column("actor").to_pylist()) == {f"task-{os.getpid()}"}
    loads.clear()
    stage2, key2 = kwargs(tiny_pixel_dir, dl={"n_draws": 3})  # another config of the same model: no new load
    actors.warm_features(dict(batch, configs=np.array([key2] * 3, dtype=object)), **stage2)
    assert loads == []
    stage3, key3 = kwargs(other)  # another model replaces it
    actors.warm_features(dict(batch, configs=np.array([key3] * 3, dtype=object)), **stage3)
    assert loads == [str(other)] and len(actors._WARM_MODEL) == 1


def test_diff_highlights_new_used():
    prev = {"audits": [{"audit_id": "a", "verdict": "not_detected", "status": "done", "p_value": 0.5},
                       {"audit_id": "gone", "verdict": "used", "status": "done"}], "run": {"output": "/n/2026-11-27"}}
    cur = {"audits": [{"audit_id": "a", "model": "m", "verdict": "used", "status": "done", "p_value": 1e-4, "p_adjusted": 1e-3},
                      {"audit_id": "new", "model": "m", "verdict": "used", "status": "done", "p_value": 0.0, "p_adjusted": 0.0}],
           "run": {"output": "/n/2026-11-28"}}
    d = diff_results(prev, cur)
    assert [u["audit_id"] for u in d["new_used"]] == ["a", "new"]
    assert d["removed_audits"] == ["gone"] and d["new_audits"] == ["new"]
    assert d["changed"][0]["verdict"] == {"before": "not_detected", "after": "used"}
    md = diff_markdown(d)
    assert "NEW `used` verdicts (2)" in md and "**a**" in md


def test_job_script_exit_codes(tmp_path, models, data):
    """jobs/audit.py: 2 for an invalid manifest (no Ray started)."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": {}, "audits": [], "output": "x"}))
    script = os.path.join(os.path.dirname(__file__), "..", "jobs", "audit.py")
    proc = subprocess.run([sys.executable, script, str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "models" in proc.stderr and json.loads(proc.stdout.strip().splitlines()[-1])["exit_code"] == 2

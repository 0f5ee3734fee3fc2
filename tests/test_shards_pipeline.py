"""Shard sources and per-image labels through the whole Ray pipeline (local files and moto S3).

Counts come from the feature actors' own rows (``run.features``), never from mocks: a shard run
of images a folder run already computed computes nothing (identity = hash of the encoded bytes);
a changed label recomputes exactly the relabelled images (the label is part of the store key).
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from cdi_ray import storage
from cdi_ray.cli import main as cli
from cdi_ray.conditioning import image_key
from cdi_ray.images import content_hash
from cdi_ray.pipeline.run import run_manifest
from cdi_ray.pipeline.store import FeatureStore
from cdi_ray.spec import parse_manifest
from _pipeline_helpers import write_images

FAST = {"overrides": {"dl": {"n_draws": 2}}, "features": ["dl", "pia"], "test": {"procedure": "split", "min_samples": 3}}
N = 8


def _collection(root, seed):
    """N images with a sidecar: label i % 5, one caption each."""
    paths = write_images(root, N, seed=seed)
    with open(root / "metadata.jsonl", "w") as f:
        for i, p in enumerate(paths):
            f.write(json.dumps({"file": os.path.basename(p), "label": str(i % 5), "caption": f"picture {i}"}) + "\n")
    return paths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coll")
    paths = {"p": _collection(root / "p", 11), "u": _collection(root / "u", 12)}
    # the same P with 3 labels changed
    rows = [json.loads(x) for x in (root / "p" / "metadata.jsonl").read_text().splitlines()]
    for r in rows[:3]:
        r["label"] = str((int(r["label"]) + 1) % 5)
    (root / "relabel.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["pack", str(root / "p"), str(root / "p-wds"), "--format", "webdataset", "--shard-size", "3"]) == 0
    assert cli(["pack", str(root / "u"), str(root / "u-pq"), "--format", "parquet", "--shard-size", "5"]) == 0
    return root, paths


def _audit(aid, model, published, unpublished, **extra):
    return {"id": aid, "model": model, "published": published, "unpublished": unpublished, **FAST, **extra}


def test_shards_reuse_folder_features_and_labels_key_the_store(ray_session, data, tiny_pixel_class_dir, tiny_pixel_dir, tmp_path):
    root, paths = data
    models = {"c": {"uri": str(tiny_pixel_class_dir), "access": "gray-box", "batch_size": 8},
              "cn": {"uri": str(tiny_pixel_class_dir), "access": "gray-box", "options": {"null_class": 4}},
              "u": {"uri": str(tiny_pixel_dir), "access": "gray-box", "batch_size": 8}}
    labelled = {side: {"folder": str(root / side), "metadata": str(root / side / "metadata.jsonl")} for side in ("p", "u")}
    out = tmp_path / "out"

    # 1. folders + sidecars; the same folders without labels on the class model fail alone
    first = run_manifest(parse_manifest({"models": models, "output": str(out), "audits": [
        _audit("folder", "c", labelled["p"], labelled["u"]),
        _audit("unlabelled", "c", str(root / "p"), str(root / "u")),
        _audit("plain", "u", str(root / "p"), str(root / "u")),
    ]}))
    by = {a["audit_id"]: a for a in first.audits}
    assert by["folder"]["status"] == "done" and by["plain"]["status"] == "done"
    assert by["unlabelled"]["status"] == "failed" and "no class label" in by["unlabelled"]["error"]
    assert "missing: null" in by["unlabelled"]["error"]
    assert first.run["features"]["per_model"]["c"]["computed"] == 2 * N

    # 2. the same images from tar / Parquet shards: nothing recomputed, the same p-values; a relabelled
    #    sidecar recomputes exactly the 3 relabelled images; the null class when the audit asks for it
    wds = {"webdataset": str(root / "p-wds" / "shard-*.tar")}
    pq = {"parquet": str(root / "u-pq" / "shard-{000000..000001}.parquet"), "label_column": "label",
          "caption_column": "captions", "id_column": "id"}
    second = run_manifest(parse_manifest({"models": models, "output": str(out), "audits": [
        _audit("shards", "c", wds, pq),
        _audit("shards-plain", "u", wds, pq),
        _audit("relabel", "c", {"folder": str(root / "p"), "metadata": str(root / "relabel.jsonl")}, labelled["u"]),
        _audit("null", "cn", str(root / "p"), str(root / "u"), labels={"missing": "null"}),
    ]}))
    by2 = {a["audit_id"]: a for a in second.audits}
    assert all(a["status"] == "done" for a in second.audits), [a["error"] for a in second.audits]
    per_model = second.run["features"]["per_model"]
    # c and cn are the same weights, so one stream: shards 0, relabel the 3 changed labels, null all 2N
    # (cn's store key differs: its options do)
    assert per_model["c"]["computed"] == 3 + 2 * N and "cn" not in per_model
    assert "u" not in per_model  # unconditional: labels do not split its features, the folder run's are reused
    assert by2["shards"]["p_value"] == by["folder"]["p_value"] and by2["shards-plain"]["p_value"] == by["plain"]["p_value"]
    assert second.run["images"]["shards"] == {"shards": 5, "indexed": 5, "from_cache": 0, "images": 2 * N}
    member = {u["uri"] for u in by2["shards"]["unusable_images"]}
    assert not member and by2["shards"]["n_published"] == N

    # the report says what the model was conditioned on
    prov = json.loads((out / "audits" / "null.json").read_text())["provenance"]["conditioning"]
    assert prov["kind"] == "class" and prov["missing"] == "null" and prov["null_class_used"] == 2 * N
    assert f"{2 * N} given the null class 4" in (out / "audits" / "null.html").read_text()
    prov = json.loads((out / "audits" / "shards.json").read_text())["provenance"]["conditioning"]
    assert prov["labelled"] == 2 * N and prov["null_class_used"] == 0

    # the relabelled image has two stored rows, one per label, with different features
    h = content_hash(open(paths["p"][0], "rb").read())
    store = FeatureStore(str(out / "features"))
    fp, key = by["folder"]["model_fingerprint"], by["folder"]["feature_key"]
    rows = store.read(fp, key, [image_key(h, "class", label=0), image_key(h, "class", label=1)]).to_pylist()
    assert len(rows) == 2 and rows[0]["dl"] != rows[1]["dl"]


def _corrupt_shard(good: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("ok1.png", open(good[0], "rb").read()), ("junk.png", b"garbage bytes"),
                           ("ok2.png", open(good[1], "rb").read()), ("ok2.json", b"{not json")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_s3_shards_end_to_end_with_corrupt_members_and_cached_index(ray_session, tiny_pixel_dir, tmp_path):
    import boto3

    boto3.client("s3").create_bucket(Bucket="shards")
    p = write_images(tmp_path / "p", N, seed=21)
    write_images(tmp_path / "u", N, seed=22)
    assert cli(["pack", str(tmp_path / "p"), "s3://shards/p", "--format", "webdataset", "--shard-size", "4"]) == 0
    assert cli(["pack", str(tmp_path / "u"), "s3://shards/u", "--format", "parquet", "--shard-size", "4"]) == 0
    extra = write_images(tmp_path / "x", 2, seed=23)
    storage.atomic_write_bytes("s3://shards/p/shard-000002.tar", _corrupt_shard(extra))
    # the same P as loose S3 objects with a sidecar: identical bytes, so nothing more to compute
    for path in p:
        storage.atomic_write_bytes(f"s3://shards/files/{os.path.basename(path)}", open(path, "rb").read())
    storage.atomic_write_bytes("s3://shards/meta.csv", b"name,label\n0000.png,3\n")
    man = parse_manifest({
        "models": {"m": {"uri": str(tiny_pixel_dir), "access": "gray-box", "batch_size": 8}},
        "audits": [_audit("s3", "m", "s3://shards/p/shard-{000000..000002}.tar", "s3://shards/u/shard-*.parquet"),
                   _audit("s3-files", "m", {"folder": "s3://shards/files/", "metadata": "s3://shards/meta.csv"},
                          "s3://shards/u/shard-*.parquet")],
        "output": "s3://shards/out/",
    })
    first = run_manifest(man)
    assert first.audits[1]["status"] == "done" and first.audits[1]["n_published"] == N
    a = first.audits[0]
    assert a["status"] == "done", a["error"]
    reasons = {u["uri"].rsplit("#", 1)[1]: u["reason"] for u in a["unusable_images"]}
    assert set(reasons) == {"junk.png", "ok2.png"}
    assert "not a recognised image format" in reasons["junk.png"] and reasons["ok2.png"].startswith("bad_metadata")
    assert (a["n_published"], a["n_unpublished"]) == (N + 1, N)  # the shard's good member is used
    assert first.run["features"]["computed"] == 2 * N + 1 and first.run["features"]["decode_errors"] == 1
    again = run_manifest(man)
    assert again.run["images"]["shards"]["from_cache"] == 5 and again.run["features"]["computed"] == 0
    assert again.audits[0]["p_value"] == a["p_value"]

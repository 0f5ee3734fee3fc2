"""s3:// models: fetched once per node into a checksum-keyed cache, safely under real concurrent processes (moto S3)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdi_ray.models import load_model
from cdi_ray.models.fingerprint import model_fingerprint
from cdi_ray.pipeline.model_cache import FETCH_RECORD, materialize_model

BUCKET = "models"
URI = f"s3://{BUCKET}/team/pixel"

CHILD = """
import json, os, sys, time
from cdi_ray.pipeline.model_cache import FETCH_RECORD, materialize_model
ready, go = sys.argv[1], sys.argv[2]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
path = materialize_model(sys.argv[3])
record = json.load(open(os.path.join(path, FETCH_RECORD)))
print(json.dumps({"path": path, "fetched": record["pid"] == os.getpid()}))
"""


def upload(client, folder: Path, prefix: str) -> None:
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(folder).as_posix()}")


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.direct.create_bucket(Bucket=BUCKET)
    return s3_server.direct


@pytest.fixture()
def s3_model(tmp_path, tiny_pixel_dir, monkeypatch, s3_server, bucket):
    """The tiny pixel model plus a 12 MB weight-like file (so fetches overlap in time), uploaded to
    the session's S3 into an emptied bucket, with a cache of the test's own."""
    src = tmp_path / "src"
    shutil.copytree(tiny_pixel_dir, src)
    (src / "unet" / "extra.bin").write_bytes(os.urandom(12 << 20))
    for page in bucket.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            bucket.delete_object(Bucket=BUCKET, Key=obj["Key"])
    env = {**s3_server.env, "CDI_RAY_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("CDI_RAY_CACHE", env["CDI_RAY_CACHE"])
    upload(bucket, src, "team/pixel")
    yield src, bucket, env


def test_concurrent_processes_fetch_once_and_share_the_copy(s3_model, tmp_path):
    src, _, env = s3_model
    sync = tmp_path / "sync"
    sync.mkdir()
    n = 4
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(sync / f"ready{i}"), str(sync / "go"), URI],
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    deadline = time.monotonic() + 60
    while len(list(sync.glob("ready*"))) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    (sync / "go").touch()  # all processes start fetching at once
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len({r["path"] for r in results}) == 1
    assert sum(r["fetched"] for r in results) == 1  # one process downloaded, the others waited and reused it
    dest = Path(results[0]["path"])
    assert model_fingerprint(dest) == model_fingerprint(src)  # byte-identical to what was uploaded
    # nothing half-written is left beside the entry: just it and its lock file
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([dest.name, dest.name + ".lock"])
    record = json.loads((dest / FETCH_RECORD).read_text())
    assert record["uri"] == URI and {f["path"] for f in record["files"]} >= {"unet/extra.bin", "unet/config.json"}
    assert load_model(dest).fingerprint == model_fingerprint(src)


def test_unchanged_model_is_not_fetched_again_and_a_changed_one_is(s3_model):
    src, client, _ = s3_model
    first = materialize_model(URI)
    stamp = os.stat(Path(first) / FETCH_RECORD).st_mtime_ns
    assert materialize_model(URI) == first
    assert os.stat(Path(first) / FETCH_RECORD).st_mtime_ns == stamp
    # re-upload one file with other bytes: a new entry keyed by the new checksum, with the new bytes
    cfg = src / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace("0.02", "0.021"))
    client.upload_file(str(cfg), BUCKET, "team/pixel/scheduler/scheduler_config.json")
    second = materialize_model(URI)
    assert second != first
    assert model_fingerprint(second) == model_fingerprint(src) != model_fingerprint(first)


def test_leftovers_of_a_crashed_fetch_are_not_used(s3_model):
    src, _, _ = s3_model
    dest = Path(materialize_model(URI))
    # a crash mid-fetch: a temp folder, and an entry without its completion record (e.g. an older cache format)
    (dest / FETCH_RECORD).unlink()
    (dest / "unet" / "extra.bin").write_bytes(b"truncated")
    tmp = dest.parent / (dest.name + ".tmp-deadbeef")
    (tmp / "unet").mkdir(parents=True)
    assert materialize_model(URI) == str(dest)
    assert not tmp.exists() and (dest / FETCH_RECORD).is_file()
    assert model_fingerprint(dest) == model_fingerprint(src)


def test_missing_prefix_and_local_paths(s3_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        materialize_model(f"s3://{BUCKET}/nothing-here")
    assert materialize_model(str(tmp_path)) == str(tmp_path)


def test_feature_actor_stage_runs_a_text_model_kept_in_s3(s3_model, tiny_uvit_text_dir, tmp_path):
    """The actor's stage (Ray-free) fetches a caption-conditioned model from S3, loads it with the manifest's
    options and computes a row per image."""
    import numpy as np

    from cdi_ray.pipeline.actors import STATUS_OK, FeatureStage
    from cdi_ray.pipeline.describe import describe_model

    _, client, _ = s3_model
    upload(client, Path(tiny_uvit_text_dir), "team/uvit")
    uri = f"s3://{BUCKET}/team/uvit"
    options = {"missing_caption": "empty"}
    info = describe_model(uri, str(tmp_path / "store"), options)
    assert (info.family, info.image_size, info.image_channels) == ("uvit", 16, 3)
    assert info.fingerprint == model_fingerprint(tiny_uvit_text_dir)
    stage = FeatureStage(model_uri=uri, fingerprint=info.fingerprint, configs={"k": {"features": "gray-box"}},
                         load_options=options)
    stage.setup()
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    rows = stage.process({"content_hash": np.array(["aa" * 32, "bb" * 32], dtype=object),
                          "configs": np.array(["k", "k"], dtype=object), "image": images,
                          "status": np.array([STATUS_OK] * 2, dtype=object), "error": np.array(["", ""], dtype=object)})
    assert [(r[0], r[1], r[2]) for r in rows] == [("aa" * 32, "k", STATUS_OK), ("bb" * 32, "k", STATUS_OK)]
    assert all(len(r[4]) == 14 and np.isfinite(r[4]).all() for r in rows)

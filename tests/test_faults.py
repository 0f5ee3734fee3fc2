"""Faults mid-run: nothing lost, nothing computed twice, results unchanged.

* out of memory in a feature call → the batch is split in halves down to single images; an image
  that does not fit alone is an error row, the rest are computed (FeatureStage, no Ray);
* a feature actor SIGKILLed mid-run → Ray restarts it, the job completes, results equal an
  undisturbed run's;
* the driver SIGKILLed mid-run → the same manifest run again resumes from the feature store: it
  computes only what the store lacks (counted) and the results equal an undisturbed run's.

Streams run in blocks of 2 rows and publish every 2 rows here (``ROWS_PER_BLOCK``, ``WRITE_BATCH``),
and the killed driver runs its two models' streams one after the other, so the store fills while
the run goes and "mid-run" is observable; nothing else is changed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cdi_ray.pipeline import streams as streams_module
from _pipeline_helpers import write_images

FAST = {"dl": {"n_draws": 2}}
TEST = {"procedure": "split", "min_samples": 2}
N = 16  # images per collection
ROWS = 2 * 2 * N  # feature rows of a whole run: 2 models × (P + U)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_images(root / "p", N, seed=21)
    write_images(root / "u", N, seed=22)
    return root


@pytest.fixture(scope="module")
def models(tiny_pixel_dir, tmp_path_factory):
    from cdi_ray.models.testing import make_tiny_pixel_ddpm

    return [str(tiny_pixel_dir), str(make_tiny_pixel_ddpm(tmp_path_factory.mktemp("m2") / "m2", image_size=16, channels=1, seed=1))]


def manifest(models, data, out, pool: str = "auto") -> dict:
    """Two audits of the same collections on two models (two feature streams)."""
    return {"models": {f"m{i}": {"uri": uri, "access": "gray-box", "batch_size": 2, "pool": pool}
                       for i, uri in enumerate(models)},
            "audits": [{"id": f"f{i}", "model": f"m{i}", "published": str(data / "p"), "unpublished": str(data / "u"),
                        "overrides": FAST, "test": TEST} for i in range(len(models))],
            "output": str(out), "fdr": {"method": "none"}}


@pytest.fixture
def small_blocks(monkeypatch):
    """Streams in blocks of 2 rows, publishing every 2 rows, so that "mid-run" is observable."""
    monkeypatch.setattr(streams_module, "WRITE_BATCH", 2)
    monkeypatch.setattr(streams_module, "ROWS_PER_BLOCK", 2)


def entries(results: dict) -> list[dict]:
    return results["audits"]


@pytest.fixture(scope="module")
def undisturbed(ray_session, models, data, tmp_path_factory):
    from cdi_ray.pipeline.run import run_manifest
    from cdi_ray.spec import parse_manifest

    out = tmp_path_factory.mktemp("undisturbed")
    b = run_manifest(parse_manifest(manifest(models, data, out)))
    assert b.exit_code == 0 and b.run["features"]["computed"] == ROWS
    return json.loads((out / "results.json").read_text())


def stored_rows(store_root) -> list[tuple[str, str]]:
    """(partition, content hash) of every feature row in the store's model partitions, duplicates kept."""
    rows = []
    for root, _, files in os.walk(store_root):
        if "model=" in root and "_descriptors" not in root:
            part = os.path.relpath(root, store_root)
            rows += [(part, h) for f in files if f.startswith("part-") and f.endswith(".parquet")
                     for h in pq.read_table(os.path.join(root, f)).column("content_hash").to_pylist()]
    return rows


# ---------------------------------------------------------------------------------------------- out of memory
def test_out_of_memory_splits_the_batch_then_refuses_single_images(tiny_pixel_dir, data):
    from cdi_ray.features.config import FeatureConfig
    from cdi_ray.images import content_hash
    from cdi_ray.models.fingerprint import model_fingerprint
    from cdi_ray.pipeline.actors import FeatureStage, decode_batch

    cfg = FeatureConfig(features="gray-box", overrides=FAST)
    key = cfg.config_hash()
    uris = sorted(str(p) for p in (data / "p").iterdir())[:6]
    batch = decode_batch({"uri": np.array(uris, dtype=object),
                          "content_hash": np.array([content_hash(open(u, "rb").read()) for u in uris], dtype=object),
                          "configs": np.array([key] * 6, dtype=object)}, size=16, channels=1)
    one_image_mb = 16 * 16 * 4 / 2**20

    def stage(limit):
        s = FeatureStage(model_uri=str(tiny_pixel_dir), fingerprint=model_fingerprint(tiny_pixel_dir),
                         configs={key: cfg.model_dump(mode="json", exclude={"device"})}, max_batch_mb=limit)
        s.setup()
        return s.process(batch)

    whole = stage(None)
    split = stage(2 * one_image_mb)  # 6 → 3 + 3 → (1 + 2) + (1 + 2): no call above 2 images
    assert [r[2] for r in split] == ["ok"] * 6
    for a, b in zip(whole, split):
        assert a[0] == b[0] and b[4] == pytest.approx(a[4], rel=1e-5)
    refused = stage(0.5 * one_image_mb)  # not even one image fits: each is a transient row (retried next run)
    assert [r[2] for r in refused] == ["transient"] * 6 and [r[0] for r in refused] == [r[0] for r in whole]
    assert all(r[3].startswith("out_of_memory: the model does not fit one image") for r in refused)


# ---------------------------------------------------------------------------------------------- killed actor
def feature_actor_pids() -> list[int]:
    """Processes of the live feature actors (from the GCS's actor table; no dashboard needed)."""
    from ray._private import state

    return [a["Pid"] for a in state.actors().values()
            if a["State"] == "ALIVE" and "FeatureActor" in a["ActorClassName"] and a.get("Pid")]


def wait_for(cond, timeout: float = 120.0, what: str = ""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _part_files(store_root) -> bool:
    """Whether any feature part file is published yet (a cheap listing: the poll must be fast)."""
    return any(f.startswith("part-") for root, _, files in os.walk(store_root) if "model=" in root for f in files)


def _run_and_kill_an_actor(spec, out) -> tuple[object, bool]:
    """Run ``spec`` in a thread; once it has published rows and a feature actor is alive, SIGKILL
    the live actors. Returns (the batch result, whether the kill landed mid-run)."""
    from cdi_ray.pipeline.run import run_manifest

    result: dict = {}
    job = threading.Thread(target=lambda: result.update(b=run_manifest(spec)))
    job.start()
    pids = wait_for(lambda: (_part_files(out / "features") and feature_actor_pids()) or not job.is_alive(),
                    what="stored rows and a live feature actor")
    mid_run = job.is_alive() and len(stored_rows(out / "features")) < ROWS
    if mid_run:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive()
    return result["b"], mid_run


def test_killed_feature_actor_job_completes_with_identical_results(ray_session, undisturbed, models, data, tmp_path,
                                                                   small_blocks):
    from cdi_ray.spec import parse_manifest

    for attempt in range(3):  # on a loaded machine the tiny run can end before the poll sees an actor
        out = tmp_path / f"out{attempt}"
        spec = parse_manifest(manifest(models, data, out, pool="actors"))  # an actor to kill, at this small size too
        b, mid_run = _run_and_kill_an_actor(spec, out)
        if mid_run:
            break
    assert mid_run, "every run finished before an actor could be killed"
    assert b.exit_code == 0
    assert entries(json.loads((out / "results.json").read_text())) == entries(undisturbed)
    assert sorted(set(stored_rows(out / "features"))) == sorted(set(stored_rows(undisturbed["run"]["feature_store"])))


# ---------------------------------------------------------------------------------------------- killed driver
def test_killed_driver_rerun_resumes_from_the_store(ray_session, undisturbed, models, data, tmp_path, small_blocks):
    out = tmp_path / "out"
    man = tmp_path / "manifest.yaml"
    man.write_text(yaml.safe_dump(manifest(models, data, out)))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c",
               "import functools, sys, cdi_ray.pipeline.run as r, cdi_ray.pipeline.streams as s; "
               "s.WRITE_BATCH = s.ROWS_PER_BLOCK = 2; "
               "r.run_manifest = functools.partial(r.run_manifest, max_concurrent_models=1); "
               "from cdi_ray.cli import main; sys.exit(main(sys.argv[1:]))",
               "audit", str(man), "--address", ray_session.address]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: stored_rows(out / "features") or driver.poll() is not None, what="stored rows")
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        at_kill = len(stored_rows(out / "features"))
    finally:
        if driver.poll() is None:
            driver.kill()
    time.sleep(2)  # the dead job's tasks are gone before the rerun plans
    before = stored_rows(out / "features")
    assert 0 < at_kill <= len(before) < ROWS and not (out / "results.json").exists(), (at_kill, len(before))

    # the rerun: the same manifest and settings, in this process (a second driver start proves nothing more)
    from cdi_ray.pipeline.run import run_manifest
    from cdi_ray.spec import load_manifest

    rerun = run_manifest(load_manifest(str(man)), max_concurrent_models=1)  # small blocks, as the killed one
    assert rerun.exit_code == 0
    results = json.loads((out / "results.json").read_text())
    feats = results["run"]["features"]
    assert feats["needed"] == ROWS and feats["to_compute"] == ROWS - len(set(before))
    assert feats["computed"] == feats["to_compute"]
    after = stored_rows(out / "features")
    assert len(after) == ROWS and set(before) <= set(after)  # no stored feature was computed again
    assert entries(results) == entries(undisturbed)

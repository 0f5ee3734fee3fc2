"""jobs/requests.py as a script: its exit codes, and the same job through `ray job submit` to a
real local head (tests/_ray_head.py) — its deliverable then verifies from the stored features."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cdi_ray.requests import verify_request
from _pipeline_helpers import write_images
from _ray_head import last_json, submit

pytestmark = pytest.mark.xdist_group("ray_head")  # one head for both modules (tests/conftest.py)
REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 420


def _files(root: Path, model_dir, rows: list[dict]) -> tuple[Path, Path]:
    registry = root / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "models": {"tiny": {"uri": str(model_dir), "access": "gray-box", "batch_size": 16}},
        "defaults": {"features": ["dl"], "overrides": {"dl": {"n_draws": 1}}, "test": {"min_samples": 5}}}))
    requests = root / "requests.csv"
    with open(requests, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["request_id", "owner", "published", "unpublished"])
        w.writeheader()
        w.writerows(rows)
    return requests, registry


def test_invalid_input_exits_2_without_starting_ray(tmp_path, tiny_pixel_dir):
    requests, registry = _files(tmp_path, tiny_pixel_dir, [{"request_id": "a", "owner": "o", "published": "p",
                                                             "unpublished": "u"}])
    registry.write_text("models: {}\n")
    proc = subprocess.run([sys.executable, "jobs/requests.py", str(requests), "--models", str(registry), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_json(proc.stdout)["exit_code"] == 2 and "at least one" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~20 s unloaded: a job's runtime environment, driver and actors start on the head
def test_requests_job_via_ray_job_submit(ray_head, tiny_pixel_dir, tmp_path):
    address, env = ray_head
    write_images(tmp_path / "p", 6, seed=61)
    write_images(tmp_path / "u", 6, seed=62)
    requests, registry = _files(tmp_path, tiny_pixel_dir, [{"request_id": "job-owner", "owner": "An Owner",
                                                             "published": str(tmp_path / "p"),
                                                             "unpublished": str(tmp_path / "u")}])
    out = tmp_path / "out"
    proc = submit(address, env, REPO, ["jobs/requests.py", str(requests), "--models", str(registry), "--out", str(out)],
                  JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    summary = last_json(proc.stdout)
    assert summary["exit_code"] == 0 and summary["states"]["done"] == 1 and summary["features"]["computed"] == 12
    assert summary["driver_peak_rss_mb"] > 0
    assert [r["state"] for r in pq.read_table(out / "requests.parquet").to_pylist()] == ["done"]
    v = verify_request(str(out / "requests" / "job-owner"))
    assert v.matches and v.audits_checked == 1, [str(d) for d in v.differences]

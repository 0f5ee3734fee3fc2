"""jobs/audit.py and jobs/requests.py submitted with the real `ray job submit` CLI to a real local head
(`ray start --head`); the request's deliverable then verifies from the stored features.

The head is the session's ``ray_head`` (tests/conftest.py, tests/_ray_head.py): its own session,
temp dir and ports, stopped process by process at the end — never ``ray stop``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cdi_ray.requests import verify_request

from _pipeline_helpers import write_images, write_request_files
from _ray_head import last_json, submit

REPO = Path(__file__).resolve().parent.parent
JOB_TIMEOUT_S = 420


def test_audit_job_via_ray_job_submit(ray_head, tiny_pixel_dir, tmp_path):
    address, env = ray_head
    write_images(tmp_path / "p", 8, seed=11)
    write_images(tmp_path / "u", 8, seed=12)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({
        "models": {"tiny": {"uri": str(tiny_pixel_dir), "access": "gray-box", "batch_size": 8}},
        "audits": [{"id": "job-audit", "model": "tiny", "published": str(tmp_path / "p"), "unpublished": str(tmp_path / "u"),
                    "overrides": {"dl": {"n_draws": 2}}, "test": {"procedure": "split", "min_samples": 4}}],
        "output": str(tmp_path / "unused"),
    }))
    out = tmp_path / "out"
    proc = submit(address, env, REPO, ["jobs/audit.py", str(manifest), "--out", str(out)], JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    summary = last_json(proc.stdout)
    assert summary["exit_code"] == 0 and summary["features"]["computed"] == 16
    results = json.loads((out / "results.json").read_text())
    assert results["audits"][0]["audit_id"] == "job-audit" and results["audits"][0]["status"] == "done"
    assert results["audits"][0]["n_published"] == 8 and results["audits"][0]["n_unpublished"] == 8


@pytest.mark.slow  # ~20 s unloaded: a job's runtime environment, driver and actors start on the head
def test_requests_job_via_ray_job_submit(ray_head, tiny_pixel_dir, tmp_path):
    address, env = ray_head
    write_images(tmp_path / "p", 6, seed=61)
    write_images(tmp_path / "u", 6, seed=62)
    requests, registry = write_request_files(tmp_path, tiny_pixel_dir, [{
        "request_id": "job-owner", "owner": "An Owner", "published": str(tmp_path / "p"),
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

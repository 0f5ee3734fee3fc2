"""jobs/audit.py submitted with the real `ray job submit` CLI to a real local head (`ray start --head`).

The head is the session's ``ray_head`` (tests/conftest.py, tests/_ray_head.py): its own session,
temp dir and ports, stopped process by process at the end — never ``ray stop``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from _pipeline_helpers import write_images
from _ray_head import last_json, submit

pytestmark = pytest.mark.xdist_group("ray_head")  # one head for both modules (tests/conftest.py)
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

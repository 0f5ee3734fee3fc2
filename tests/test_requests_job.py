"""jobs/requests.py as a script: bad input exits 2 before any Ray starts. The same job through
`ray job submit` is in tests/test_job_submit.py, beside the audit job (one head for both)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _pipeline_helpers import write_request_files
from _ray_head import last_json

REPO = Path(__file__).resolve().parent.parent


def test_invalid_input_exits_2_without_starting_ray(tmp_path, tiny_pixel_dir):
    requests, registry = write_request_files(tmp_path, tiny_pixel_dir, [{"request_id": "a", "owner": "o",
                                                                          "published": "p", "unpublished": "u"}])
    registry.write_text("models: {}\n")
    proc = subprocess.run([sys.executable, "jobs/requests.py", str(requests), "--models", str(registry), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_json(proc.stdout)["exit_code"] == 2 and "at least one" in proc.stderr
    assert not (tmp_path / "out").exists()

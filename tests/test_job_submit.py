"""jobs/audit.py submitted with the real `ray job submit` CLI to a real local head (`ray start --head`).

The head runs in its own session (``start_new_session``) with its own ``--temp-dir`` and free
ports, so it never touches another Ray on this machine; teardown stops exactly the processes of
that session (SIGTERM, then SIGKILL) — never ``ray stop``, which would stop every Ray here.
It cannot share the session's Ray (tests/conftest.py ``ray_session``): ``ray job submit`` needs a
head started by ``ray start --head`` with its dashboard and job server, which the session's
in-process local Ray does not have.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from _pipeline_helpers import free_port, write_images

REPO = Path(__file__).resolve().parent.parent
HEAD_START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 420


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if os.getsid(int(d)) != sid:
                    continue
                with open(f"/proc/{d}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                pids.append(int(d))
    return pids


def _stop_session(proc: subprocess.Popen) -> None:
    """Stop the head and everything it started: they all live in the session ``proc`` leads."""
    sid = proc.pid
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(sid, sig)
        except ProcessLookupError:
            pass
        deadline = time.time() + wait_s
        while time.time() < deadline and _session_pids(sid):
            time.sleep(0.5)
        if not _session_pids(sid):
            break
    for pid in _session_pids(sid):  # anything that left the process group but not the session
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="module")
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="cdihead-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    cmd = [
        "ray", "start", "--head", "--block", "--num-cpus=8", "--include-dashboard=true", "--disable-usage-stats",
        f"--port={free_port()}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
    ]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + HEAD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ray start --head exited:\n" + Path(temp_dir, "head.log").read_text()[-3000:])
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("the Ray dashboard did not come up") from None
                time.sleep(0.5)
        yield address, env
    finally:
        _stop_session(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


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
    cmd = ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           "python", "jobs/audit.py", str(manifest), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    summary = next(json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith('{"exit_code"'))
    assert summary["exit_code"] == 0 and summary["features"]["computed"] == 16
    results = json.loads((out / "results.json").read_text())
    assert results["audits"][0]["audit_id"] == "job-audit" and results["audits"][0]["status"] == "done"
    assert results["audits"][0]["n_published"] == 8 and results["audits"][0]["n_unpublished"] == 8

"""A real local Ray head (`ray start --head`, with its dashboard and job server) for `ray job submit` tests.

The head runs in its own session (``start_new_session``) with its own ``--temp-dir`` and free
ports, so it never touches another Ray on this machine; teardown stops exactly the processes of
that session (SIGTERM, then SIGKILL) — never ``ray stop``, which would stop every Ray here.
It cannot be the session's Ray (tests/conftest.py ``ray_session``): ``ray job submit`` needs a
head started by ``ray start --head`` with its dashboard and job server, which the session's
in-process local Ray does not have. tests/conftest.py ``ray_head`` starts one per session.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from _pipeline_helpers import free_port

HEAD_START_TIMEOUT_S = 180


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


@contextmanager
def ray_head_cluster():
    """Yield ``(dashboard address, environment for `ray job submit`)`` of a fresh head; stop it after."""
    temp_dir = tempfile.mkdtemp(prefix="cdihead-", dir="/tmp")  # short: Ray's socket paths have a length limit
    # this interpreter's `ray` and `python` first, also when the suite runs without an activated venv
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    cmd = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=8", "--include-dashboard=true", "--disable-usage-stats",
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


def submit(address: str, env: dict, repo: Path, args: list[str], timeout: int) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir repo -- python ARGS…`` (waits for the job)."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(repo), "--", "python", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=repo)


def last_json(stdout: str, key: str = "exit_code") -> dict:
    """The job's JSON summary: the last stdout line that is a JSON object with ``key``."""
    import json

    return next(json.loads(line) for line in reversed(stdout.splitlines())
                if line.startswith("{") and f'"{key}"' in line)

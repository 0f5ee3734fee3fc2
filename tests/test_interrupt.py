"""Ctrl-C during compute (issue #16): the streams stop, what was stored is kept, the JSON summary is
the last line, the exit code is 130 — and the same command again computes only the rest.

The end is bounded: if the clean stop hangs (a Ray call that notices the signal late, a shutdown
waiting on the streams' threads), a watchdog armed by the signal itself ends the process after
``STOP_GRACE_S`` with the same code and summary — checked here with a stop that never finishes.

The driver is a process of its own because SIGINT must reach a driver's main thread while its
feature streams run in worker threads: the test process cannot interrupt itself that way. It
joins the session's Ray (``--address``) rather than starting one, so no second cluster starts.
As in tests/test_faults.py, the stream publishes every 2 rows (``WRITE_BATCH``, ``ROWS_PER_BLOCK``)
so that "mid-compute" is observable; nothing else is changed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cdi_ray.exits import EXIT_INTERRUPTED, STOP_GRACE_S
from _pipeline_helpers import write_images
from test_faults import stored_rows, wait_for

N = 48  # images per collection


def ctrl_c_reaches_it() -> None:
    """In the child before it starts: SIGINT back to its default. A suite started in the background
    by a non-interactive shell (as CI may be) inherits SIGINT *ignored*, and so would the driver —
    which then, rightly, keeps ignoring it (cdi_ray.exits.InterruptGuard leaves an ignored SIGINT
    alone, as for `nohup … &`). These tests play a user pressing Ctrl-C at a foreground command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow  # a driver process of its own: ~30 s on the 2-core CI box (imports, listing, the stream's start)
def test_sigint_during_compute_stops_keeps_the_store_and_exits_130(ray_session, tmp_path):
    from cdi_ray.pipeline.run import plan_manifest
    from cdi_ray.spec import load_manifest

    from cdi_ray.models.testing import make_tiny_pixel_ddpm

    # 32×32 RGB: a few times the 16×16 model's cost per call, so the stream runs well after its first
    # stored rows and SIGINT lands mid-compute on an idle machine too
    model = make_tiny_pixel_ddpm(tmp_path / "model", image_size=32, channels=3, seed=3)
    write_images(tmp_path / "p", N, seed=71)
    write_images(tmp_path / "u", N, seed=72)
    out = tmp_path / "out"
    man = tmp_path / "manifest.yaml"
    man.write_text(yaml.safe_dump({
        "models": {"m": {"uri": str(model), "access": "gray-box", "batch_size": 2,
                          "pool": "actors"}},  # many small blocks: rows are stored while the stream runs
        "audits": [{"id": "a", "model": "m", "published": "p", "unpublished": "u", "overrides": {"dl": {"n_draws": 20}},
                    "test": {"procedure": "split", "min_samples": 2}}],
        "output": "out"}))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    script = os.path.join(repo, "jobs", "audit.py")
    command = [sys.executable, "-c",
               "import runpy, sys, cdi_ray.pipeline.streams as s; s.WRITE_BATCH = s.ROWS_PER_BLOCK = 2; "
               f"sys.argv = sys.argv[1:]; runpy.run_path({script!r}, run_name='__main__')",
               script, str(man), "--address", ray_session.address]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=ctrl_c_reaches_it)
    try:
        # mid-compute: the plan is written, then the stream's actor starts and computes (≈ 20 s here). Not
        # "after the first stored row": inside a busy session Ray the stream's writes can lag to its end
        wait_for(lambda: (out / "plan" / "plan.json").exists() or driver.poll() is not None, timeout=180,
                 what="the plan")
        time.sleep(4)
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        driver.send_signal(signal.SIGINT)
        t0 = time.time()
        stdout, stderr = driver.communicate(timeout=15)
        took = time.time() - t0
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert took < 15
    summary = json.loads(stdout.strip().splitlines()[-1])  # the last line on stdout
    assert summary["exit_code"] == EXIT_INTERRUPTED and summary["interrupted"] is True
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not (out / "results.json").exists()
    time.sleep(2)  # the interrupted job's last tasks are gone before counting
    kept = set(stored_rows(out / "features"))
    assert len(kept) < 2 * N, len(kept)  # stopped before the end; what was stored (if any) is kept:
    # the same manifest again: only what the store lacks is to be computed
    plan = plan_manifest(load_manifest(str(man)))
    assert plan.needed == 2 * N and plan.to_compute == 2 * N - len(kept)


GUARDED = """
import json, sys, time
from cdi_ray.exits import InterruptGuard, run_job

mode = sys.argv[1]
if mode == "hang":  # a clean stop that never finishes, like a shutdown waiting on a stuck thread
    InterruptGuard(json.dumps({"exit_code": 130, "interrupted": True}), grace=1.0).install()
    try:
        print("ready", flush=True)  # inside the try: the signal may land right after it
        time.sleep(60)
    except KeyboardInterrupt:
        pass
    while True:
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            pass
def main(args):
    print("ready", flush=True)
    if mode == "fail":
        raise RuntimeError("a bug")
    if mode == "wait":
        time.sleep(60)
    return {"exit_code": 3, "done": 1}
run_job(main, None, "test")
"""


def _guarded(mode: str, interrupt: bool) -> tuple[subprocess.CompletedProcess, float]:
    proc = subprocess.Popen([sys.executable, "-c", GUARDED, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=ctrl_c_reaches_it,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.time()
        if interrupt:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)  # its output is a few lines: the pipes hold it
        # read through the same buffered files as "ready" (communicate() would skip what they hold)
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), time.time() - t0


def test_a_stop_that_hangs_is_ended_by_the_watchdog_with_130_and_the_summary():
    done, took = _guarded("hang", interrupt=True)
    assert done.returncode == EXIT_INTERRUPTED
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"exit_code": 130, "interrupted": True}
    assert 1.0 <= took < 10, took


def test_jobs_end_with_their_code_and_the_summary_as_last_line():
    done, _ = _guarded("ok", interrupt=False)
    assert done.returncode == 3 and json.loads(done.stdout.strip().splitlines()[-1]) == {"exit_code": 3, "done": 1}
    done, _ = _guarded("fail", interrupt=False)  # a bug: exit 1, logged, still a summary line
    assert done.returncode == 1 and json.loads(done.stdout.strip().splitlines()[-1])["exit_code"] == 1
    assert "RuntimeError: a bug" in done.stderr
    done, took = _guarded("wait", interrupt=True)  # Ctrl-C on the clean path: at once, not after the grace
    assert done.returncode == EXIT_INTERRUPTED and took < STOP_GRACE_S
    assert json.loads(done.stdout.strip().splitlines()[-1])["interrupted"] is True
    assert "Traceback" not in done.stderr

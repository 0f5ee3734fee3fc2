"""The terminal: a progress bar with images/s and ETA, quiet logs by default."""
import io
import os
import subprocess
import sys

import pytest
import yaml

from cdi_ray.console import ProgressBar, format_duration
from cdi_ray.pipeline.streams import MIN_WRITES_PER_STREAM, WRITE_BATCH, write_batch_size

from _pipeline_helpers import write_images


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_rate_and_eta_follow_the_recent_window_not_the_startup():
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressBar(1000, "features m", stream=out, window=10, log_every=0, clock=clock)
    clock.t = 60.0  # a minute of actor start-up and model load, nothing done
    bar.advance(0)
    for _ in range(20):  # then a steady 10 img/s
        clock.t += 1.0
        bar.advance(10)
    assert abs(bar.rate() - 10.0) < 1e-9
    line = bar.render()
    assert "200/1000 images" in line and "10.0 img/s" in line and "ETA 1m20s" in line


def test_log_file_gets_throttled_lines_and_one_final_line():
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressBar(100, "features m", stream=out, log_every=15, clock=clock)
    for _ in range(100):
        clock.t += 1.0
        bar.advance(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert 100 / 15 - 1 <= len(lines) <= 100 / 15 + 2  # not one line per batch
    assert lines[-1].startswith("features m [" + "#" * 24 + "] 100/100 images") and "in 1m40s" in lines[-1]
    assert "\r" not in out.getvalue()


def test_terminal_redraws_in_place():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock, out = FakeClock(), Tty()
    bar = ProgressBar(10, "x", stream=out, clock=clock)
    for _ in range(10):
        clock.t += 1.0
        bar.advance(1)
    bar.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") >= 2


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3600 * 2 + 60 * 5)] == ["0s", "59s", "1m01s", "2h05m"]


def test_write_batches_publish_rows_as_they_are_computed():
    for rows in (10, 640, 5_000, 100_000, 10_000_000):
        size = write_batch_size(rows)
        assert 32 <= size <= WRITE_BATCH
        assert rows / size >= min(MIN_WRITES_PER_STREAM, rows / 32) - 1e-9 or size == WRITE_BATCH


@pytest.mark.slow  # a CLI process that starts its own local Ray
def test_cli_audit_is_quiet_and_shows_progress(tmp_path, tiny_pixel_dir):
    """A CLI audit on a local Ray: the summary and one progress bar — no INFO lines, no Ray chatter.

    The CLI subprocess starts a Ray of its own rather than joining the session's: what is checked is
    exactly what a user sees when ``cdi-ray audit`` starts a local Ray (its start-up noise, and the
    local progress bar, which a run on a joined cluster leaves to Ray Data)."""
    write_images(tmp_path / "P", 12, seed=1)
    write_images(tmp_path / "U", 12, seed=2)
    manifest = {
        "models": {"tiny": {"uri": str(tiny_pixel_dir), "access": "gray-box", "batch_size": 4}},
        "audits": [{"id": "a", "model": "tiny", "published": "P", "unpublished": "U",
                    "overrides": {"dl": {"n_draws": 2}}}],
        "output": "out",
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.run([sys.executable, "-m", "cdi_ray", "audit", str(tmp_path / "m.yaml"), "--num-cpus", "4"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode in (0, 3), proc.stderr
    assert "1 audits:" in proc.stdout
    err = proc.stderr
    assert "features tiny [" in err and "24/24 images" in err and "img/s" in err
    for noise in ("INFO", "Traceback", "Token authentication", "Running Dataset", "Progress bars disabled"):
        assert noise not in err, err

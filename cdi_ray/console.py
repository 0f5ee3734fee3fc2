"""What a person at a terminal sees: log levels and the local progress bar.

Quiet by default: warnings and our own one-line summaries only; ``-v`` adds our INFO logs and
Ray's, ``-vv`` debug. On a cluster Ray Data's own progress bars show the stream; on a local Ray
they are replaced by one bar per feature stream with images/s and an ETA, which is what a
person watching one machine wants to know.

Library calls (tests, notebooks) see neither bar nor changed log levels unless
:func:`configure` was called — only the CLIs call it.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from typing import TextIO

_STATE = {"configured": False, "verbose": 0}

#: Ray warnings that tell a CLI user nothing actionable about a local run.
_RAY_NOISE = (
    "Token authentication is enabled",   # a local Ray started by us; its token stays on this machine
    "Progress bars disabled",            # we disabled them, for our own bar
)


class _DropRayNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in _RAY_NOISE)


def configure(verbose: int) -> None:
    """Set log levels for a CLI run (0 quiet, 1 info, 2 debug) and enable the local progress bar."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(max(verbose, 0), 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    _STATE.update(configured=True, verbose=verbose)


def verbose() -> int:
    return int(_STATE["verbose"])


def progress_enabled() -> bool:
    """True when a CLI configured the console (library callers get no bar)."""
    return bool(_STATE["configured"])


def drop_ray_noise() -> None:
    """Before ``ray.init`` (Ray imported): filter Ray's non-actionable warnings out of a quiet CLI run.

    Only Python log records can be filtered; the C++ core's own stderr lines (e.g. an
    ``E … core_worker.cc`` notice that actor constructor arguments live in the object store) stay —
    raising ``RAY_BACKEND_LOG_LEVEL`` would hide them but makes every process announce the change.
    """
    if not (_STATE["configured"] and _STATE["verbose"] < 1):
        return
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropRayNoise) for f in handler.filters):
                handler.addFilter(_DropRayNoise())


def quiet_ray(local: bool) -> None:
    """After ``ray.init``: hide Ray Data's INFO chatter unless ``-v``; on a local Ray, its bars too.

    Ray Data logs to a session file and, at INFO, to stderr; only the stderr handler is raised
    to WARNING, so the session log keeps everything for debugging.
    """
    if not _STATE["configured"]:
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if _STATE["verbose"] < 1:
        drop_ray_noise()  # Ray Data's handlers exist now too
        ctx.print_on_execution_start = False
        ctx.enable_auto_log_stats = False
        for handler in logging.getLogger("ray.data").handlers:
            if getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
                handler.setLevel(logging.WARNING)
    if local:
        ctx.enable_progress_bars = False


def silence_ray_shutdown() -> None:
    """After Ctrl-C: the feature streams' threads are still inside Ray Data when Ray is stopped, and
    Ray Data logs each broken call with a traceback — noise, not news (the interrupt is reported
    once, by the command). Ray's own loggers go quiet on the console; session log files keep all."""
    for name in ("ray", "ray.data"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.CRITICAL)
        for handler in logger.handlers:
            if getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
                handler.setLevel(logging.CRITICAL)


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressBar:
    """``label [#####-----] done/total images  12.3 img/s  ETA 1m05s`` on one line of ``stream``.

    The rate is measured over the last ``window`` seconds (start-up — actor launch, model load —
    would otherwise drag the early estimate down for the whole run). On a terminal the line is
    redrawn in place; in a log file a new line is written at most every ``log_every`` seconds.
    Thread-safe: several model streams may advance their own bars at once.
    """

    def __init__(self, total: float, label: str, *, stream: TextIO | None = None, window: float = 30.0,
                 log_every: float = 15.0, clock=time.monotonic, width: int = 24):
        self.total, self.label, self.width = float(total), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.window, self.clock = window, clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = 0.2 if self.tty else log_every
        self.done = 0.0
        self._t0 = clock()
        self._samples: deque[tuple[float, float]] = deque([(self._t0, 0.0)])
        self._last_draw = -float("inf")
        self._last_line = ""
        self._lock = threading.Lock()

    def rate(self) -> float:
        """Images per second over the recent window (0 before the first image)."""
        now = self.clock()
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        t_first, d_first = self._samples[0]
        return (self.done - d_first) / (now - t_first) if now > t_first and self.done > d_first else 0.0

    def render(self) -> str:
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        filled = int(round(frac * self.width))
        rate = self.rate()
        eta = f"ETA {format_duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else (
            f"in {format_duration(self.clock() - self._t0)}" if self.done >= self.total else "ETA --")
        return (f"{self.label} [{'#' * filled}{'-' * (self.width - filled)}] {int(self.done)}/{int(self.total)} images"
                f"  {rate:.1f} img/s  {eta}")

    def advance(self, n: float) -> None:
        with self._lock:
            self.done += n
            now = self.clock()
            self._samples.append((now, self.done))
            if now - self._last_draw >= self.min_interval or self.done >= self.total:
                self._draw(now)

    def close(self) -> None:
        with self._lock:
            self._draw(self.clock(), final=True)

    def _draw(self, now: float, final: bool = False) -> None:
        line = self.render()
        if final and not self.tty and line == self._last_line:
            return
        self._last_draw, self._last_line = now, line
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

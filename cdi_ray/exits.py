"""How a command-line process ends: one set of exit codes, the JSON summary as the last line, and
Ctrl-C within a bound.

Exit codes (``cdi-ray`` and every ``jobs/*.py`` entry point):
  0    everything asked for was done
  1    internal error (a bug: report it with the ``-v`` output)
  2    invalid input — the message says what to fix
  3    partial failure: some audits or images failed, the rest completed and were written
  130  interrupted (SIGINT, Ctrl-C): the feature streams were stopped; every feature already stored
       is kept, so the same command again computes only the rest

Ctrl-C raises ``KeyboardInterrupt`` in the driver's main thread, which stops the streams and ends
the process through :func:`exit_process`. That path must not hang on a busy cluster (a Ray call
in C++ that checks for signals late, a ``ray.shutdown`` waiting on the streams' threads), so
:class:`InterruptGuard` also arms a watchdog the moment the signal arrives — from C, through
:func:`signal.set_wakeup_fd`, whatever the main thread is doing — which prints the summary and
ends the process after :data:`STOP_GRACE_S` if the clean path has not by then. Nothing computed is
lost either way: the feature store's part files are published atomically by the streams' tasks.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, NoReturn

EXIT_OK, EXIT_INTERNAL, EXIT_INVALID, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UserError(Exception):
    """An error in what the user asked for; printed without a traceback, exit code 2 (``EXIT_INVALID``)."""


#: Seconds from Ctrl-C to a forced exit when the clean stop has not ended the process by then.
STOP_GRACE_S = 8.0

INTERRUPTED_MESSAGE = ("interrupted (SIGINT): the feature streams were stopped; the features already stored are kept — "
                       "run the same command again to compute only the rest")

_ENDING = threading.Lock()  # one ending per process: the clean path's or the watchdog's


def interrupted_summary() -> dict:
    return {"exit_code": EXIT_INTERRUPTED, "interrupted": True, "error": INTERRUPTED_MESSAGE}


def exit_process(code: int, last_line: str | None = None) -> NoReturn:
    """End a command-line process now: stop the Ray it started, flush the output and logs, and exit
    without the interpreter's teardown, which takes seconds once torch and Ray Data are loaded
    (module by module, thread by thread) and does nothing a finished command needs. ``last_line``
    is printed after Ray is stopped, so that no forwarded worker log can follow it: it is the last
    line on stdout."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    with _ENDING:
        if last_line is not None:
            print(last_line)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class InterruptGuard:
    """From the first SIGINT on, the process ends within ``grace`` seconds with exit code 130 and
    ``last_line`` (if given) as the last line on stdout. Install it in the main thread."""

    def __init__(self, last_line: str | None, grace: float = STOP_GRACE_S):
        self.last_line, self.grace = last_line, grace
        self._tripped = threading.Event()

    def install(self) -> InterruptGuard:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started with SIGINT ignored (nohup, `&`): leave it so
            return self
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        try:
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread: the Python-level handler below still arms the watchdog
            reader.close()
            writer.close()
        else:
            self._wakeup = (reader, writer)  # kept open as long as the guard lives
            threading.Thread(target=self._read_signals, args=(reader,), name="cdi-ray-sigint-wakeup",
                             daemon=True).start()

        def on_sigint(signum, frame):
            self._tripped.set()
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)
        threading.Thread(target=self._watch, name="cdi-ray-sigint-watchdog", daemon=True).start()
        return self

    def _read_signals(self, reader: socket.socket) -> None:
        """The wakeup socket receives each signal's number from C, even while the main thread is
        stuck in native code and cannot run Python-level handlers."""
        while data := reader.recv(64):
            if signal.SIGINT in data:
                self._tripped.set()

    def _watch(self) -> None:
        self._tripped.wait()
        time.sleep(self.grace)
        # the clean stop has not ended the process in time: end it here, without Ray's shutdown (the
        # cluster ends this driver's tasks and actors when its connection drops). The lock waits for
        # a clean ending that is already printing.
        with _ENDING:
            if self.last_line is not None:
                os.write(1, (self.last_line + "\n").encode())
            os._exit(EXIT_INTERRUPTED)


def run_job(main: Callable[[object], dict], args, name: str) -> NoReturn:
    """A job's ``__main__``: ``main(args)`` returns a summary dict with ``exit_code`` (and
    ``error``); it is printed as JSON, the last line on stdout, and the process exits with its code.
    Ctrl-C gives exit 130 and the interrupted summary within :data:`STOP_GRACE_S` (plus Ray's
    shutdown); an unexpected exception is logged and gives exit 1."""
    InterruptGuard(json.dumps(interrupted_summary())).install()
    try:
        result = main(args)
    except KeyboardInterrupt:  # the streams were stopped (cdi_ray.pipeline.compute); stored features stay
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
        from cdi_ray import console

        console.silence_ray_shutdown()
        result = interrupted_summary()
    except Exception:  # noqa: BLE001
        logging.getLogger(name).exception("internal error")
        result = {"exit_code": EXIT_INTERNAL, "error": "internal error (see the log above)"}
    if result.get("error"):
        print(result["error"], file=sys.stderr)
    exit_process(result["exit_code"], last_line=json.dumps(result, default=str))

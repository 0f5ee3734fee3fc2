"""Run a file of dataset-owner requests: one deliverable per owner, a status ledger, the rejected rows.

Locally (starts a local Ray when no cluster address is set)::

    python jobs/requests.py examples/requests/requests.csv --models examples/requests/registry.yaml --out /tmp/req

Unchanged on a running cluster (``ray job submit`` sets RAY_ADDRESS for the driver)::

    ray job submit --working-dir . -- python jobs/requests.py s3://…/requests.csv --models registry.yaml --out s3://…/

Writes ``<out>/requests/<request_id>/`` per owner (report, results, evidence, their feature rows),
``<out>/requests.parquet`` (one row per request: done / failed with reason / rejected),
``<out>/rejected.csv`` and ``<out>/index.html``. Re-running the same file recomputes only what
failed, is new or changed. README "Bulk requests".

Exit codes (as jobs/audit.py): 0 every request done; 3 partial failure (rows rejected or requests
failed — recorded with their reason — the rest completed); 2 invalid input (unreadable requests
file or registry); 1 internal error. The last line on stdout is a JSON summary (with the driver's
peak memory).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys

if __name__ == "requests":
    # This file is named like the `requests` library, and `python jobs/<any>.py` puts jobs/ first on
    # the import path, so another job's `import requests` (Ray's job client does one) lands here.
    # Hand that import the library instead: load it with jobs/ off the path and take its place.
    import importlib

    _here, _path = os.path.dirname(os.path.abspath(__file__)), sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    del sys.modules["requests"]
    try:
        sys.modules["requests"] = importlib.import_module("requests")
    finally:
        sys.path[:] = _path

from cdi_ray.exits import EXIT_INVALID


def parse_args(argv=None) -> argparse.Namespace:
    from cdi_ray.requests.commands import add_request_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Exit codes: 0 done, 3 partial failure, 2 invalid input, 1 internal error.")
    add_request_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=1, help="more log detail")
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(args: argparse.Namespace) -> dict:
    from cdi_ray.requests.commands import run_requests_args
    from cdi_ray.requests.intake import IntakeError

    try:
        res = run_requests_args(args)
    except IntakeError as exc:
        return {"exit_code": EXIT_INVALID, "error": str(exc)}
    return {**res.summary, "driver_peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    args = parse_args()
    from cdi_ray import console
    from cdi_ray.exits import run_job

    console.configure(args.verbose)
    run_job(main, args, "jobs.requests")

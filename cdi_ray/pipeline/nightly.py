"""Nightly re-audit of a standing manifest: dated results plus a diff against the night before.

Layout under the nightly root (default: the manifest's ``output``)::

    <root>/features/                 the feature store shared by every night (unless the manifest
                                     names its own ``feature_store``)
    <root>/<YYYY-MM-DD>/results.json results.parquet images.parquet   (as ``run_manifest`` writes)
    <root>/<YYYY-MM-DD>/diff.json    diff.md                           against the latest earlier night
    <root>/<YYYY-MM-DD>/sequential/<audit_id>.json                     each standing audit's life-long state

Because the store is shared and keyed by content, a night computes features only for images and
models that are new since the last night; everything else is read back.

Every audit of a nightly run is a *standing* audit: its ``used`` is decided by the life-long rule
(:mod:`cdi_ray.pipeline.standing`, docs/VERDICTS.md §5), which keeps the chance of a false
``used`` on any night ≤ the audit's α however many nights it runs; a night that brings no new
images takes no look and spends no α.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone

from cdi_ray import storage
from cdi_ray.pipeline.results import (DIFF_JSON, DIFF_MD, RESULTS_JSON, diff_markdown, diff_results, read_results,
                                     write_index)
from cdi_ray.pipeline.standing import carry_forward, standing_audits
from cdi_ray.spec import Manifest

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")


def complete(night_dir: str) -> bool:
    """Whether a night finished: its ``results.json`` (written last) exists."""
    return DATE.match(storage.basename(night_dir)) is not None and storage.exists(storage.join(night_dir, RESULTS_JSON))


def previous_night(root: str, date: str) -> str | None:
    """The latest ``<root>/<date'>`` with ``date' < date`` that holds a complete ``results.json``."""
    for name in reversed(storage.list_subdirs(root)):
        if name < date and complete(storage.join(root, name)):
            return storage.join(root, name)
    return None


def run_nightly(manifest: Manifest, *, date: str | None = None, root: str | None = None,
                feature_store: str | None = None, **run_kwargs) -> dict:
    """Run the manifest into ``<root>/<date>/`` and diff against the previous night.

    Returns:
        ``{"output", "previous", "summary", "diff", "exit_code", "run"}``.
    """
    from cdi_ray.pipeline.run import run_manifest

    date = date or today()
    if not DATE.match(date):
        raise ValueError(f"date must be YYYY-MM-DD, got {date!r}")
    root = root or manifest.output
    out = storage.join(root, date)
    store = feature_store or manifest.feature_store or storage.join(root, "features")
    prev_dir = previous_night(root, date)
    standing = standing_audits(manifest, root, date, out, complete)
    batch = run_manifest(manifest, out, feature_store=store, standing=standing, **run_kwargs)
    carry_forward(standing, {a["audit_id"] for a in batch.audits if "sequential" in a})
    previous = read_results(prev_dir) if prev_dir else None
    diff = diff_results(previous, batch.to_dict())
    storage.atomic_write_bytes(storage.join(out, DIFF_JSON), json.dumps(diff, indent=2).encode())
    storage.atomic_write_bytes(storage.join(out, DIFF_MD), diff_markdown(diff).encode())
    write_index(out, batch.to_dict(), diff)  # the index page with the night's diff view
    return {"output": out, "previous": prev_dir, "summary": batch.summary, "diff": diff,
            "exit_code": batch.exit_code, "run": batch.run}

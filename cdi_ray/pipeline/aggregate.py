"""Aggregation: per audit, gather P and U feature rows, run the calibrated test.

Audits are grouped by their store partition (model fingerprint, config) and a group goes to one
aggregator actor, which reads that partition from the feature store *once* (only the rows the
group needs) and then runs every audit in it. Reading from the store — not from the stream —
is what makes "exactly once" hold: rows are keyed by content hash and de-duplicated on read,
so a retried feature task that wrote its batch twice cannot count an image twice, and a P or U
set that names the same bytes under two URIs contributes them once.

Per audit:

1. P and U as sets of content hashes (first URI per hash kept; later ones are listed as
   ``duplicate_content``); a hash in both P and U is dropped from both (``in_both_sets``) —
   it is evidence for neither side;
2. rows missing from the store, or stored as decode errors, are listed with their reason;
3. ``cdi_ray.stats.run_test`` on the remaining (n_P, k) and (n_U, k) matrices.

Any exception in an audit fails that audit alone. The verdict is decided later, on the driver,
after the batch's FDR adjustment (it needs every audit's p-value).
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdi_ray.pipeline.store import STATUS_OK, FeatureStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRef:
    """One listed image of an audit: its URI, its content hash (None if it could not be read) and why not."""

    uri: str
    content_hash: str | None
    reason: str | None = None


@dataclass(frozen=True)
class AuditJob:
    """What an aggregator needs to run one audit."""

    audit_id: str
    published: tuple[ImageRef, ...]
    unpublished: tuple[ImageRef, ...]
    procedure: str
    alpha: float
    seed: int
    options: dict = field(default_factory=dict)


@dataclass
class AuditOutcome:
    """The aggregator's answer for one audit (the verdict is added after FDR)."""

    audit_id: str
    status: str  # "done" | "failed"
    result: Any = None  # cdi_ray.stats.TestResult
    n_published: int = 0
    n_unpublished: int = 0
    error: str | None = None
    unusable: list[dict] = field(default_factory=list)


def _select(refs: tuple[ImageRef, ...], which: str, unusable: list[dict]) -> dict[str, ImageRef]:
    """``content hash → first ImageRef`` for readable images; the rest go to ``unusable``."""
    out: dict[str, ImageRef] = {}
    for r in refs:
        if r.content_hash is None:
            unusable.append({"set": which, "uri": r.uri, "content_hash": None, "reason": r.reason or "unreadable"})
        elif r.content_hash in out:
            unusable.append({"set": which, "uri": r.uri, "content_hash": r.content_hash,
                             "reason": f"duplicate_content: same bytes as {out[r.content_hash].uri}"})
        else:
            out[r.content_hash] = r
    return out


def gather(job: AuditJob, rows: dict[str, int], status: list[str], errors: list[str | None], matrix: np.ndarray):
    """Steps 1–2: the P and U feature matrices of one audit, and its unusable images."""
    unusable: list[dict] = []
    P = _select(job.published, "published", unusable)
    U = _select(job.unpublished, "unpublished", unusable)
    both = sorted(set(P) & set(U))
    for h in both:
        for which, side in (("published", P), ("unpublished", U)):
            unusable.append({"set": which, "uri": side.pop(h).uri, "content_hash": h,
                             "reason": "in_both_sets: the same image is listed as published and unpublished"})
    picked = {}
    for which, side in (("published", P), ("unpublished", U)):
        keep = []
        for h, ref in side.items():
            i = rows.get(h)
            if i is None:
                reason = ref.reason or "features_missing: not in the feature store"
                unusable.append({"set": which, "uri": ref.uri, "content_hash": h, "reason": reason})
            elif status[i] != STATUS_OK:
                unusable.append({"set": which, "uri": ref.uri, "content_hash": h, "reason": errors[i] or "failed"})
            else:
                keep.append(i)
        picked[which] = matrix[np.asarray(keep, dtype=np.int64)] if keep else matrix[:0]
    unusable.sort(key=lambda d: (d["set"], d["uri"]))
    return picked["published"], picked["unpublished"], unusable


class AuditAggregator:
    """Runs groups of audits that share a store partition (wrapped as a Ray actor by ``run.py``)."""

    def run_group(self, store_root: str, fingerprint: str, key: str, columns: list[str], jobs: list[AuditJob]) -> list[AuditOutcome]:
        """Read the partition's rows the group needs once, then run each audit on them."""
        needed = {r.content_hash for j in jobs for r in (*j.published, *j.unpublished) if r.content_hash}
        try:
            table = FeatureStore(store_root).read(fingerprint, key, needed)
        except Exception as exc:  # noqa: BLE001 — the whole group fails, with its reason
            msg = f"cannot read features from the store: {type(exc).__name__}: {exc}"
            return [AuditOutcome(j.audit_id, "failed", error=msg) for j in jobs]
        if table is None:
            rows, status, errors, matrix = {}, [], [], np.zeros((0, len(columns)))
        else:
            hashes = table.column("content_hash").to_pylist()
            rows = {h: i for i, h in enumerate(hashes)}
            status = table.column("status").to_pylist()
            errors = table.column("error").to_pylist()
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                msg = f"stored features lack columns {missing}"
                return [AuditOutcome(j.audit_id, "failed", error=msg) for j in jobs]
            matrix = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in columns]).astype(np.float64)
        return [self._run_one(j, rows, status, errors, matrix) for j in jobs]

    def _run_one(self, job: AuditJob, rows, status, errors, matrix) -> AuditOutcome:
        from cdi_ray.stats import run_test

        try:
            P, U, unusable = gather(job, rows, status, errors, matrix)
        except Exception as exc:  # noqa: BLE001
            return AuditOutcome(job.audit_id, "failed", error=f"{type(exc).__name__}: {exc}")
        out = AuditOutcome(job.audit_id, "failed", n_published=len(P), n_unpublished=len(U), unusable=unusable)
        try:
            out.result = run_test(P, U, procedure=job.procedure, alpha=job.alpha, seed=job.seed, **job.options)
            out.status = "done"
        except Exception as exc:  # noqa: BLE001 — one audit's failure never stops the others
            out.error = f"{type(exc).__name__}: {exc}"
            log.debug("audit %s failed:\n%s", job.audit_id, traceback.format_exc())
        return out

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
3. ``cdi_ray.stats.run_test`` on the remaining (n_P, k) and (n_U, k) matrices;
4. the distribution-shift controls the audit asks for (on by default): the model-free control
   (:func:`cdi_ray.controls.model_free_control`) on the stored descriptors of the *same* images,
   read from the store's descriptor partition of the model's preprocessing geometry.

Any exception in an audit fails that audit alone. The verdict is decided later, on the driver,
after the batch's FDR adjustment (it needs every audit's p-value).
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field, replace
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
    #: ``{"model_free": {"alpha": 0.05}}`` — controls to run (empty: none).
    controls: dict = field(default_factory=dict)
    #: store key of the descriptor partition (the model's preprocessing geometry).
    descriptor_key: str | None = None


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
    controls: list = field(default_factory=list)  # cdi_ray.controls.ControlResult


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


def select_rows(job: AuditJob, rows: dict[str, int], status: list[str], errors: list[str | None]):
    """Steps 1–2: ``(P hashes, U hashes, unusable)`` — the usable images of each side, in listing order."""
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
                keep.append(h)
        picked[which] = keep
    unusable.sort(key=lambda d: (d["set"], d["uri"]))
    return picked["published"], picked["unpublished"], unusable


def _matrix(hashes: list[str], rows: dict[str, int], matrix: np.ndarray) -> np.ndarray:
    return matrix[np.asarray([rows[h] for h in hashes], dtype=np.int64)] if hashes else matrix[:0]


def gather(job: AuditJob, rows: dict[str, int], status: list[str], errors: list[str | None], matrix: np.ndarray):
    """Steps 1–2: the P and U feature matrices of one audit, and its unusable images."""
    hp, hu, unusable = select_rows(job, rows, status, errors)
    return _matrix(hp, rows, matrix), _matrix(hu, rows, matrix), unusable


def _table_rows(table, columns: list[str]):
    """``(hash → row, status, errors, matrix)`` of a store table (None → empty)."""
    if table is None:
        return {}, [], [], np.zeros((0, len(columns)))
    hashes = table.column("content_hash").to_pylist()
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"stored rows lack columns {missing}")
    matrix = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in columns]).astype(np.float64)
    return ({h: i for i, h in enumerate(hashes)}, table.column("status").to_pylist(),
            table.column("error").to_pylist(), matrix)


def run_controls(job: AuditJob, hp: list[str], hu: list[str], descriptors) -> list:
    """Step 4: the audit's controls on the images the main test used (``descriptors`` from :func:`_table_rows`)."""
    from cdi_ray.controls.model_free import MODEL_FREE, ControlResult, control_seed, model_free_control

    out = []
    cfg = job.controls.get("model_free")
    if cfg is not None:
        alpha = float(cfg.get("alpha", 0.05))
        if descriptors is None:
            out.append(ControlResult(MODEL_FREE, True, None, alpha, "the model-free control could not be run (the "
                                     "image descriptors could not be read), so a distribution shift between the "
                                     "published and unpublished images cannot be ruled out"))
        else:
            rows, status, _, matrix = descriptors
            ok = lambda h: h in rows and status[rows[h]] == STATUS_OK  # noqa: E731
            dp, du = [h for h in hp if ok(h)], [h for h in hu if ok(h)]
            res = model_free_control(_matrix(dp, rows, matrix), _matrix(du, rows, matrix), alpha=alpha,
                                     seed=control_seed(job.seed, MODEL_FREE))
            lost = (len(hp) - len(dp)) + (len(hu) - len(du))
            if lost:
                res = replace(res, reason=res.reason + f" ({lost} image(s) without descriptors were left out of "
                                                       f"the control)")
            out.append(res)
    return out


class AuditAggregator:
    """Runs groups of audits that share a store partition (wrapped as a Ray actor by ``run.py``)."""

    def run_group(self, store_root: str, fingerprint: str, key: str, columns: list[str], jobs: list[AuditJob]) -> list[AuditOutcome]:
        """Read the partition's rows the group needs once (and its descriptors), then run each audit on them."""
        from cdi_ray.controls.descriptors import DESCRIPTOR_NAMES
        from cdi_ray.pipeline.actors import DESCRIPTOR_PARTITION

        needed = {r.content_hash for j in jobs for r in (*j.published, *j.unpublished) if r.content_hash}
        store = FeatureStore(store_root)
        try:
            features = _table_rows(store.read(fingerprint, key, needed), columns)
        except Exception as exc:  # noqa: BLE001 — the whole group fails, with its reason
            msg = f"cannot read features from the store: {type(exc).__name__}: {exc}"
            return [AuditOutcome(j.audit_id, "failed", error=msg) for j in jobs]
        descriptors: dict[str, Any] = {}
        for dk in sorted({j.descriptor_key for j in jobs if j.controls and j.descriptor_key}):
            want = {r.content_hash for j in jobs if j.descriptor_key == dk
                    for r in (*j.published, *j.unpublished) if r.content_hash}
            try:
                descriptors[dk] = _table_rows(store.read(DESCRIPTOR_PARTITION, dk, want), list(DESCRIPTOR_NAMES))
            except Exception as exc:  # noqa: BLE001 — the controls of these audits then count as fired
                log.warning("cannot read descriptors %s: %s", dk, exc)
                descriptors[dk] = None
        return [self._run_one(j, *features, descriptors.get(j.descriptor_key)) for j in jobs]

    def _run_one(self, job: AuditJob, rows, status, errors, matrix, descriptors=None) -> AuditOutcome:
        from cdi_ray.stats import run_test

        try:
            hp, hu, unusable = select_rows(job, rows, status, errors)
            P, U = _matrix(hp, rows, matrix), _matrix(hu, rows, matrix)
        except Exception as exc:  # noqa: BLE001
            return AuditOutcome(job.audit_id, "failed", error=f"{type(exc).__name__}: {exc}")
        out = AuditOutcome(job.audit_id, "failed", n_published=len(P), n_unpublished=len(U), unusable=unusable)
        try:
            out.result = run_test(P, U, procedure=job.procedure, alpha=job.alpha, seed=job.seed, **job.options)
            out.controls = run_controls(job, hp, hu, descriptors)
            out.status = "done"
        except Exception as exc:  # noqa: BLE001 — one audit's failure never stops the others
            out.error = f"{type(exc).__name__}: {exc}"
            log.debug("audit %s failed:\n%s", job.audit_id, traceback.format_exc())
        return out

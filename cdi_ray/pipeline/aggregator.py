"""The aggregator actor: per audit run, gather P and U feature rows, run the calibrated test.

Stage 6 (:mod:`cdi_ray.pipeline.aggregate`) sends each planned run — an audit's own test, or its
reference control's re-run, a typed :class:`~cdi_ray.pipeline.plan.Role` — as an
:class:`AuditTask` that says where its images are, not what they are. Tasks are grouped by their
store partition (model fingerprint, config) and a group goes to one aggregator actor, which reads that partition from the feature store *once* (only the rows the
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
   read from the store's descriptor partition of the model's preprocessing geometry;
5. for a standing audit re-tested every night, its life-long look, whose state is stored
   before the audit counts as done (:mod:`cdi_ray.pipeline.standing`);
6. for the audit's own run, the report payload (:mod:`cdi_ray.pipeline.payload`).

Any exception in an audit fails that audit alone. Ray-free: the pipeline wraps
:class:`AuditAggregator` as an actor (:func:`cdi_ray.pipeline.cluster.actor_pool`).
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cdi_ray import storage
from cdi_ray.pipeline.imagesets import ImageSet
from cdi_ray.pipeline.payload import report_payload
from cdi_ray.pipeline.plan import Role
from cdi_ray.pipeline.store import DESCRIPTOR_PARTITION, STATUS_OK, FeatureStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageRef:
    """One listed image of an audit: its URI, its content hash (None if it could not be read) and why
    not, and its store key under the audit's model (default: the content hash; for conditional models
    the key of (content, conditioning), :mod:`cdi_ray.conditioning`). Duplicates and P∩U are decided
    by content; features are looked up by key."""

    uri: str
    content_hash: str | None
    reason: str | None = None
    key: str | None = None

    @property
    def store_key(self) -> str | None:
        return self.key or self.content_hash


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
    #: ``(reference fingerprint, its config key)``: test on target minus reference features.
    calibration: tuple[str, str] | None = None
    #: ``(target store key, reference store key)`` of images whose keys differ between the two models.
    calibration_keys: tuple[tuple[str, str], ...] = ()
    #: the audit's own test (its report is made) or a control's run of it.
    role: Role = Role.AUDIT
    #: a standing audit's nightly look (:class:`cdi_ray.pipeline.standing.StandingAudit`); None: a plain run.
    standing: Any = None


@dataclass(frozen=True)
class AuditTask:
    """One run of an audit as it is sent to an aggregator: where its images are (per audit, never per image)."""

    audit_id: str
    role: Role
    published: ImageSet
    unpublished: ImageSet
    procedure: str
    alpha: float
    seed: int
    options: dict = field(default_factory=dict)
    controls: dict = field(default_factory=dict)
    descriptor_key: str | None = None
    #: ``(reference fingerprint, its config key)`` and the reference run's image sets (reference calibration).
    calibration: tuple[str, str] | None = None
    calibration_sets: tuple[ImageSet, ImageSet] | None = None
    standing: Any = None


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
    #: :func:`cdi_ray.pipeline.payload.report_payload` (JSON-safe; None for a failed audit).
    report: dict | None = None
    role: Role = Role.AUDIT
    #: a standing audit's life-long decision (:class:`cdi_ray.pipeline.standing.NightlyLook`).
    sequential: Any = None


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


def overlap_problem(n_published: int, n_unpublished: int, unusable: list[dict]) -> str | None:
    """Why an audit cannot run when a side is empty because its images are all in the other set too
    (``in_both_sets``) — the manifest names the same images twice; None otherwise."""
    both = {d["content_hash"] for d in unusable if d["reason"].startswith("in_both_sets")}
    empty = [side for side, n in (("published", n_published), ("unpublished", n_unpublished)) if n == 0]
    if not both or not empty:
        return None
    if len(empty) == 2:
        what = f"every image was in both sets: the {len(both)} usable image(s) of published and unpublished are the same"
    else:
        what = f"every usable {empty[0]} image is also in the other set ({len(both)} image(s) in both sets)"
    return (f"{what} — an image in both sets is evidence for neither side and is dropped from both, leaving nothing "
            "to compare; check that published and unpublished name different collections")


def rows_by_content(job: AuditJob, rows: dict[str, int]) -> dict[str, int]:
    """``content hash → store row`` of one audit (store rows are by key; the first listing of a
    content wins, as in :func:`select_rows`)."""
    out: dict[str, int] = {}
    for r in (*job.published, *job.unpublished):
        if r.content_hash and r.content_hash not in out and r.store_key in rows:
            out[r.content_hash] = rows[r.store_key]
    return out


def _matrix(hashes: list[str], rows: dict[str, int], matrix: np.ndarray) -> np.ndarray:
    return matrix[np.asarray([rows[h] for h in hashes], dtype=np.int64)] if hashes else matrix[:0]


def gather(job: AuditJob, rows: dict[str, int], status: list[str], errors: list[str | None], matrix: np.ndarray):
    """Steps 1–2: the P and U feature matrices of one audit, and its unusable images."""
    rows = rows_by_content(job, rows)
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


def calibrated_rows(target, reference, key_map: dict[str, str] | None = None, only: set[str] | None = None):
    """Reference-calibrated rows: target minus reference features of the same image.

    Both tables and the result are :func:`_table_rows` tuples keyed by store key. ``key_map``
    maps a target key to the reference's key of the same image where they differ (conditional
    models whose label or caption keys differ between the two); ``only`` limits the result to
    those target keys. An image is usable only if both models' rows are ok; otherwise the reason
    names which side failed.
    """
    rows_t, status_t, errors_t, m_t = target
    rows_r, status_r, errors_r, m_r = reference
    key_map = key_map or {}
    keys = list(rows_t) if only is None else sorted(k for k in only if k in rows_t)  # the job's, not the group's
    status, errors = [], []
    matrix = np.zeros((len(keys), m_t.shape[1]))
    for i, k in enumerate(keys):
        it, ir = rows_t[k], rows_r.get(key_map.get(k, k))
        if status_t[it] != STATUS_OK:
            status.append(status_t[it]), errors.append(errors_t[it])
        elif ir is None:
            status.append("error"), errors.append("reference_features_missing: not in the feature store for the reference model")
        elif status_r[ir] != STATUS_OK:
            status.append(status_r[ir]), errors.append(f"reference model: {errors_r[ir] or 'failed'}")
        else:
            status.append(STATUS_OK), errors.append(None)
            matrix[i] = m_t[it] - m_r[ir]
    return {k: i for i, k in enumerate(keys)}, status, errors, matrix


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


class _Reader:
    """The run's files an aggregator reads, each once per group (audits share sources)."""

    def __init__(self, transient_dir: str | None):
        self.tables: dict[str, Any] = {}
        self.transient: dict[str, str] = {}
        if transient_dir:
            try:
                for e in storage.iter_files(transient_dir):
                    t = storage.read_parquet(e.uri)
                    self.transient.update(zip(t.column("key").to_pylist(), t.column("reason").to_pylist()))
            except FileNotFoundError:
                pass

    def column(self, uri: str, name: str) -> list:
        if uri not in self.tables:
            self.tables[uri] = storage.read_parquet(uri)
        return self.tables[uri].column(name).to_pylist()

    def refs(self, images: ImageSet) -> tuple[ImageRef, ...]:
        """One side of a run as image references: (uri, content hash or why none, store key)."""
        hashes = self.column(images.images, "content_hash")
        keys = self.column(images.keys, "key") if images.keys else hashes
        return tuple(ImageRef(u, h, (why or "unreadable") if h is None else self.transient.get(k), k)
                     for u, h, why, k in zip(self.column(images.images, "uri"), hashes,
                                             self.column(images.images, "reason"), keys))

    def job(self, task: AuditTask) -> AuditJob:
        published, unpublished = self.refs(task.published), self.refs(task.unpublished)
        pairs: tuple = ()
        if task.calibration_sets:  # pair each image's rows across the two models by their own store keys
            theirs = (*self.refs(task.calibration_sets[0]), *self.refs(task.calibration_sets[1]))
            pairs = tuple((t.store_key, r.store_key) for t, r in zip((*published, *unpublished), theirs)
                          if t.content_hash and t.store_key != r.store_key)
        return AuditJob(task.audit_id, published, unpublished, task.procedure, task.alpha, task.seed, dict(task.options),
                        controls=dict(task.controls), descriptor_key=task.descriptor_key, calibration=task.calibration,
                        calibration_keys=pairs, role=task.role, standing=task.standing)


def read_jobs(tasks: list[AuditTask], transient_dir: str | None = None) -> list[AuditJob]:
    """The jobs of ``tasks``: each side's images read from the run's files, in listing order
    (what an aggregator runs; the requests job keeps them as each test's evidence)."""
    reader = _Reader(transient_dir)
    return [reader.job(t) for t in tasks]


class AuditAggregator:
    """Runs groups of audit runs that share a store partition (a Ray actor: :func:`cdi_ray.pipeline.cluster.actor_pool`)."""

    def warm_up(self) -> None:
        """Import the statistics stack (SciPy, scikit-learn: seconds) before the first group arrives;
        called while the features are computed."""
        import cdi_ray.stats  # noqa: F401

    def run_tasks(self, store_root: str, fingerprint: str, key: str, columns: list[str], tasks: list[AuditTask],
                  transient_dir: str | None = None) -> list[AuditOutcome]:
        """Read each task's images from the run's files, then :meth:`run_group`."""
        try:
            jobs = read_jobs(tasks, transient_dir)
        except Exception as exc:  # noqa: BLE001 — the whole group fails, with its reason
            msg = f"cannot read the run's image lists: {type(exc).__name__}: {exc}"
            return [AuditOutcome(t.audit_id, "failed", error=msg, role=t.role) for t in tasks]
        return self.run_group(store_root, fingerprint, key, columns, jobs)

    def run_group(self, store_root: str, fingerprint: str, key: str, columns: list[str], jobs: list[AuditJob]) -> list[AuditOutcome]:
        """Read the partition's rows the group needs once (and its descriptors), then run each audit on them."""
        from cdi_ray.controls.descriptors import DESCRIPTOR_NAMES

        needed = {r.store_key for j in jobs for r in (*j.published, *j.unpublished) if r.content_hash}
        store = FeatureStore(store_root)
        try:
            features = _table_rows(store.read(fingerprint, key, needed), columns)
        except Exception as exc:  # noqa: BLE001 — the whole group fails, with its reason
            msg = f"cannot read features from the store: {type(exc).__name__}: {exc}"
            return [AuditOutcome(j.audit_id, "failed", error=msg, role=j.role) for j in jobs]
        descriptors: dict[str, Any] = {}
        for dk in sorted({j.descriptor_key for j in jobs if j.controls and j.descriptor_key}):
            want = {r.content_hash for j in jobs if j.descriptor_key == dk
                    for r in (*j.published, *j.unpublished) if r.content_hash}
            try:
                descriptors[dk] = _table_rows(store.read(DESCRIPTOR_PARTITION, dk, want), list(DESCRIPTOR_NAMES))
            except Exception as exc:  # noqa: BLE001 — the controls of these audits then count as fired
                log.warning("cannot read descriptors %s: %s", dk, exc)
                descriptors[dk] = None
        references: dict[tuple[str, str], Any] = {}
        for cal in sorted({j.calibration for j in jobs if j.calibration}):
            want = {dict(j.calibration_keys).get(r.store_key, r.store_key) for j in jobs if j.calibration == cal
                    for r in (*j.published, *j.unpublished) if r.content_hash}
            try:
                references[cal] = _table_rows(store.read(*cal, want), columns)
            except Exception as exc:  # noqa: BLE001 — these audits fail, the others go on
                references[cal] = f"cannot read the reference model's features: {type(exc).__name__}: {exc}"
        outcomes = []
        for j in jobs:
            rows = features
            if j.calibration:
                ref = references[j.calibration]
                if isinstance(ref, str):
                    outcomes.append(AuditOutcome(j.audit_id, "failed", error=ref, role=j.role))
                    continue
                mine = {r.store_key for r in (*j.published, *j.unpublished) if r.content_hash}
                rows = calibrated_rows(features, ref, dict(j.calibration_keys), only=mine)
            outcomes.append(self._run_one(j, *rows, descriptors.get(j.descriptor_key), columns=columns))
        return outcomes

    def _run_one(self, job: AuditJob, rows, status, errors, matrix, descriptors=None, *,
                 columns: list[str] | None = None) -> AuditOutcome:
        from cdi_ray.stats import run_test

        try:
            rows = rows_by_content(job, rows)
            hp, hu, unusable = select_rows(job, rows, status, errors)
            P, U = _matrix(hp, rows, matrix), _matrix(hu, rows, matrix)
        except Exception as exc:  # noqa: BLE001
            return AuditOutcome(job.audit_id, "failed", error=f"{type(exc).__name__}: {exc}", role=job.role)
        out = AuditOutcome(job.audit_id, "failed", n_published=len(P), n_unpublished=len(U), unusable=unusable,
                           role=job.role)
        overlap = overlap_problem(len(P), len(U), unusable)
        if overlap:
            out.error = overlap
            return out
        try:
            out.result = run_test(P, U, procedure=job.procedure, alpha=job.alpha, seed=job.seed, **job.options)
            out.controls = run_controls(job, hp, hu, descriptors)
            if job.standing is not None and job.role is Role.AUDIT:  # no verdict without its stored state
                from cdi_ray.pipeline.standing import take_look

                out.sequential = take_look(job.standing, P, U, hp, hu)
            out.status = "done"
        except Exception as exc:  # noqa: BLE001 — one audit's failure never stops the others
            out.error = f"{type(exc).__name__}: {exc}"
            log.debug("audit %s failed:\n%s", job.audit_id, traceback.format_exc())
            return out
        if job.role is not Role.AUDIT:  # a control's run: its result is its audit's control, not a report
            return out
        try:
            cols = list(columns) if columns is not None else [f"f{j}" for j in range(P.shape[1])]
            out.report = report_payload(P, U, hp, hu, cols, out.result, procedure=job.procedure, alpha=job.alpha,
                                        seed=job.seed, options=dict(job.options))
        except Exception as exc:  # noqa: BLE001 — a report that cannot be made never changes the verdict
            log.warning("audit %s: report payload failed: %s", job.audit_id, exc)
            out.report = {"error": f"{type(exc).__name__}: {exc}"}
        return out

"""The requests job's conductor over the pipeline's stages: a manifest of requests → one record per audit.

:func:`run_audits` calls the same stages as :func:`cdi_ray.pipeline.run.run_manifest` — listing,
describe, hashing and planning (:func:`~cdi_ray.pipeline.run.plan_stages`), compute, aggregate,
and the results entries (:func:`~cdi_ray.pipeline.results.collect_results`) — and stops before the
batch's files: the manifest uses ``fdr: none`` and each owner's family is corrected afterwards
(:mod:`cdi_ray.requests.family`), so batch files with uncorrected verdicts are never written. Per
audit it returns the audit document (entry, report payload, provenance — schema
``cdi-ray/audit/v1``, built by the pipeline's own functions) and, through :class:`TestIndex`, the
test each run made: the store partition and the :class:`~cdi_ray.pipeline.aggregator.AuditJob`
the aggregator ran (the evidence ``cdi-ray verify`` re-runs).

The run's folder (listings, hashes, plan, work files) is ``<out>/plan/`` as in the pipeline; it is
emptied first, since the requests job re-runs into the same ``out``.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field

from cdi_ray import storage
from cdi_ray.requests.evidence import TestRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditRecord:
    """One audit as the pipeline left it, before the owner's family correction."""

    audit_id: str
    document: dict  #: the audit document (entry, report payload, provenance), as the pipeline writes it

    @property
    def entry(self) -> dict:
        return self.document["audit"]


class TestIndex:
    """Where each audit's runs are (per audit, never per image); :meth:`records` reads their image
    lists from the run's files on demand, so the driver holds the jobs of one chunk of requests."""

    __test__ = False  # not a pytest class

    def __init__(self, tasks, transient_dir: str):
        self.transient_dir = transient_dir
        self._where = {(t.audit_id, t.role): (group, tuple(tasks.columns[group]), t)
                       for group, ts in tasks.groups.items() for t in ts}

    def records(self, audit_ids) -> dict[str, tuple[TestRecord | None, TestRecord | None]]:
        """``audit id → (its own test, its reference-model run)`` (None where there was none)."""
        from cdi_ray.pipeline.aggregator import read_jobs
        from cdi_ray.pipeline.plan import Role

        wanted = [(aid, role) for aid in audit_ids for role in (Role.AUDIT, Role.REFERENCE) if (aid, role) in self._where]
        jobs = read_jobs([self._where[w][2] for w in wanted], self.transient_dir)
        found = {}
        for (aid, role), job in zip(wanted, jobs):
            (fingerprint, key), columns, _ = self._where[(aid, role)]
            found[(aid, role)] = TestRecord(fingerprint, key, columns, job)
        return {aid: (found.get((aid, Role.AUDIT)), found.get((aid, Role.REFERENCE))) for aid in audit_ids}


@dataclass
class EngineRun:
    """What one pipeline run produced for the requests job."""

    records: dict[str, AuditRecord]
    tests: TestIndex
    counters: dict = field(default_factory=dict)  #: the ``run`` section (features computed, timings …)


def _empty(folder: str) -> None:
    if not storage.is_remote(folder):
        shutil.rmtree(storage.local_path(folder), ignore_errors=True)
        return
    try:
        for f in list(storage.iter_files(folder)):
            storage.delete(f.uri)
    except FileNotFoundError:
        pass


def run_audits(manifest, *, out: str, feature_store: str, software: dict) -> EngineRun:
    """Run every audit of ``manifest`` (``fdr.method`` must be ``none``) against ``feature_store``.

    ``software``: :func:`cdi_ray.pipeline.results.software_versions` (for the provenance). The caller
    has connected to Ray (:func:`ensure_ray`).
    """
    from cdi_ray.pipeline import cluster
    from cdi_ray.pipeline.aggregate import aggregate, audit_tasks, start_aggregators
    from cdi_ray.pipeline.compute import compute_descriptors, compute_features
    from cdi_ray.pipeline.results import audit_document, collect_results, provenance
    from cdi_ray.pipeline.run import PLAN_DIR, Run, plan_stages

    if manifest.fdr.method != "none":
        raise ValueError("the requests job corrects per owner: expand requests with fdr.method none")
    run = Run(out, feature_store, storage.join(out, PLAN_DIR))
    _empty(run.folder)
    cluster.prefetch_imports()
    listings, models, hashed, plan = plan_stages(manifest, run)                        # 1–4
    start_aggregators(plan)
    features = compute_features(plan, manifest, run.store)                             # 5
    run.lap("compute")
    descriptors = compute_descriptors(plan, run.store)
    run.lap("descriptors")
    outcomes = aggregate(plan, manifest, features, run.store)                          # 6
    run.lap("aggregate")
    batch = collect_results(manifest, plan, models, features, descriptors, outcomes,   # 7 (entries only)
                            run.section(manifest, listings, hashed))
    records = {}
    for a, entry in zip(manifest.audits, batch.audits):
        prov = provenance(manifest, a, entry, plan.audits[a.id], models.infos.get(a.model), batch.run, software)
        records[a.id] = AuditRecord(a.id, audit_document(entry, fdr=batch.fdr, report=outcomes.outcomes[a.id].report,
                                                         provenance=prov))
    return EngineRun(records, TestIndex(audit_tasks(plan, manifest, features), plan.transient_dir), dict(batch.run))


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS``, else start a local Ray (the pipeline's rule)."""
    from cdi_ray.pipeline.cluster import ensure_ray as _ensure

    _ensure(address, num_cpus=num_cpus)

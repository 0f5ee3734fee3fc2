"""The one place the requests job runs the audit pipeline.

:func:`run_audits` takes the manifest the accepted requests expand into and returns, per audit,
what the pipeline decided *before* any multiple-testing correction (the manifest uses
``fdr: none``): the audit document (entry, report payload, provenance — schema
``cdi-ray/audit/v1``) and the test the aggregate stage ran (partition + job: the evidence
``cdi-ray verify`` re-runs). Everything about owners — the family correction, deliverables, the
ledger — happens after, on these records.

Today this calls :func:`cdi_ray.pipeline.run.run_manifest` into a scratch folder (its batch files
carry uncorrected per-audit verdicts, which no owner or operator should read, so they are
removed). When the pipeline is split into stages this function becomes listing → hashing →
planning → compute → aggregate, and nothing else in :mod:`cdi_ray.requests` changes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditRecord:
    """One audit as the pipeline left it."""

    audit_id: str
    document: dict  #: ``audits/<id>.json`` as written by the pipeline (entry, report, provenance)
    planned: Any = None  #: :class:`cdi_ray.pipeline.aggregate.PlannedTest` (None: never reached the test)
    shadow: Any = None  #: the reference-model control's re-run, if the audit has one

    @property
    def entry(self) -> dict:
        return self.document["audit"]


@dataclass
class EngineRun:
    """What one pipeline run produced for the requests job."""

    records: dict[str, AuditRecord]
    counters: dict = field(default_factory=dict)  #: the pipeline's ``run`` section (features computed, timings …)


def run_audits(manifest, *, feature_store: str) -> EngineRun:
    """Run every audit of ``manifest`` (``fdr.method`` must be ``none``) against ``feature_store``.

    The caller has connected to Ray (:func:`cdi_ray.pipeline.run.ensure_ray`).
    """
    from cdi_ray.pipeline.results import AUDITS_DIR
    from cdi_ray.pipeline.run import run_manifest

    if manifest.fdr.method != "none":
        raise ValueError("the requests job corrects per owner: expand requests with fdr.method none")
    scratch = tempfile.mkdtemp(prefix="cdi-ray-requests-")
    try:
        batch = run_manifest(manifest, scratch, feature_store=feature_store)
        records = {}
        for entry in batch.audits:
            aid = entry["audit_id"]
            path = os.path.join(scratch, AUDITS_DIR, f"{aid}.json")
            if os.path.exists(path):
                with open(path) as f:
                    document = json.load(f)
            else:  # the reports could not be written: the entry alone still decides
                log.warning("audit %s: no audit document; its deliverable has no plots", aid)
                document = {"schema": "cdi-ray/audit/v1", "audit": entry, "fdr": batch.fdr, "report": None,
                            "provenance": {}}
            records[aid] = AuditRecord(aid, document, batch.tests.get(aid), batch.tests.get(aid + "@reference"))
        return EngineRun(records, dict(batch.run))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS``, else start a local Ray (the pipeline's rule)."""
    from cdi_ray.pipeline.run import ensure_ray as _ensure

    _ensure(address, num_cpus=num_cpus)

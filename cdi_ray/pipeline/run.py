"""``run_manifest``: a whole batch of audits, from manifest to results files — one call per stage.

Read top to bottom, :func:`run_manifest` is the data flow; each stage takes and returns a typed
record and lives in a module of its own:

====  ==============================  ==================================  ====================
step  stage                           module                              record
====  ==============================  ==================================  ====================
1     list sources (+ index shards)   :mod:`~cdi_ray.pipeline.listing`    :class:`Listings`
2     describe models                 :mod:`~cdi_ray.pipeline.describe`   :class:`ModelInfos`
3     hash images                     :mod:`~cdi_ray.pipeline.hashing`    :class:`HashedImages`
4     plan (Ray-free)                 :mod:`~cdi_ray.pipeline.plan`       :class:`BatchPlan`
5     compute features, descriptors   :mod:`~cdi_ray.pipeline.compute`    :class:`FeatureCounts`
6     aggregate (tests, controls)     :mod:`~cdi_ray.pipeline.aggregate`  :class:`AuditOutcomes`
7     results, reports                :mod:`~cdi_ray.pipeline.results`    :class:`BatchResult`
====  ==============================  ==================================  ====================

Per-image work never runs in the driver: listing, hashing and planning run in Ray tasks, the
features in Ray Data streams, and they hand each other Parquet files in the run's folder
(``<output>/plan/``); the driver holds per-audit and per-model state only, so its memory does not
grow with the images (a batch small enough is aggregated in the driver: a few MB at most).
:func:`plan_manifest` runs steps 1–4 and stops: what would be computed, how much, on which models.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from cdi_ray import storage
from cdi_ray.pipeline import cluster, streams
from cdi_ray.pipeline.aggregate import MAX_AGGREGATORS, AuditOutcomes, aggregate, start_aggregators
from cdi_ray.pipeline.compute import MAX_CONCURRENT_MODELS, FeatureCounts, compute_descriptors, compute_features
from cdi_ray.pipeline.describe import ModelInfos, describe_models
from cdi_ray.pipeline.hashing import HashedImages, hash_images
from cdi_ray.pipeline.listing import Listings, list_sources
from cdi_ray.pipeline.plan import BatchPlan, audit_models, feature_setups, plan_batch
from cdi_ray.pipeline.results import BatchResult, collect_results, write_outputs
from cdi_ray.spec import Manifest

log = logging.getLogger(__name__)

#: The run's own folder under its output: listings, hash results, the plan, work files.
PLAN_DIR = "plan"


@dataclass
class Run:
    """Where a run reads and writes, and its clock."""

    output: str
    store: str
    folder: str
    started_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    t0: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    _lap: float = field(default_factory=time.time)

    @classmethod
    def of(cls, manifest: Manifest, out: str | None, feature_store: str | None) -> "Run":
        output = out or manifest.output
        return cls(output, feature_store or manifest.store_uri(output), storage.join(output, PLAN_DIR))

    def check_writable(self) -> None:
        """Probe the output and the feature store before anything is computed: a location that is a
        file, read-only or denied fails now (:class:`cdi_ray.storage.UnwritableLocation`), not after
        every feature was computed."""
        storage.probe_writable(self.output, "output")
        storage.probe_writable(self.store, "feature store")

    def lap(self, name: str) -> None:
        """Record the seconds since the previous lap as stage ``name``."""
        now = time.time()
        self.timings[name] = round(now - self._lap, 3)
        self._lap = now

    def section(self, manifest: Manifest, listings: Listings, hashed: HashedImages) -> dict:
        """The ``run`` section of ``results.json`` so far (stage 7 adds what was computed)."""
        return {"run_id": uuid.uuid4().hex, "output": self.output, "feature_store": self.store,
                "manifest_hash": manifest.content_hash(), "started_at": self.started_at,
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.time() - self.t0, 3), "timings": self.timings,
                "images": {**hashed.counts(), "shards": listings.shards}}


def plan_stages(manifest: Manifest, run: Run, rehash: bool = False) -> tuple[Listings, ModelInfos, HashedImages, BatchPlan]:
    """Steps 1–4 (the models are described while the sources are listed and hashed); also the first
    half of the requests job's conductor (:mod:`cdi_ray.requests.engine`)."""
    describing = describe_models(manifest, sorted({m for a in manifest.audits for m in audit_models(manifest, a)}),
                                 run.store)                                                        # 2 (started)
    listings = list_sources(manifest.audits, run.folder, run.store)                               # 1
    run.lap("list")
    listed = [a for a in manifest.audits if not listings.error(a.id)]
    parts = [p for sid in dict.fromkeys(s for a in listed for s in listings.of_audit[a.id])
             for p in listings.sources[sid].parts]
    hashed = hash_images(parts, run.store, run.folder, rehash=rehash)                              # 3
    run.lap("hash")
    log.info("%d distinct image URIs: %d hashes from the index, %d read, %d unreadable",
             hashed.listed, hashed.index_hits, hashed.hashed, hashed.unreadable)
    models = describing()                                                                          # 2
    run.lap("describe_models")
    plan = cluster.call(plan_batch, manifest, listings, models, hashed, store_root=run.store, run_dir=run.folder,  # 4
                        setups=feature_setups(manifest))
    run.lap("plan")
    return listings, models, hashed, plan


def plan_manifest(manifest: Manifest, out: str | None = None, *, feature_store: str | None = None,
                  rehash: bool = False) -> BatchPlan:
    """List, hash (via the store's index) and plan every audit of ``manifest``; compute nothing.

    The plan is written under ``<output>/plan/`` (``plan.json``: per model the images and rows it
    would compute, per audit its status). Arguments as :func:`run_manifest`.
    """
    run = Run.of(manifest, out, feature_store)
    run.check_writable()
    cluster.ensure_ray()
    return plan_stages(manifest, run, rehash)[3]


def run_manifest(manifest: Manifest, out: str | None = None, *, feature_store: str | None = None,
                 rehash: bool = False, max_aggregators: int = MAX_AGGREGATORS,
                 max_concurrent_models: int = MAX_CONCURRENT_MODELS, write: bool = True,
                 standing: dict | None = None) -> BatchResult:
    """Run every audit of ``manifest``; write results under ``out`` (default ``manifest.output``).

    Args:
        manifest (`Manifest`): a validated manifest (:func:`cdi_ray.spec.load_manifest`).
        out (`str`, *optional*): output location overriding ``manifest.output``.
        feature_store (`str`, *optional*): store location overriding the manifest's
            (default ``<output>/features``).
        rehash (`bool`, *optional*, defaults to False): ignore the store's URI → hash index and
            re-read every image (e.g. after objects were rewritten in place with the same size
            and mtime).
        max_aggregators (`int`, *optional*): most aggregator actors.
        max_concurrent_models (`int`, *optional*): model streams run at the same time.
        write (`bool`, *optional*, defaults to True): write the results files and reports.
        standing (`dict`, *optional*): audit id → :class:`~cdi_ray.pipeline.standing.StandingAudit`
            for a nightly run (:func:`~cdi_ray.pipeline.nightly.run_nightly`): those audits' verdicts
            come from their life-long rule, whose state is stored before the results.

    Returns:
        :class:`BatchResult`; ``.exit_code`` is 0 if every audit is done, 3 if some failed.

    Raises:
        cdi_ray.storage.UnwritableLocation: the output or the feature store cannot be written
            (probed first, before anything is listed or computed).
        KeyboardInterrupt: Ctrl-C; the feature streams are stopped, what they stored is kept.
    """
    run = Run.of(manifest, out, feature_store)
    run.check_writable()
    cluster.ensure_ray()
    cluster.prefetch_imports()
    streams.prewarm_task_worker(manifest.models)
    listings, models, hashed, plan = plan_stages(manifest, run, rehash)                            # 1–4
    start_aggregators(plan, max_aggregators)
    features: FeatureCounts = compute_features(plan, manifest, run.store,                          # 5
                                               max_concurrent_models=max_concurrent_models)
    run.lap("compute")
    descriptors = compute_descriptors(plan, run.store)
    run.lap("descriptors")
    outcomes: AuditOutcomes = aggregate(plan, manifest, features, run.store, max_aggregators=max_aggregators,  # 6
                                        standing=standing)
    run.lap("aggregate")
    batch = collect_results(manifest, plan, models, features, descriptors, outcomes,               # 7
                            run.section(manifest, listings, hashed))
    if write:
        write_outputs(batch, manifest, plan, models, outcomes)
    log.info("batch done: %s", batch.summary)
    return batch

"""Stage 5 — compute what the plan says: one feature stream per model, then the descriptors left over.

Up to ``max_concurrent_models`` streams run at once (driver threads), each with its own
autoscaling actor pool, so one model's start-up (actor launch, weight load) and tail overlap
another's steady state. An interrupt (Ctrl-C) in the driver stops every stream at its next batch
without waiting for it; the rows already published stay in the store for the next run. A stream that fails (e.g. its model cannot be loaded in the actor) fails
the runs on that model only. Afterwards, the model-free descriptors that no feature stream
computed — their images' features were stored by an earlier run, or a stream failed — get a
descriptor-only stream per preprocessing geometry.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cdi_ray import storage
from cdi_ray.pipeline import cluster, streams
from cdi_ray.pipeline.plan import BatchPlan
from cdi_ray.pipeline.streams import StreamCounts

log = logging.getLogger(__name__)

#: Model streams in flight at once: two overlap one model's start-up and tail with the other's
#: steady state; each stream has its own actor pool.
MAX_CONCURRENT_MODELS = 2


@dataclass(frozen=True)
class FeatureCounts:
    """Stage 5's record: per stream what came back, and the streams that failed."""

    per_model: dict[str, StreamCounts]
    failed: dict[str, str]                 # stream (model name) → why it failed
    failed_fingerprints: dict[str, str]    # fingerprint → why its stream failed

    def totals(self) -> dict:
        counts = self.per_model.values()
        return {"computed": sum(c.computed for c in counts), "decode_errors": sum(c.errors for c in counts),
                "transient_errors": sum(c.transient for c in counts),
                "per_model": {name: c.to_dict() for name, c in self.per_model.items()}}


def descriptor_todo(missing: str, store_root: str, key: str, out: str) -> tuple[int, int]:
    """Of the descriptors ``missing`` at planning, write those the store still lacks to ``out``;
    returns ``(left, computed by the feature streams)``. Ray-free (run in a Ray task)."""
    import pyarrow.compute as pc

    from cdi_ray.pipeline.store import DESCRIPTOR_PARTITION, FeatureStore

    t = storage.read_parquet(missing)
    have = FeatureStore(store_root).stored_keys(DESCRIPTOR_PARTITION, key)
    todo = t.filter(pc.invert(pc.is_in(t.column("content_hash"), value_set=have))) if len(have) else t
    storage.write_parquet(out, todo)
    return todo.num_rows, t.num_rows - todo.num_rows


def compute_features(plan: BatchPlan, manifest, store_root: str, *,
                     max_concurrent_models: int = MAX_CONCURRENT_MODELS) -> FeatureCounts:
    """Run every stream of ``plan``, then the descriptor-only streams (see the module docstring)."""
    per_model: dict[str, StreamCounts] = {}
    failed: dict[str, str] = {}

    stop = threading.Event()

    def one(name: str) -> StreamCounts:
        stream = plan.streams[name]
        log.info("model %s: computing %d images", name, stream.images)
        return streams.feature_stream(stream, manifest.models[name], store_root, plan.transient_dir,
                                      progress=cluster.local_progress(stream.images, f"features {name}"), stop=stop)

    names = sorted(plan.streams)
    if names:
        pool = ThreadPoolExecutor(max(1, min(max_concurrent_models, len(names))))
        try:
            futures = {name: pool.submit(one, name) for name in names}
            for name, fut in futures.items():
                try:
                    per_model[name] = fut.result()
                except Exception as exc:  # noqa: BLE001 — e.g. the model fails to load in the actor
                    cause = cluster.cause(exc)
                    failed[name] = f"feature computation for model {name!r} failed: {type(cause).__name__}: {cause}"
                    log.error(failed[name])
        except BaseException:
            # Ctrl-C (KeyboardInterrupt lands here, in the waiting driver thread): stop every stream at its
            # next batch and do not wait for them — what they published is in the store, atomically.
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return FeatureCounts(per_model, failed, {plan.streams[n].fingerprint: why for n, why in failed.items()})


def compute_descriptors(plan: BatchPlan, store_root: str) -> dict:
    """The descriptor-only streams (after the feature streams), and the descriptor counts of the run."""
    counts = {"needed": sum(d.needed for d in plan.descriptors.values()),
              "stored_before": sum(d.stored_before for d in plan.descriptors.values()),
              "in_feature_streams": 0, "separate": {"rows": 0, "computed": 0, "errors": 0, "transient": 0}}
    for key, d in sorted(plan.descriptors.items()):
        if d.needed == d.stored_before:
            continue
        todo = storage.join(plan.run_dir, "descriptors", f"{key}-todo.parquet")
        try:
            left, in_streams = cluster.call(descriptor_todo, d.missing, store_root, key, todo)
            counts["in_feature_streams"] += in_streams
            got = streams.descriptor_stream(todo, left, d.geometry, key, store_root)
        except Exception as exc:  # noqa: BLE001 — the controls of these images then count as fired
            log.error("descriptor stream failed: %s", exc)
            continue
        for k, v in got.items():
            counts["separate"][k] += v
    return counts

"""The Ray Data streams: one feature stream per model, and the descriptors left over.

Each stream reads a Parquet file of the run's folder (never a list built in the driver), runs
the stages of :mod:`cdi_ray.pipeline.actors` as Ray Data operators, and returns only counters to
the driver — the rows themselves go to the feature store or the run's folder.

* :func:`feature_stream` — a model's work file → decode (CPU tasks) → ``FeatureActor`` pool
  (``ActorPoolStrategy(min, max)``, ``num_gpus`` from the manifest; the model is loaded once per
  actor) — or, for a small CPU stream, warm tasks (``warm_features``: the model stays loaded in
  the task worker process between streams and runs) → one atomic part file per batch and config
  in the store;
* :func:`descriptor_stream` — images whose descriptors no feature stream computed → decode,
  describe (CPU tasks) → the store's descriptor partition;
* :func:`prewarm_task_worker` — the model stack imported in a task worker while the driver lists,
  hashes and plans, for the warm tasks of a small CPU stream.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from cdi_ray import console

log = logging.getLogger(__name__)

#: Images per decoding task call: a batch of decoded 512×512×3 float32 images stays ~200 MB.
DECODE_BATCH = 64
#: Rows per feature-store part file at most (features are ~26 floats a row: 4096 rows ≈ 1 MB).
WRITE_BATCH = 4096
#: A stream publishes at least this many part files (unless tiny), so rows reach the store — and
#: the progress bar — as they are computed: a killed driver loses at most 1/this of the work.
MIN_WRITES_PER_STREAM = 20
#: Rows per input block of the streams (more blocks → more parallel tasks).
ROWS_PER_BLOCK = 256
#: ``pool: auto`` runs a CPU stream of at most this many images in warm tasks: below it, starting an
#: actor (a new process importing the model stack, ≈ 6 s of CPU) costs more than the features.
WARM_TASK_IMAGES = 1024


def uses_warm_tasks(model_spec, images: int) -> bool:
    """Whether a stream of ``images`` runs the model in warm tasks rather than an actor pool."""
    if model_spec.pool != "auto":
        return model_spec.pool == "tasks"
    return model_spec.resolved_device == "cpu" and images <= WARM_TASK_IMAGES


#: Prewarm tasks not yet awaited by a stream (driver side).
_PREWARMING: list = []
#: Longest a warm-task stream waits for a prewarm still importing.
PREWARM_WAIT_S = 30.0


def prewarm_task_worker(models: dict) -> None:
    """Import the model stack (torch, diffusers' model classes, the extractors: ≈ 5 s of CPU) in a
    task worker process now, while the driver lists, hashes and plans, when a stream of ``models``
    (name → ``ModelSpec``) may run in warm tasks. The worker is idle again by the time the stream
    starts, and Ray hands a new task the most recently idle worker: the stream's first task finds
    the imports done instead of paying them on the critical path. Nothing waits for it but a
    warm-task stream (:func:`_await_prewarm`); on a cluster it merely warms one more worker."""
    import ray

    from cdi_ray.pipeline.actors import import_model_stack

    warm = [spec for spec in models.values() if spec.pool != "actors" and spec.resolved_device == "cpu"]
    if warm:
        # the latest only: a driver that runs batch after batch of actor streams keeps no old handles
        _PREWARMING[:] = [ray.remote(num_cpus=warm[0].num_cpus, max_retries=0)(import_model_stack).remote()]


def _await_prewarm(timeout: float = PREWARM_WAIT_S) -> None:
    """Before a warm-task stream starts: let a prewarm still importing finish (else the stream's
    first task would start a second worker and import the same stack beside it)."""
    import ray

    pending, _PREWARMING[:] = list(_PREWARMING), []
    if pending:
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=timeout)
        log.info("prewarmed task worker(s): %s", [ray.get(r) for r in done])


@dataclass
class StreamCounts:
    """What came back from one feature stream: feature rows by status, and the actors that computed them."""

    rows: int = 0
    computed: int = 0
    errors: int = 0
    transient: int = 0
    actors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "computed": self.computed, "errors": self.errors, "transient": self.transient,
                "actors": self.actors}


def _blocks(n: int) -> int:
    return max(1, min(200, -(-n // ROWS_PER_BLOCK)))


def write_batch_size(rows: int) -> int:
    """Rows per part file for a stream of ``rows``: ≥ MIN_WRITES_PER_STREAM files, 32 … WRITE_BATCH rows each."""
    return int(min(WRITE_BATCH, max(32, rows // MIN_WRITES_PER_STREAM)))


def _split(uri: str, k: int) -> list:
    """Ray task: one Parquet file of the run's folder as ``k`` Arrow blocks (contiguous, in order)."""
    from cdi_ray import storage

    table = storage.read_parquet(uri)
    step = -(-table.num_rows // k) if table.num_rows else 1
    blocks = [table.slice(i * step, step) for i in range(k)]
    return blocks if k > 1 else blocks[0]


def _read(uri: str, n: int, max_blocks: int | None = None):
    """A stream's input: the ``n`` rows of a Parquet file of the run's folder, as Ray Data blocks.

    A task loads the file into the object store in :func:`_blocks` pieces (at most ``max_blocks``)
    — the driver holds their references only — which is much lighter than Ray Data's Parquet reader
    for files this small (one planned file, no footers to fetch, no listing)."""
    import ray
    import ray.data

    k = min(_blocks(n), max_blocks or _blocks(n))
    refs = ray.remote(num_cpus=1, num_returns=k, max_retries=2)(_split).remote(uri, k)
    ds = ray.data.from_arrow_refs(refs if k > 1 else [refs])
    # No per-task memory polling: every map task (and each feature actor's batch) would read the
    # whole memory map of a process holding torch once a second — 2.7 % of a CPU feature actor's
    # time in a profile (py-spy, gray-box benchmark) — for a statistic nothing here reads.
    ds.context.memory_usage_poll_interval_s = None
    return ds


def feature_stream(stream, model_spec, store_root: str, transient_dir: str,
                   progress: console.ProgressBar | None = None, stop: threading.Event | None = None) -> StreamCounts:
    """Run one model's stream over its work file (:class:`cdi_ray.pipeline.plan.StreamPlan`).

    ``progress`` advances by images (a row is one (image, config) pair). When ``stop`` is set the
    stream ends at its next batch (leaving the loop closes Ray Data's iterator, which shuts its
    executor and actor pool down); the counts so far are returned.
    """
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from cdi_ray.pipeline.actors import (FeatureActor, STATUS_ERROR, STATUS_OK, STATUS_TRANSIENT, decode_batch,
                                         warm_features, write_batch)

    warm = uses_warm_tasks(model_spec, stream.images)
    if warm:
        _await_prewarm()
    # warm tasks: one block per task slot, so the stream's batches run in as few worker processes as
    # its pool allows (each new process would import the model stack again)
    ds = _read(stream.work, stream.images, max_blocks=model_spec.max_replicas if warm else None)
    # read, check, decode, preprocess (+ the model-free descriptors where asked): CPU tasks
    descriptors = {"store_root": store_root, "key": stream.descriptor_key} if stream.described else None
    size, channels = stream.geometry
    ds = ds.map_batches(decode_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                        fn_kwargs={"size": size, "channels": channels, "descriptors": descriptors})
    stage = {
        "model_uri": model_spec.uri,
        "fingerprint": stream.fingerprint,
        "configs": stream.configs,
        "device": model_spec.resolved_device,
        "dtype": model_spec.dtype,
        "load_options": stream.load_options,
        "max_batch_mb": model_spec.max_batch_mb,
    }
    if warm:
        # features: the model once per task worker process, kept there between streams and runs
        ds = ds.map_batches(warm_features, batch_size=model_spec.batch_size, batch_format="numpy",
                            compute=TaskPoolStrategy(size=model_spec.max_replicas), num_cpus=model_spec.num_cpus,
                            fn_kwargs=stage)
    else:
        # features: the model once per actor, the pool autoscaling between min and max replicas
        ds = ds.map_batches(FeatureActor, batch_size=model_spec.batch_size, batch_format="numpy",
                            compute=ActorPoolStrategy(min_size=model_spec.min_replicas, max_size=model_spec.max_replicas),
                            num_gpus=model_spec.num_gpus, num_cpus=model_spec.num_cpus, fn_constructor_kwargs=stage)
    # publish: CPU tasks, one atomic part file per batch and config
    ds = ds.map_batches(write_batch, batch_size=write_batch_size(stream.rows), batch_format="pyarrow",
                        fn_kwargs={"store_root": store_root, "fingerprint": stream.fingerprint,
                                   "columns": stream.columns, "transient_dir": transient_dir})
    counts, actors = StreamCounts(), set()
    per_row = stream.images / max(1, stream.rows)
    # small summary batches: the rows are tiny, and the progress bar moves with each one
    for batch in ds.iter_batches(batch_size=256, batch_format="pyarrow"):
        if stop is not None and stop.is_set():
            break
        status = batch.column("status").to_pylist()
        counts.rows += len(status)
        counts.computed += status.count(STATUS_OK)
        counts.errors += status.count(STATUS_ERROR)
        counts.transient += status.count(STATUS_TRANSIENT)
        actors.update(batch.column("actor").to_pylist())
        if progress is not None:
            progress.advance(len(status) * per_row)
    counts.actors = sorted(actors)
    if progress is not None:
        progress.close()
    return counts


def descriptor_stream(todo: str, n: int, geometry: tuple[int, int], key: str, store_root: str) -> dict:
    """Compute and store the descriptors of the ``n`` images of ``todo`` (``uri, content_hash, loc``)."""
    from cdi_ray.pipeline.actors import STATUS_ERROR, STATUS_OK, STATUS_TRANSIENT, describe_batch

    counts = {"rows": 0, "computed": 0, "errors": 0, "transient": 0}
    if not n:
        return counts
    ds = _read(todo, n).map_batches(describe_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                                    fn_kwargs={"size": geometry[0], "channels": geometry[1], "store_root": store_root,
                                               "key": key})
    for batch in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
        status = batch.column("status").to_pylist()
        counts["rows"] += len(status)
        counts["computed"] += status.count(STATUS_OK)
        counts["errors"] += status.count(STATUS_ERROR)
        counts["transient"] += status.count(STATUS_TRANSIENT)
    return counts

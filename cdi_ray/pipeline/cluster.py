"""Ray start-up and the pools a run keeps: where the pipeline meets the cluster.

* :func:`ensure_ray` — join ``$RAY_ADDRESS`` (``ray job submit`` sets it) or start a local Ray;
  :func:`load_manifest_starting_ray` — a command's manifest, its slow checks run while Ray starts;
* :func:`call` / :func:`call_many` — run a Ray-free function of the pipeline as a Ray task, so
  that what it holds per image lives on a worker, never on the driver;
* :func:`actor_pool` — actor pools kept across runs of one driver (the aggregators);
* :func:`local_progress` — the progress bar of a CLI run on a local Ray;
* :func:`prefetch_imports` — import what later stages of the driver need while it waits on Ray;

The Ray Data streams are :mod:`cdi_ray.pipeline.streams`.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import Callable, Iterable, TypeVar

from cdi_ray import console

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Local Ray (no cluster address): a few logical CPUs more than this box has physical cores,
#: because a read → decode → actor → write stream deadlocks on 2 logical CPUs.
LOCAL_NUM_CPUS = 8
#: Tasks of one :func:`call_many` in flight at once (the driver holds their handles only).
MAX_IN_FLIGHT = 64

#: Whether ensure_ray started a local Ray (our progress bar) or joined a cluster (Ray Data's bars).
_RAY = {"local": False}
_POOLS: dict[str, dict] = {}  # actor class name → {job, actors}


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS`` if set (``ray job submit`` sets it), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    console.drop_ray_noise()
    quiet = console.progress_enabled() and console.verbose() < 1
    level = logging.WARNING if quiet else logging.INFO
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=level)
    else:
        ray.init(address="local", num_cpus=num_cpus or max(LOCAL_NUM_CPUS, os.cpu_count() or 1), include_dashboard=False,
                 logging_level=level)
    console.quiet_ray(local=not address)
    _RAY["local"] = not address


def ensure_ray_while(prepare: Callable[[], T], address: str | None = None, *, num_cpus: int | None = None) -> T:
    """Start (or join) Ray here while ``prepare()`` runs in another thread, and return its result.

    A command checks its manifest against the feature registry and the test procedures (seconds
    of imports: torch, SciPy, scikit-learn: :func:`cdi_ray.spec.check_registries`) and starts a
    local Ray (seconds of waiting for its daemons): side by side they overlap. Ray starts in the
    calling thread — the main thread — because a local Ray's daemons are bound to the thread that
    started them. What ``prepare`` raises is raised here, once Ray is up (the command's exit stops
    it again); everything cheaper to check is checked before, so a manifest with a typo starts no Ray."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="cdi-ray-prepare") as pool:
        prepared = pool.submit(prepare)
        ensure_ray(address, num_cpus=num_cpus)
        return prepared.result()


def load_manifest_starting_ray(uri: str, *, root: str | None = None, address: str | None = None,
                               num_cpus: int | None = None):
    """A command's manifest, validated, with Ray started or joined: its structure, names, paths and
    values are checked first, without torch (a manifest with a typo starts no Ray); its feature
    options and test procedures (:func:`cdi_ray.spec.check_registries`) while Ray starts.

    Raises:
        cdi_ray.spec.ManifestError: as :func:`cdi_ray.spec.load_manifest` (the registry problems
            once Ray is up; the command's exit stops it again).
    """
    from cdi_ray.spec import check_registries, load_manifest

    manifest = load_manifest(uri, root=root, registries=False)
    return ensure_ray_while(lambda: check_registries(manifest, str(uri)), address, num_cpus=num_cpus)


def local_progress(total: int, label: str) -> console.ProgressBar | None:
    """A progress bar for a CLI run on a local Ray; None on a cluster or in library use."""
    if total and _RAY["local"] and console.progress_enabled():
        return console.ProgressBar(total, label)
    return None


#: What the driver imports only in later stages: the streams (Ray Data), the verdicts, the reports.
LATER_IMPORTS = ("ray.data", "cdi_ray.stats", "cdi_ray.report")


def prefetch_imports(modules=LATER_IMPORTS) -> threading.Thread:
    """Import ``modules`` in a background thread: the driver spends the listing, hashing and
    planning stages waiting on Ray tasks, so the seconds these imports take are not spent later on
    the critical path. An import that fails here fails again, with its message, where it is used."""
    def run():
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 — raised again at the real import
                log.debug("prefetching %s failed", name, exc_info=True)

    thread = threading.Thread(target=run, name="cdi-ray-prefetch", daemon=True)
    thread.start()
    return thread


def one_line(exc: BaseException) -> str:
    """A remote error as one readable line: the original exception, not Ray's wrapped traceback."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised (Ray wraps it)."""
    return getattr(exc, "cause", None) or exc


def call(fn: Callable[..., T], *args, num_cpus: float = 1, **kwargs) -> T:
    """``fn(*args, **kwargs)`` in a Ray task; its exception is re-raised here as it was raised there."""
    import ray

    try:
        return ray.get(ray.remote(num_cpus=num_cpus, max_retries=2)(fn).remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as exc:
        raise cause(exc) from None


def call_many(fn: Callable[..., T], arguments: Iterable[tuple], *, num_cpus: float = 1,
              in_flight: int = MAX_IN_FLIGHT) -> list[T | BaseException]:
    """``fn(*a)`` for every argument tuple, as Ray tasks (at most ``in_flight`` at a time), in order;
    a task's failure is its result (one bad item never stops the others)."""
    import ray

    task = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
    arguments = list(arguments)
    results: list = [None] * len(arguments)
    pending: dict = {}
    todo = iter(enumerate(arguments))
    while True:
        for i, args in todo:
            pending[task.remote(*args)] = i
            if len(pending) >= in_flight:
                break
        if not pending:
            return results
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        try:
            results[i] = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 — returned, the caller decides what fails
            results[i] = cause(exc)


def actor_pool(cls: type, n: int, **options) -> list:
    """``n`` actors of ``cls`` (``options`` for ``ray.remote``), kept across ``run_manifest`` calls of
    this driver (each pays its imports once); a pool is dropped when Ray is re-initialised or when
    :func:`drop_actor_pool` says an actor of it failed."""
    import ray

    ctx = ray.get_runtime_context()
    job = (ctx.get_session_name(), ctx.get_job_id())  # a new Ray (even one reusing job ids) → a new pool
    pool = _POOLS.get(cls.__qualname__)
    if pool is None or pool["job"] != job:
        pool = _POOLS[cls.__qualname__] = {"job": job, "actors": []}
    remote = ray.remote(**options)(cls)
    while len(pool["actors"]) < n:
        pool["actors"].append(remote.remote())
    return pool["actors"][:n]


def drop_actor_pool(cls: type) -> None:
    """Forget the pool of ``cls`` (an actor of it failed: do not reuse it)."""
    _POOLS.pop(cls.__qualname__, None)

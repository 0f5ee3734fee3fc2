"""``run_manifest``: a whole batch of audits, from manifest to results files.

Steps (each logged with its counts):

1. **list** every audit's sources (threads; failures fail only their audits); shard sources are
   indexed by a Ray Data pass, one task per shard (:mod:`cdi_ray.pipeline.shards`);
2. **describe** each model used: fingerprint and preprocessing geometry (an ``s3://`` model in a
   Ray task, so it is fetched on a worker where the actors will find it, not on the head);
3. **hash** every distinct image URI not in the store's hash index (Ray Data, CPU tasks);
4. **plan**: each image's conditioning under each model (class index / captions, and the store
   key that records it: :mod:`cdi_ray.conditioning`); per model and feature config, the image
   keys the audits need minus those the store holds (:mod:`cdi_ray.pipeline.plan`);
5. **compute** per model: one Ray Data stream read → decode → ``FeatureActor`` pool → store
   (:mod:`cdi_ray.pipeline.actors`), each model with its own autoscaling actor pool; up to
   ``MAX_CONCURRENT_MODELS`` streams run at once (driver threads), so one model's start-up and
   tail overlap another's steady state. The decode stage also computes the model-free
   descriptors (:mod:`cdi_ray.controls.descriptors`) of images that need them, into the store's
   descriptor partition of the model's preprocessing geometry; images no stream decodes (their
   features were stored by an earlier run) get a descriptor-only CPU stream (5b);
6. **aggregate**: audit groups (one store partition each) on aggregator actors
   (:mod:`cdi_ray.pipeline.aggregate`): the calibrated test and the controls; the default
   procedure's permutation cap is raised so the batch's FDR control can resolve its smallest
   threshold (:func:`batch_max_permutations`);
7. **results**: FDR across the batch, verdicts, files (:mod:`cdi_ray.pipeline.results`);
8. **reports**: per audit ``audits/<id>.json`` (entry, report payload, provenance) and
   ``audits/<id>.html``, and the batch's ``index.html`` (:mod:`cdi_ray.report`; docs/REPORTS.md).

The driver holds URIs, hashes and per-audit outcomes — never images or feature matrices — so
its memory grows with the number of URIs, not with pixels.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np

from cdi_ray import console, storage
from cdi_ray.conditioning import conditioning_for, read_label_map
from cdi_ray.controls.descriptors import descriptor_key
from cdi_ray.controls.model_free import control_seed
from cdi_ray.controls.reference import REFERENCE_MODEL, reference_control
from cdi_ray.pipeline import plan as planning
from cdi_ray.pipeline.actors import (DESCRIPTOR_PARTITION, FeatureActor, STATUS_ERROR, STATUS_OK, STATUS_TRANSIENT,
                                     decode_batch, describe_batch, describe_model, write_batch)
from cdi_ray.pipeline.aggregate import AuditAggregator, AuditJob, AuditOutcome, ImageRef, PlannedTest
from cdi_ray.pipeline.shards import expand_shard_listings
from cdi_ray.pipeline.results import (BatchResult, audit_document, build_entries, software_versions, summarize,
                                     write_reports, write_results)
from cdi_ray.pipeline.store import FeatureStore
from cdi_ray.spec import Manifest

log = logging.getLogger(__name__)

#: Images per hashing task call: enough to amortise a task's overhead (hashing is I/O-bound).
HASH_BATCH = 256
#: Images per decoding task call: a batch of decoded 512×512×3 float32 images stays ~200 MB.
DECODE_BATCH = 64
#: Rows per feature-store part file at most (features are ~26 floats a row: 4096 rows ≈ 1 MB).
WRITE_BATCH = 4096
#: A stream publishes at least this many part files (unless tiny), so rows reach the store — and
#: the progress bar — as they are computed: a killed driver loses at most 1/this of the work.
MIN_WRITES_PER_STREAM = 20
#: Rows per input block of the streams (more blocks → more parallel tasks).
ROWS_PER_BLOCK = 256
#: Model streams in flight at once: two overlap one model's start-up (actor launch, weight
#: load) and tail with the other's steady state; each stream has its own actor pool.
MAX_CONCURRENT_MODELS = 2
#: Aggregator actors at most; each holds one store partition's needed rows at a time.
MAX_AGGREGATORS = 4
#: One more aggregator per this many audits (a test takes ~10 ms on small sets; an actor's
#: start-up and imports take seconds).
AUDITS_PER_AGGREGATOR = 64
#: Upper bound of the permutation cap raised for a batch's FDR control (see batch_max_permutations):
#: 200,000 resolves BH at q = 0.05 over 5,000 audits; a permutation of a 20k+20k audit costs ~1 ms,
#: and only audits with overwhelming evidence run to the cap (the others stop after h exceedances).
MAX_BATCH_PERMUTATIONS = 200_000
#: The default procedure's own cap (cdi_ray.stats, ridge scorer).
DEFAULT_MAX_PERMUTATIONS = 9_999
#: Suffix of the shadow audit that re-runs an audit on its reference model (not a valid audit id).
REFERENCE_SUFFIX = "@reference"
#: Local Ray (no cluster address): a few logical CPUs more than this box has physical cores,
#: because a read → decode → actor → write stream deadlocks on 2 logical CPUs.
LOCAL_NUM_CPUS = 8


def _one_line(exc: BaseException) -> str:
    """A remote error as one readable line: the original exception, not Ray's wrapped traceback."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


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


#: Whether ensure_ray started a local Ray (our progress bar) or joined a cluster (Ray Data's bars).
_RAY = {"local": False}


def local_progress(total: int, label: str) -> console.ProgressBar | None:
    """A progress bar for a CLI run on a local Ray; None on a cluster or in library use."""
    if total and _RAY["local"] and console.progress_enabled():
        return console.ProgressBar(total, label)
    return None


_POOL: dict = {}


def aggregator_pool(n: int) -> list:
    """``n`` aggregator actors, reused across ``run_manifest`` calls of this driver (each pays
    its imports once); the pool is dropped when Ray is re-initialised or an actor failed."""
    import ray

    ctx = ray.get_runtime_context()
    job = (ctx.get_session_name(), ctx.get_job_id())  # a new Ray (even one reusing job ids) → a new pool
    if _POOL.get("job") != job:
        _POOL.clear()
        _POOL.update(job=job, actors=[])
    Aggregator = ray.remote(num_cpus=1, max_restarts=1, max_task_retries=1)(AuditAggregator)
    while len(_POOL["actors"]) < n:
        _POOL["actors"].append(Aggregator.remote())
    return _POOL["actors"][:n]


def _blocks(n: int) -> int:
    return max(1, min(200, -(-n // ROWS_PER_BLOCK)))


def batch_max_permutations(m: int, q: float, method: str) -> int | None:
    """The permutation cap an audit needs so that the batch's multiple-testing control can reject it.

    With m tested audits, Benjamini–Hochberg (and Bonferroni) compare the smallest p-value with
    q/m; Benjamini–Yekutieli with q/(m·Σ_{i≤m} 1/i). A Monte Carlo permutation p-value cannot go
    below 1/(B+1), so B must reach the reciprocal of that threshold; twice that leaves room for a
    few exceedances. Never below the procedure's default (9,999), never above
    :data:`MAX_BATCH_PERMUTATIONS`; ``None`` for ``method="none"`` (per-audit α: default cap).
    """
    if method == "none" or m <= 0:
        return None
    threshold = q / m
    if method == "by":
        threshold /= sum(1.0 / i for i in range(1, m + 1))
    need = 2 * math.ceil(1.0 / threshold)
    return int(min(MAX_BATCH_PERMUTATIONS, max(DEFAULT_MAX_PERMUTATIONS, need)))


def test_options(test, cap: int | None) -> dict:
    """An audit's procedure options, with the batch's permutation cap filled in where the audit
    left ``max_permutations`` unset (default procedure, ridge scorer only: the logistic scorer
    refits per permutation, so its cap stays the user's choice)."""
    options = dict(test.options)
    if (cap is not None and test.procedure == "crossfit-permutation" and "max_permutations" not in options
            and options.get("scorer", "ridge") == "ridge"):
        options["max_permutations"] = cap
    return options


# ----------------------------------------------------------------------------------------------
# step 2: models
# ----------------------------------------------------------------------------------------------
def describe_models(models: dict, store_root: str) -> tuple[dict[str, dict], dict[str, str]]:
    """``(name → {fingerprint, image_size, image_channels, family}, name → error)``.

    ``s3://`` models are described by a Ray task, so the download lands on a worker node (where
    the actors will find it in the node cache), not on the head; local paths are described in
    the driver (a local path must be readable from every node anyway — a shared filesystem — and
    this saves a worker start-up per model).
    """
    import ray

    describe = ray.remote(num_cpus=1, max_retries=2)(describe_model)
    pending = {name: describe.remote(spec.uri, store_root, dict(spec.options))
               for name, spec in models.items() if storage.is_remote(spec.uri)}
    infos: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for name, spec in models.items():
        try:
            if name in pending:
                infos[name] = ray.get(pending[name])
            else:
                infos[name] = describe_model(spec.uri, store_root, dict(spec.options))
        except Exception as exc:  # noqa: BLE001 — fails the audits on this model only
            cause = getattr(exc, "cause", None) or exc
            errors[name] = f"model {name!r} ({spec.uri}) cannot be used: {type(cause).__name__}: {cause}"
    return infos, errors


# ----------------------------------------------------------------------------------------------
# step 3: hashing
# ----------------------------------------------------------------------------------------------
def _hash_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from cdi_ray.images import content_hash

    n = len(batch["uri"])
    hashes = np.full(n, "", dtype=object)
    errors = np.full(n, "", dtype=object)
    sizes = np.asarray(batch["size"], dtype=np.int64).copy()
    for i, uri in enumerate(batch["uri"]):
        try:
            data = storage.read_bytes(str(uri))
            hashes[i], sizes[i] = content_hash(data), len(data)
        except FileNotFoundError:
            errors[i] = "missing: the file does not exist"
        except PermissionError as exc:
            errors[i] = f"access_denied: {exc}"
        except Exception as exc:  # noqa: BLE001 — reported per image, retried next run
            errors[i] = f"unreadable: {type(exc).__name__}: {exc}"
    return {"uri": batch["uri"], "size": sizes, "version": batch["version"], "content_hash": hashes, "error": errors}


def hash_entries(entries: list[storage.FileEntry]) -> tuple[dict[str, str], dict[str, str], list[dict]]:
    """``(uri → hash, uri → error, index rows)`` for ``entries``, read by Ray Data tasks."""
    import ray

    if not entries:
        return {}, {}, []
    items = [{"uri": e.uri, "size": e.size, "version": e.version} for e in entries]
    ds = ray.data.from_items(items, override_num_blocks=_blocks(len(items)))
    ds = ds.map_batches(_hash_batch, batch_size=HASH_BATCH, batch_format="numpy")
    hashes, errors, index_rows = {}, {}, []
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        for uri, size, version, h, err in zip(batch["uri"], batch["size"], batch["version"], batch["content_hash"], batch["error"]):
            uri = str(uri)
            if err:
                errors[uri] = str(err)
            else:
                hashes[uri] = str(h)
                index_rows.append({"uri": uri, "size": int(size), "version": str(version), "content_hash": str(h)})
    return hashes, errors, index_rows


# ----------------------------------------------------------------------------------------------
# step 5: features
# ----------------------------------------------------------------------------------------------
def write_batch_size(rows: int) -> int:
    """Rows per part file for a stream of ``rows``: ≥ MIN_WRITES_PER_STREAM files, 32 … WRITE_BATCH rows each."""
    return int(min(WRITE_BATCH, max(32, rows // MIN_WRITES_PER_STREAM)))


def stream_items(work: list[planning.ImageWork], describe, null_class: int | None, options: dict) -> tuple[list[dict], dict]:
    """The stream's input rows (ordered by shard and position, :func:`_locality`) and the actors'
    model-load options.

    An image given the null class travels without a label, and the actors load the model with
    ``missing_label="null"`` — the adapters' own way to the null class (an explicit index
    ``num_classes`` is out of range for them). Labelled images are unaffected by that option, and
    their store keys already say which label was used.
    """
    use_null = null_class is not None and any(w.label == null_class for w in work)
    items = [{"uri": w.uri, "loc": w.loc, "content_hash": w.content_hash, "key": w.store_key,
              "label": -1 if w.label is None or (use_null and w.label == null_class) else int(w.label),
              "captions": json.dumps(list(w.captions)), "cfgs": ",".join(w.config_hashes),
              "desc": w.content_hash in describe}
             for w in sorted(work, key=_locality)]
    return items, {**options, "missing_label": "null"} if use_null else dict(options)


def compute_features(model_spec, info: dict, work: list[planning.ImageWork], configs: dict[str, dict],
                     columns: dict[str, list[str]], store_root: str, describe: set[str] | frozenset = frozenset(),
                     descriptor_key: str | None = None, progress: console.ProgressBar | None = None) -> dict:
    """Run one model's stream over ``work``; returns counters (``computed`` = ok rows).

    ``progress`` advances by one per image whose rows (one per feature config) came back.

    Images whose hash is in ``describe`` also get their model-free descriptors computed in the
    decode stage (they are decoded there anyway) and stored under ``descriptor_key``.
    """
    import ray
    from ray.data import ActorPoolStrategy

    items, load_options = stream_items(work, describe, info.get("null_class"), model_spec.options)
    needed_cfgs = sorted({k for w in work for k in w.config_hashes})
    ds = ray.data.from_items(items, override_num_blocks=_blocks(len(items)))
    # read, check, decode, preprocess: CPU tasks
    descriptors = {"store_root": store_root, "key": descriptor_key} if describe and descriptor_key else None
    ds = ds.map_batches(decode_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                        fn_kwargs={"size": info["image_size"], "channels": info["image_channels"],
                                   "descriptors": descriptors})
    # features: the model once per actor, the pool autoscaling between min and max replicas
    ds = ds.map_batches(
        FeatureActor,
        batch_size=model_spec.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=model_spec.min_replicas, max_size=model_spec.max_replicas),
        num_gpus=model_spec.num_gpus,
        num_cpus=model_spec.num_cpus,
        fn_constructor_kwargs={
            "model_uri": model_spec.uri,
            "fingerprint": info["fingerprint"],
            "configs": {k: configs[k] for k in needed_cfgs},
            "device": model_spec.resolved_device,
            "dtype": model_spec.dtype,
            "load_options": load_options,
            "max_batch_mb": model_spec.max_batch_mb,
        },
    )
    # publish: CPU tasks, one atomic part file per batch and config
    ds = ds.map_batches(write_batch, batch_size=write_batch_size(len(items) * max(1, len(needed_cfgs))),
                        batch_format="pyarrow",
                        fn_kwargs={"store_root": store_root, "fingerprint": info["fingerprint"],
                                   "columns": {k: columns[k] for k in needed_cfgs}})
    counts = {"rows": 0, "computed": 0, "errors": 0, "transient": 0, "actors": set()}
    transient: dict[str, str] = {}
    rows_per_image = {w.store_key: len(w.config_hashes) for w in work}
    # small summary batches: the rows are tiny, and the progress bar moves with each one
    for batch in ds.iter_batches(batch_size=256, batch_format="pyarrow"):
        status = batch.column("status").to_pylist()
        if progress is not None:
            progress.advance(sum(1 / rows_per_image.get(h, 1) for h in batch.column("content_hash").to_pylist()))
        counts["rows"] += len(status)
        counts["computed"] += status.count(STATUS_OK)
        counts["errors"] += status.count(STATUS_ERROR)
        counts["transient"] += status.count(STATUS_TRANSIENT)
        counts["actors"].update(batch.column("actor").to_pylist())
        for h, s, e in zip(batch.column("content_hash").to_pylist(), status, batch.column("error").to_pylist()):
            if s == STATUS_TRANSIENT:
                transient[h] = e
    counts["actors"] = sorted(counts["actors"])
    counts["transient_errors"] = transient
    if progress is not None:
        progress.close()
    return counts


def compute_descriptors(todo: list[tuple[str, str, str]], size: int, channels: int, key: str, store_root: str) -> dict:
    """Descriptor-only stream (CPU tasks) for ``(uri, content hash, locator)`` no feature stream decoded."""
    import ray

    if not todo:
        return {"rows": 0, "computed": 0, "errors": 0, "transient": 0}
    items = [{"uri": u, "content_hash": h, "loc": loc} for u, h, loc in todo]
    ds = ray.data.from_items(items, override_num_blocks=_blocks(len(items)))
    ds = ds.map_batches(describe_batch, batch_size=DECODE_BATCH, batch_format="numpy",
                        fn_kwargs={"size": size, "channels": channels, "store_root": store_root, "key": key})
    counts = {"rows": 0, "computed": 0, "errors": 0, "transient": 0}
    for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
        status = [str(s) for s in batch["status"]]
        counts["rows"] += len(status)
        counts["computed"] += status.count(STATUS_OK)
        counts["errors"] += status.count(STATUS_ERROR)
        counts["transient"] += status.count(STATUS_TRANSIENT)
    return counts


def _locality(w: planning.ImageWork) -> tuple:
    """Stream order: members of one shard together, by position (a decode batch then reads
    neighbouring tar members with one ranged read and Parquet rows by row group)."""
    if not w.loc:
        return (w.uri, ())
    parts = w.loc.split(":")
    return (w.uri.rsplit("#", 1)[0], tuple(int(p) if p.isdigit() else 0 for p in parts[1:3]))


def _refs(files, uri_hash: dict[str, str], read_errors: dict[str, str], transient: dict[str, str],
          cond: dict | None = None) -> tuple[ImageRef, ...]:
    """An audit's images as (uri, hash, why it may be missing, store key under the audit's model)."""
    out = []
    for e in files:
        h = uri_hash.get(e.uri)
        key = cond[e.uri].key if cond and e.uri in cond else h
        out.append(ImageRef(e.uri, h, read_errors.get(e.uri, "unreadable") if h is None else transient.get(key), key))
    return tuple(out)


def audit_conditioning(manifest: Manifest, audit, model: str, info: dict, listing, uri_hash: dict[str, str]):
    """``(uri → Conditioning, report dict)`` of an audit's images under ``model`` (its own or its reference).

    Raises:
        ValueError: labels the model cannot use (see :func:`cdi_ray.conditioning.conditioning_for`).
    """
    spec = manifest.models[model]
    missing = audit.labels.missing or ("null" if spec.options.get("missing_label") == "null" else "error")
    label_map = read_label_map(audit.labels.map) if info.get("conditioning_kind") == "class" else {}
    source = audit.labels.map if isinstance(audit.labels.map, str) else ("inline" if audit.labels.map else None)
    cond, report = conditioning_for((*listing.published, *listing.unpublished), uri_hash, info,
                                    label_map=label_map, missing=missing, map_source=source)
    return cond, report.to_dict()


# ----------------------------------------------------------------------------------------------
# the whole batch
# ----------------------------------------------------------------------------------------------
def run_manifest(manifest: Manifest, out: str | None = None, *, feature_store: str | None = None,
                 rehash: bool = False, max_aggregators: int = MAX_AGGREGATORS,
                 max_concurrent_models: int = MAX_CONCURRENT_MODELS, write: bool = True) -> BatchResult:
    """Run every audit of ``manifest``; write results under ``out`` (default ``manifest.output``).

    Args:
        manifest (`Manifest`): a validated manifest (:func:`cdi_ray.spec.load_manifest`).
        out (`str`, *optional*): output location overriding ``manifest.output``.
        feature_store (`str`, *optional*): store location overriding the manifest's
            (default ``<output>/features``).
        rehash (`bool`, *optional*, defaults to False): ignore the store's URI → hash cache and
            re-read every image (e.g. after objects were rewritten in place with the same size
            and mtime).
        max_aggregators (`int`, *optional*): most aggregator actors.
        max_concurrent_models (`int`, *optional*): model streams run at the same time.
        write (`bool`, *optional*, defaults to True): write the results files.

    Returns:
        :class:`BatchResult`; ``.exit_code`` is 0 if every audit is done, 3 if some failed.
    """
    import ray

    t_start = time.time()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    output = out or manifest.output
    store_root = feature_store or manifest.store_uri(output)
    store = FeatureStore(store_root)
    ensure_ray()
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}  # audit id → reason it could not be run at all

    def lap(name, t0):
        timings[name] = round(time.time() - t0, 3)

    # 1. list
    t0 = time.time()
    listings = planning.expand_sources(manifest.audits)
    shard_counts = expand_shard_listings(listings, store_root)
    for aid, li in listings.items():
        if li.error:
            failures[aid] = li.error
    lap("list", t0)

    # 2. describe models
    t0 = time.time()
    used = sorted({a.model for a in manifest.audits if a.id not in failures}
                  | {manifest.controls_of(a).reference_model for a in manifest.audits
                     if a.id not in failures and manifest.controls_of(a).reference_model})
    infos, model_errors = describe_models({name: manifest.models[name] for name in used}, store_root)
    for a in manifest.audits:
        if a.id not in failures and a.model in model_errors:
            failures[a.id] = model_errors[a.model]
    lap("describe_models", t0)

    # 3. hash
    t0 = time.time()
    live = [listings[a.id] for a in manifest.audits if a.id not in failures]
    distinct = planning.distinct_entries(live)
    index = {} if rehash else store.hash_index()
    known, todo = planning.split_cached(distinct, index)
    hashed, read_errors, index_rows = hash_entries(todo)
    for e in distinct:
        if e.error:
            read_errors[e.uri] = e.error
        elif e.size < 0:
            read_errors[e.uri] = "missing: the file does not exist"
    store.add_hashes(index_rows)
    uri_hash = {**known, **hashed}
    lap("hash", t0)
    log.info("%d distinct image URIs: %d hashes from the index, %d read, %d unreadable",
             len(distinct), len(known), len(hashed), len(read_errors))

    # 4. plan
    t0 = time.time()
    configs: dict[str, dict] = {}
    columns: dict[str, list[str]] = {}
    audit_key: dict[str, str] = {}
    ref_key: dict[str, str] = {}  # audit id → store key of its features under its reference model
    needs: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    conds: dict[tuple[str, str], dict] = {}  # (audit id, model) → uri → Conditioning
    conditioning: dict[str, dict] = {}  # audit id → how its images were conditioned (provenance)
    representative: dict[str, planning.ImageWork] = {}  # image key → the first URI in URI order with it
    locs = {e.uri: e.loc for e in distinct}

    def plan_images(a, model: str) -> set[str]:
        li = listings[a.id]
        cond, report = audit_conditioning(manifest, a, model, infos[model], li, uri_hash)
        conds[(a.id, model)] = cond
        conditioning.setdefault(a.id, report)
        for uri, c in cond.items():
            w = representative.get(c.key)
            if w is None or uri < w.uri:
                representative[c.key] = planning.ImageWork(uri, uri_hash[uri], key=c.key, loc=locs.get(uri, ""),
                                                           label=c.label, captions=c.captions)
        return {c.key for c in cond.values()}

    for a in manifest.audits:
        if a.id in failures:
            continue
        try:
            cfg = planning.feature_config(manifest, a)
            key = planning.store_key(cfg, manifest.models[a.model])
        except Exception as exc:  # noqa: BLE001
            failures[a.id] = f"invalid feature config: {exc}"
            continue
        try:
            keys = plan_images(a, a.model)
        except (OSError, ValueError) as exc:  # labels the model cannot use: this audit fails alone
            failures[a.id] = f"labels: {exc}"
            continue
        configs[key] = cfg.model_dump(mode="json", exclude={"device"})
        columns[key] = list(cfg.columns)
        audit_key[a.id] = key
        needs[a.model][key] |= keys
        # the reference-model control: the same images and features under the reference model
        ref = manifest.controls_of(a).reference_model
        if ref and ref not in model_errors:
            try:
                cfg_r = planning.feature_config(manifest, a, ref)
                key_r = planning.store_key(cfg_r, manifest.models[ref])
                keys_r = plan_images(a, ref)
            except Exception as exc:  # noqa: BLE001 — the control then cannot run, so it fires
                model_errors.setdefault(f"{a.id}@reference", f"invalid feature config for reference {ref!r}: {exc}")
                continue
            configs[key_r] = cfg_r.model_dump(mode="json", exclude={"device"})
            columns[key_r] = list(cfg_r.columns)
            ref_key[a.id] = key_r
            needs[ref][key_r] |= keys_r
    where: dict[str, tuple[str, str]] = {}  # content hash → (first URI with it, its locator)
    for uri in sorted(uri_hash):
        where.setdefault(uri_hash[uri], (uri, locs.get(uri, "")))
    fingerprints = {name: infos[name]["fingerprint"] for name in needs}
    stored = {(fingerprints[name], key): store.keys(fingerprints[name], key) for name in needs for key in needs[name]}
    work = planning.plan_work(needs, representative, stored, fingerprints)
    needed_total = sum(len(h) for per in needs.values() for h in per.values())
    # model-free descriptors: per preprocessing geometry, the hashes of audits with the control on
    # that the store lacks; each goes to the first feature stream that decodes it at that geometry
    desc_needs: dict[str, set[str]] = defaultdict(set)
    desc_geometry: dict[str, tuple[int, int]] = {}
    desc_key_of: dict[str, str] = {}  # audit id → descriptor key
    for a in manifest.audits:
        if a.id in failures or a.id not in audit_key or not manifest.controls_of(a).model_free:
            continue
        geometry = (int(infos[a.model]["image_size"]), int(infos[a.model]["image_channels"]))
        dk = descriptor_key(*geometry)
        desc_key_of[a.id], desc_geometry[dk] = dk, geometry
        li = listings[a.id]
        desc_needs[dk] |= {uri_hash[e.uri] for e in (*li.published, *li.unpublished) if e.uri in uri_hash}
    desc_missing = {dk: hashes - store.keys(DESCRIPTOR_PARTITION, dk) for dk, hashes in desc_needs.items()}
    describe_in_stream: dict[str, set[str]] = {}
    claimed: set[tuple[str, str]] = set()
    for name in sorted(work):
        dk = descriptor_key(int(infos[name]["image_size"]), int(infos[name]["image_channels"]))
        mine = {w.content_hash for w in work[name]} & desc_missing.get(dk, set())
        mine = {h for h in mine if (dk, h) not in claimed}
        claimed |= {(dk, h) for h in mine}
        describe_in_stream[name] = mine
    lap("plan", t0)

    # 5. compute (the aggregators start now: their start-up and imports overlap the features)
    t0 = time.time()
    n_live = sum(a.id in audit_key for a in manifest.audits)
    if n_live:
        n_groups = len({(fingerprints[a.model], audit_key[a.id]) for a in manifest.audits if a.id in audit_key})
        for actor in aggregator_pool(min(max_aggregators, n_groups, -(-n_live // AUDITS_PER_AGGREGATOR))):
            actor.warm_up.remote()
    compute: dict[str, dict] = {}
    transient: dict[str, str] = {}

    def one_model(name):
        log.info("model %s: computing %d images", name, len(work[name]))
        dk = descriptor_key(int(infos[name]["image_size"]), int(infos[name]["image_channels"]))
        return compute_features(manifest.models[name], infos[name], work[name], configs, columns, store_root,
                                describe=describe_in_stream.get(name, set()), descriptor_key=dk,
                                progress=local_progress(len(work[name]), f"features {name}"))

    with ThreadPoolExecutor(max(1, min(max_concurrent_models, len(work)))) as pool:
        futures = {name: pool.submit(one_model, name) for name in sorted(work)}
        for name, fut in futures.items():
            try:
                counts = fut.result()
            except Exception as exc:  # noqa: BLE001 — e.g. the model fails to load in the actor
                cause = getattr(exc, "cause", None) or exc
                reason = f"feature computation for model {name!r} failed: {type(cause).__name__}: {cause}"
                log.error(reason)
                model_errors.setdefault(name, reason)  # for the audits that use it as reference
                for a in manifest.audits:
                    if a.model == name and a.id not in failures:
                        failures[a.id] = reason
                continue
            transient.update(counts.pop("transient_errors"))
            compute[name] = counts
    lap("compute", t0)

    # 5b. descriptors no feature stream computed (features already stored, or a stream failed)
    t0 = time.time()
    desc_counts = {"needed": sum(len(h) for h in desc_needs.values()),
                   "stored_before": sum(len(desc_needs[dk]) - len(desc_missing[dk]) for dk in desc_needs),
                   "in_feature_streams": 0, "separate": {"rows": 0, "computed": 0, "errors": 0, "transient": 0}}
    for dk in sorted(desc_missing):
        if not desc_missing[dk]:
            continue
        have = store.keys(DESCRIPTOR_PARTITION, dk)
        desc_counts["in_feature_streams"] += len(desc_missing[dk] & have)
        todo = sorted((where[h][0], h, where[h][1]) for h in desc_missing[dk] - have)
        try:
            got = compute_descriptors(todo, *desc_geometry[dk], dk, store_root)
        except Exception as exc:  # noqa: BLE001 — the controls of these images then count as fired
            log.error("descriptor stream failed: %s", exc)
            continue
        for k, v in got.items():
            desc_counts["separate"][k] += v
    lap("descriptors", t0)

    # 6. aggregate
    t0 = time.time()
    outcomes: dict[str, AuditOutcome] = {}
    groups: dict[tuple[str, str], list[AuditJob]] = defaultdict(list)
    n_tested = sum(a.id not in failures for a in manifest.audits)
    cap = batch_max_permutations(n_tested, manifest.fdr.q, manifest.fdr.method)
    for a in manifest.audits:
        if a.id in failures:
            continue
        li = listings[a.id]
        ctl = manifest.controls_of(a)
        controls = {"model_free": {"alpha": ctl.alpha}} if ctl.model_free else {}
        cond = conds.get((a.id, a.model))
        calibration = None
        if a.calibration == "reference":
            if a.id not in ref_key:
                ref = ctl.reference_model
                outcomes[a.id] = AuditOutcome(a.id, "failed", error="reference calibration impossible: " + (
                    model_errors.get(ref) or model_errors.get(a.id + REFERENCE_SUFFIX) or "no reference features"))
                continue
            calibration = (fingerprints[ctl.reference_model], ref_key[a.id])
        published = _refs(li.published, uri_hash, read_errors, transient, cond)
        unpublished = _refs(li.unpublished, uri_hash, read_errors, transient, cond)
        calibration_keys: tuple = ()
        if calibration:  # pair each image's rows across the two models by their own store keys
            cond_r = conds.get((a.id, ctl.reference_model))
            theirs = (*_refs(li.published, uri_hash, read_errors, transient, cond_r),
                      *_refs(li.unpublished, uri_hash, read_errors, transient, cond_r))
            calibration_keys = tuple((t.store_key, r.store_key) for t, r in zip((*published, *unpublished), theirs)
                                     if t.content_hash and t.store_key != r.store_key)
        job = AuditJob(a.id, published, unpublished, a.test.procedure, a.test.alpha, a.seed, test_options(a.test, cap),
                       controls=controls, descriptor_key=desc_key_of.get(a.id), calibration=calibration,
                       calibration_keys=calibration_keys)
        groups[(fingerprints[a.model], audit_key[a.id])].append(job)
        if a.id in ref_key:  # the reference-model control's re-run: a shadow audit, not FDR-counted
            ref = ctl.reference_model
            cond_r = conds.get((a.id, ref))
            groups[(fingerprints[ref], ref_key[a.id])].append(
                AuditJob(a.id + REFERENCE_SUFFIX, _refs(li.published, uri_hash, read_errors, transient, cond_r),
                         _refs(li.unpublished, uri_hash, read_errors, transient, cond_r), a.test.procedure, a.test.alpha,
                         control_seed(a.seed, REFERENCE_MODEL), dict(a.test.options)))
    if groups:
        n_audits = sum(len(j) for j in groups.values())
        actors = aggregator_pool(min(max_aggregators, len(groups), -(-n_audits // AUDITS_PER_AGGREGATOR)))
        order = sorted(groups, key=lambda g: -len(groups[g]))
        pending = {actors[i % len(actors)].run_group.remote(store_root, fp, key, columns[key], groups[(fp, key)]): (fp, key)
                   for i, (fp, key) in enumerate(order)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(ready[0])
            try:
                for o in ray.get(ready[0]):
                    outcomes[o.audit_id] = o
            except Exception as exc:  # noqa: BLE001 — the group's audits fail, the others go on
                _POOL.clear()  # do not reuse a pool that lost an actor
                for job in groups[group]:
                    outcomes[job.audit_id] = AuditOutcome(job.audit_id, "failed", error=f"aggregator failed: {_one_line(exc)}")
    for a in manifest.audits:
        ref = manifest.controls_of(a).reference_model
        shadow = outcomes.pop(a.id + REFERENCE_SUFFIX, None)
        o = outcomes.get(a.id)
        if not ref or o is None or o.status != "done":
            continue
        error = (model_errors.get(ref) or model_errors.get(a.id + REFERENCE_SUFFIX)
                 or (shadow.error if shadow is not None else "not run"))
        ok = shadow is not None and shadow.status == "done"
        o.controls.append(reference_control(shadow.result if ok else None, reference=ref,
                                            alpha=manifest.controls_of(a).alpha, error=None if ok else error))
    lap("aggregate", t0)

    # 7. results
    rows = []
    for a in manifest.audits:
        o = outcomes.get(a.id) or AuditOutcome(a.id, "failed", error=failures.get(a.id, "not run"))
        rows.append({
            "audit_id": a.id, "model": a.model,
            "model_fingerprint": infos.get(a.model, {}).get("fingerprint"),
            "feature_key": audit_key.get(a.id),
            "status": o.status, "result": o.result, "error": o.error, "controls": o.controls,
            "n_published": o.n_published, "n_unpublished": o.n_unpublished, "unusable": o.unusable,
            "alpha": a.test.alpha, "seed": a.seed, "procedure": a.test.procedure, "min_samples": a.test.min_samples,
            "feature_calibration": ("reference:" + manifest.controls_of(a).reference_model
                                    if a.calibration == "reference" else "none"),
        })
    entries, fdr = build_entries(rows, fdr_method=manifest.fdr.method, q=manifest.fdr.q)
    run = {
        "run_id": uuid.uuid4().hex,
        "output": output,
        "feature_store": store_root,
        "manifest_hash": manifest.content_hash(),
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - t_start, 3),
        "timings": timings,
        "images": {"listed": len(distinct), "hashed": len(hashed), "hash_index_hits": len(known),
                   "unreadable": len(read_errors), "shards": shard_counts},
        "features": {
            "needed": needed_total,
            "to_compute": sum(len(w.config_hashes) for ws in work.values() for w in ws),
            "computed": sum(c["computed"] for c in compute.values()),
            "decode_errors": sum(c["errors"] for c in compute.values()),
            "transient_errors": sum(c["transient"] for c in compute.values()),
            "per_model": compute,
        },
        "descriptors": desc_counts,
        "max_permutations": cap,
    }
    batch = BatchResult(output=output, audits=entries, summary=summarize(entries), fdr=fdr, run=run,
                        tests={j.audit_id: PlannedTest(fp, key, tuple(columns[key]), j)
                               for (fp, key), jobs in groups.items() for j in jobs})
    if write:
        write_results(batch)
        # 8. reports: a report that cannot be written never loses the results written above
        try:
            software = software_versions()
            docs = [audit_document(e, fdr=fdr, report=(outcomes.get(a.id).report if outcomes.get(a.id) else None),
                                   provenance=_provenance(manifest, a, e, configs.get(audit_key.get(a.id, "")),
                                                          infos.get(a.model), run, software,
                                                          conditioning.get(a.id)))
                    for a, e in zip(manifest.audits, entries)]
            write_reports(output, batch.to_dict(), docs)
        except Exception as exc:  # noqa: BLE001
            log.error("writing the HTML reports failed (results.json is complete): %s: %s", type(exc).__name__, exc)
    log.info("batch done: %s", batch.summary)
    return batch


def _provenance(manifest: Manifest, audit, entry: dict, feature_config: dict | None, info: dict | None,
                run: dict, software: dict, conditioning: dict | None = None) -> dict:
    """What a third party needs to re-run one audit: the manifest entry as validated, the model,
    the feature config, seed, the batch settings, software versions and the run's timings."""
    model = manifest.models[audit.model]
    return {
        "manifest_hash": run["manifest_hash"],
        "manifest_entry": audit.model_dump(mode="json"),
        "model": {"name": audit.model, "uri": model.uri, "fingerprint": entry.get("model_fingerprint"),
                  "access": model.access, "dtype": model.dtype, "options": dict(model.options),
                  "family": (info or {}).get("family"), "image_size": (info or {}).get("image_size"),
                  "image_channels": (info or {}).get("image_channels")},
        "feature_key": entry.get("feature_key"),
        "feature_config": feature_config,
        "seed": audit.seed,
        "conditioning": conditioning,
        "controls": manifest.controls_of(audit).model_dump(mode="json"),
        "fdr": manifest.fdr.model_dump(mode="json"),
        "software": software,
        "run": {k: run.get(k) for k in ("run_id", "output", "feature_store", "started_at", "finished_at", "seconds",
                                        "timings", "max_permutations")},
    }

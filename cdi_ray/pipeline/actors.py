"""The stages of the Ray Data streams (:mod:`cdi_ray.pipeline.streams` wires them), and the two thin
adapters of the feature stage (an actor pool, or warm tasks).

Feature stream per model::

    ImageRow batches (:mod:`cdi_ray.pipeline.rows`)
      ── map_batches(decode_batch)            CPU tasks: read bytes (shard members by locator),
                                              check hash, decode, preprocess
                                              (+ model-free descriptors → the store, where asked)
      ── map_batches(FeatureActor, compute=ActorPoolStrategy(min, max), num_gpus=…)
         or map_batches(warm_features, compute=TaskPoolStrategy(max))   (small CPU streams)
      ── map_batches(write_batch)             CPU tasks: one atomic part file per batch and config
      ── summary rows {key, cfg, status, error, actor}   (the driver only counts these)

Descriptor stream: :func:`describe_batch` (decode, describe, publish to the store).

:class:`FeatureStage` is Ray-free (``setup`` loads the model once, ``process`` maps a column batch
to feature rows) and is unit-testable alone; :class:`FeatureActor` (one model load per actor) and
:func:`warm_features` (one model per task worker process, kept between streams and runs) adapt
it to ``map_batches``, and :func:`feature_table` checks that output rows map one-to-one onto
(input row, config) pairs. Images are decoded
and preprocessed in CPU tasks, not in the actor, so GPU actors only run the model. (Ray Data fuses
a task stage into the next actor stage when their resources match: with ``num_gpus: 0`` the
decode runs inside the CPU feature actors, which saves a copy; with GPUs it stays in CPU tasks.)

Row statuses: ``ok``; ``error`` — a property of the bytes (undecodable, too small…), stored so
re-runs do not retry it; ``transient`` — could not read, the object changed since planning, or
the device ran out of memory: never stored (the next run retries it), recorded in the run's
folder so that the audit can say why the image is missing.
"""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from cdi_ray import storage
from cdi_ray.pipeline import rows
from cdi_ray.pipeline.model_cache import materialize_model

log = logging.getLogger(__name__)

STATUS_OK, STATUS_ERROR, STATUS_TRANSIENT = "ok", "error", "transient"

#: Columns every decoded batch carries into the feature actor (besides the row's own columns).
DECODED_COLUMNS = ("content_hash", "configs", "image", "status", "error")

#: Output schema of the feature actor; features travel as one list column because batches of
#: different configs have different widths (14 gray-box, 26 white-box columns). ``key`` is the
#: image's store key.
FEATURE_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("cfg", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("features", pa.list_(pa.float64())),
    ("actor", pa.string()),
])
#: What reaches the driver from a feature stream: counters only, never features or pixels.
SUMMARY_SCHEMA = pa.schema([("key", pa.string()), ("cfg", pa.string()), ("status", pa.string()),
                            ("error", pa.string()), ("actor", pa.string())])
#: This run's images that could not be computed now (never stored; the next run retries them).
TRANSIENT_SCHEMA = pa.schema([("key", pa.string()), ("reason", pa.string())])


def _part(folder: str) -> str:
    return storage.join(folder, f"part-{uuid.uuid4().hex}.parquet")


# ----------------------------------------------------------------------------------------------
# feature stream, stage 1: read, check, decode, preprocess (CPU tasks)
# ----------------------------------------------------------------------------------------------
def _read_batch(batch: dict[str, np.ndarray]) -> list:
    """The bytes (or read exception) of every row; shard members by locator, several per read."""
    from cdi_ray.sources import read_images

    uris = [str(u) for u in batch["uri"]]
    locs = [str(x) for x in batch["loc"]] if "loc" in batch else [""] * len(uris)
    return read_images(uris, locs)


def _load_one(uri: str, data, expected: str, size: int, channels: int):
    """Re-hash, decode and preprocess one image's bytes: ``(status, error, data, image, array)``."""
    from cdi_ray.images import ImageError, content_hash, decode_image, preprocess

    if isinstance(data, BaseException):  # any read failure is retried next run
        return STATUS_TRANSIENT, f"unreadable: {type(data).__name__}: {data}", None, None, None
    if content_hash(data) != expected:
        return STATUS_TRANSIENT, "changed_since_planning: the object's bytes changed during the run", None, None, None
    try:
        img = decode_image(data, name=uri)
        return STATUS_OK, "", data, img, preprocess(img, size=size, channels=channels)
    except ImageError as exc:
        return STATUS_ERROR, str(exc), data, None, None
    except Exception as exc:  # noqa: BLE001 — a decoder crash is a property of these bytes
        return STATUS_ERROR, f"undecodable: {type(exc).__name__}: {exc}", data, None, None


def _store_descriptors(store_root: str, key: str, hashes: list[str], status: list[str], errors: list[str],
                       values: list[dict | None]) -> None:
    """One atomic part file of descriptor rows (``ok`` and ``error``; never ``transient``)."""
    from cdi_ray.controls.descriptors import DESCRIPTOR_NAMES
    from cdi_ray.pipeline.store import DESCRIPTOR_PARTITION, FeatureStore

    keep = [i for i, s in enumerate(status) if s != STATUS_TRANSIENT]
    if not keep:
        return
    arrays = {
        "content_hash": pa.array([hashes[i] for i in keep], pa.string()),
        "model_fingerprint": pa.array([DESCRIPTOR_PARTITION] * len(keep), pa.string()),
        "config_hash": pa.array([key] * len(keep), pa.string()),
        "status": pa.array([status[i] for i in keep], pa.string()),
        "error": pa.array([errors[i] or None for i in keep], pa.string()),
    }
    for name in DESCRIPTOR_NAMES:
        arrays[name] = pa.array([values[i][name] if values[i] is not None else np.nan for i in keep], pa.float64())
    FeatureStore(store_root).write(DESCRIPTOR_PARTITION, key, pa.table(arrays))


def _descriptors_or_error(data, img, arr) -> tuple[dict | None, str]:
    from cdi_ray.controls.descriptors import image_descriptors

    try:
        return image_descriptors(data, img, arr), ""
    except Exception as exc:  # noqa: BLE001 — a property of these bytes; the control reports it
        return None, f"descriptors_failed: {type(exc).__name__}: {exc}"


def decode_batch(batch: dict[str, np.ndarray], *, size: int, channels: int,
                 descriptors: dict | None = None) -> dict[str, np.ndarray]:
    """:class:`~cdi_ray.pipeline.rows.ImageRow` columns → the row's columns (but where its bytes are)
    and ``image`` (B, C, size, size) float32, ``status``, ``error``.

    The bytes are re-hashed: an object rewritten since planning must not be stored under the
    old hash (status ``transient``; the next run sees the new hash).

    ``descriptors`` (``{"store_root", "key"}``): for the rows whose ``describe`` column is set, the
    model-free descriptors (:mod:`cdi_ray.controls.descriptors`) are computed here, from the bytes,
    decoded image and preprocessed array this stage holds anyway, and published to the store's
    descriptor partition ``key`` (one atomic part file per batch).
    """
    n = len(batch["uri"])
    images = np.zeros((n, channels, size, size), dtype=np.float32)
    status = np.full(n, STATUS_OK, dtype=object)
    errors = np.full(n, "", dtype=object)
    want = [bool(d) for d in batch["describe"]] if descriptors and "describe" in batch else [False] * n
    d_rows: list[int] = []
    d_values: list[dict | None] = []
    d_status: list[str] = []
    d_errors: list[str] = []
    for i, (uri, raw, expected) in enumerate(zip(batch["uri"], _read_batch(batch), batch["content_hash"])):
        status[i], errors[i], data, img, arr = _load_one(str(uri), raw, str(expected), size, channels)
        if arr is not None:
            images[i] = arr
        if want[i]:
            values, err = _descriptors_or_error(data, img, arr) if status[i] == STATUS_OK else (None, errors[i])
            d_rows.append(i)
            d_values.append(values)
            d_status.append(STATUS_OK if values is not None else status[i] if status[i] != STATUS_OK else STATUS_ERROR)
            d_errors.append(err)
    if d_rows:
        try:
            _store_descriptors(descriptors["store_root"], descriptors["key"],
                               [str(batch["content_hash"][i]) for i in d_rows], d_status, d_errors, d_values)
        except Exception as exc:  # noqa: BLE001 — never fail the feature stream for them: the
            # descriptor-only pass after the streams recomputes whatever is missing from the store
            log.warning("could not store model-free descriptors of %d images: %s", len(d_rows), exc)
    return {**rows.passthrough(batch), "image": images, "status": status, "error": errors}


def describe_batch(batch: dict[str, np.ndarray], *, size: int, channels: int, store_root: str, key: str) -> dict[str, np.ndarray]:
    """Descriptor-only stage (images whose model features are already stored):
    ``{uri, content_hash}`` → descriptors published to partition ``key``; returns ``{content_hash, status, error}``."""
    hashes = [str(h) for h in batch["content_hash"]]
    status, errors, values = [], [], []
    for uri, raw, expected in zip(batch["uri"], _read_batch(batch), hashes):
        st, err, data, img, arr = _load_one(str(uri), raw, expected, size, channels)
        v = None
        if st == STATUS_OK:
            v, err = _descriptors_or_error(data, img, arr)
            st = STATUS_OK if v is not None else STATUS_ERROR
        status.append(st)
        errors.append(err)
        values.append(v)
    _store_descriptors(store_root, key, hashes, status, errors, values)
    return {"content_hash": np.asarray(hashes, dtype=object), "status": np.asarray(status, dtype=object),
            "error": np.asarray(errors, dtype=object)}


# ----------------------------------------------------------------------------------------------
# feature stream, stage 2: features (the model, once per actor)
# ----------------------------------------------------------------------------------------------
class FeatureRow(NamedTuple):
    """One (image, feature config) result: ``features`` when ``status`` is ok, else ``error``."""

    key: str
    config: str
    status: str
    error: str | None
    features: list[float] | None


@dataclass
class FeatureStage:
    """Load one model once, then compute feature rows for batches under one or more configs.

    Args:
        model_uri (`str`): local folder or ``s3://`` prefix of the model.
        fingerprint (`str`): the fingerprint planned with; loading anything else is an error.
        configs (`dict[str, dict]`): store key → ``FeatureConfig`` keyword arguments.
        device (`str`): ``"cpu"`` or ``"cuda"``.
        dtype (`str`): weight dtype for ``load_model``.
        load_options (`dict`): family options for ``load_model`` (e.g. ``missing_label``).
        max_batch_mb (`float`, *optional*): ceiling on one model call's input tensor; a larger call
            fails as out of memory (``MemoryError``) — emulates a smaller accelerator, and drives the
            out-of-memory path deterministically.

    Out of memory (``torch.OutOfMemoryError`` or ``MemoryError``) in a call never loses the batch:
    the call is retried on each half, down to single images; an image that does not fit alone is
    a ``transient`` row (``out_of_memory: …``: not stored, so a run on a larger device computes
    it) and the rest of the batch is computed.
    """

    model_uri: str
    fingerprint: str
    configs: dict[str, dict]
    device: str = "cpu"
    dtype: str = "float32"
    load_options: dict = field(default_factory=dict)
    max_batch_mb: float | None = None

    def setup(self, model=None) -> None:
        """Load the model (or take ``model``, loaded earlier with this stage's model settings) and
        build one extractor per config."""
        from cdi_ray.features.config import FeatureConfig
        from cdi_ray.features.extractor import FeatureExtractor

        self.model = model if model is not None else self.load()
        if self.model.fingerprint != self.fingerprint:
            raise RuntimeError(
                f"model {self.model_uri} changed during the run (fingerprint {self.model.fingerprint[:12]}… "
                f"≠ planned {self.fingerprint[:12]}…); re-run the audit"
            )
        self.extractors = {
            key: FeatureExtractor(self.model, FeatureConfig(**kwargs, device=self.device))
            for key, kwargs in self.configs.items()
        }

    def load(self):
        """The model, loaded from ``model_uri`` with this stage's device, dtype and load options."""
        from cdi_ray.models.loader import load_model

        return load_model(materialize_model(self.model_uri), device=self.device, dtype=self.dtype, **self.load_options)

    @property
    def model_key(self) -> tuple:
        """What identifies the loaded model: stages with the same key can share it."""
        return (self.model_uri, self.fingerprint, self.device, self.dtype, repr(sorted(self.load_options.items())))

    def process(self, batch: dict[str, np.ndarray]) -> list[FeatureRow]:
        """One :class:`FeatureRow` per (image, config the image asks for), keyed by the image's store key.

        The model is conditioned on each row's label / captions (:class:`~cdi_ray.models.base.ImageMeta`).
        """
        images = rows.decode(batch)
        metas = image_metas(images)
        status = [str(s) for s in batch["status"]]
        errors = [str(e) for e in batch["error"]]
        out = []
        for key, extractor in self.extractors.items():
            mine = [i for i, r in enumerate(images) if key in r.configs]
            good = [i for i in mine if status[i] == STATUS_OK]
            feats = self._features_split(extractor, batch["image"], metas, good) if good else {}
            for i in mine:
                if isinstance(feats.get(i), list):
                    out.append(FeatureRow(images[i].key, key, STATUS_OK, None, feats[i]))
                else:
                    # out of memory is the machine's limit, not the image's: not stored, retried next run
                    out.append(FeatureRow(images[i].key, key, STATUS_TRANSIENT if i in feats else status[i],
                                          feats.get(i) or errors[i] or "failed", None))
        return out

    def _features_split(self, extractor, images: np.ndarray, metas: list, idx: list[int]) -> dict[int, list | str]:
        """Row index → feature list, or → the out-of-memory reason of an image that fails alone."""
        import torch

        oom = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
        x = torch.as_tensor(np.ascontiguousarray(images[idx]), dtype=torch.float32)
        try:
            if self.max_batch_mb is not None and x.numel() * x.element_size() > self.max_batch_mb * 2**20:
                raise MemoryError(f"{len(idx)} images × {x[0].numel() * x.element_size():,} bytes exceed "
                                  f"max_batch_mb={self.max_batch_mb}")
            values = extractor(x, [metas[i] for i in idx])
        except oom as exc:
            del x
            if self.device == "cuda":
                torch.cuda.empty_cache()
            if len(idx) == 1:
                return {idx[0]: f"out_of_memory: the model does not fit one image on {self.device} "
                                f"({type(exc).__name__}: {exc}) — use a device with more memory"}
            log.warning("out of memory on a batch of %d images; retrying as two halves", len(idx))
            half = len(idx) // 2
            return {**self._features_split(extractor, images, metas, idx[:half]),
                    **self._features_split(extractor, images, metas, idx[half:])}
        matrix = np.stack([np.asarray(values[c], dtype=np.float64) for c in extractor.columns], axis=1)
        return dict(zip(idx, matrix.tolist()))


def image_metas(images: list[rows.ImageRow]) -> list:
    """What the model is given per image: the content hash (the seed root) and its conditioning."""
    from cdi_ray.models.base import ImageMeta

    return [ImageMeta(content_hash=r.content_hash, label=r.label, captions=r.captions) for r in images]


class FeatureActor:
    """``map_batches`` adapter of an actor pool: ``FeatureStage`` loaded in ``__init__``, one call per batch.

    Every output row is tagged with this actor's id; the number of ``ok`` rows is the number of
    feature computations (what the de-duplication tests count).
    """

    def __init__(self, **stage_kwargs: Any):
        self.stage = FeatureStage(**stage_kwargs)
        self.stage.setup()
        try:
            import ray

            self.actor_id = ray.get_runtime_context().get_actor_id() or f"local-{os.getpid()}"
        except Exception:  # noqa: BLE001 — used outside Ray in unit tests
            self.actor_id = f"local-{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return feature_table(self.stage, batch, self.actor_id)


def import_model_stack() -> int:
    """Import what :func:`warm_features` needs to load a model and extract features, in this worker
    process (:func:`cdi_ray.pipeline.streams.prewarm_task_worker`); returns the process id."""
    import diffusers

    from cdi_ray.features.extractor import FeatureExtractor  # noqa: F401
    from cdi_ray.models.loader import load_model  # noqa: F401

    diffusers.ModelMixin  # noqa: B018 — diffusers imports lazily: this pulls in its model machinery
    return os.getpid()


#: The model a task worker process loaded last (``FeatureStage.model_key`` → model): at most one.
_WARM_MODEL: dict[tuple, Any] = {}


def warm_features(batch: dict[str, np.ndarray], **stage_kwargs: Any) -> pa.Table:
    """``map_batches`` function of a stream in warm tasks (``pool: tasks``; ``auto`` for a small CPU stream).

    Ray keeps task worker processes between tasks, streams and runs of one driver, so the model
    stack (torch, diffusers: ≈ 6 s of CPU to import) is imported once per worker process, and the
    last model used stays loaded there — where an actor pool would start a new process, import
    and load for every stream. Rows are tagged with the worker process (``task-<pid>``).
    """
    stage = FeatureStage(**stage_kwargs)
    model = _WARM_MODEL.get(stage.model_key)
    if model is None:
        _WARM_MODEL.clear()  # one model per worker process at most
        model = _WARM_MODEL[stage.model_key] = stage.load()
    stage.setup(model)
    return feature_table(stage, batch, f"task-{os.getpid()}")


def feature_table(stage: FeatureStage, batch: dict[str, np.ndarray], worker: str) -> pa.Table:
    """The stage's feature rows for one decoded batch, checked one-to-one against its inputs, tagged
    with the ``worker`` (actor or process) that computed them."""
    missing = [c for c in DECODED_COLUMNS if c not in batch]
    if missing:
        raise KeyError(f"the feature stage needs columns {list(DECODED_COLUMNS)}; missing {missing}")
    out = stage.process(batch)
    # One-to-one: every (input image, requested config) exactly once, nothing else.
    expected = sorted((r.key, c) for r in rows.decode(batch) for c in r.configs)
    if sorted((r.key, r.config) for r in out) != expected:
        raise RuntimeError(f"feature rows do not map one-to-one onto inputs ({len(out)} rows for {len(expected)} expected)")
    cols = list(zip(*out)) if out else [[]] * 5
    return pa.table([*(pa.array(c, t.type) for c, t in zip(cols, FEATURE_SCHEMA)),
                     pa.array([worker] * len(out), pa.string())], schema=FEATURE_SCHEMA)


# ----------------------------------------------------------------------------------------------
# feature stream, stage 3: publish to the store (CPU tasks)
# ----------------------------------------------------------------------------------------------
def write_batch(table: pa.Table, *, store_root: str, fingerprint: str, columns: dict[str, list[str]],
                transient_dir: str | None = None) -> pa.Table:
    """Write the batch's ``ok`` and ``error`` rows as one part file per config; return the summary.

    ``transient`` rows are not stored (the next run retries them); their reasons go to
    ``transient_dir`` (the run's folder), where aggregation finds why those images are missing.
    """
    from cdi_ray.pipeline.store import FeatureStore

    store = FeatureStore(store_root)
    keys = table.column("cfg").to_pylist()
    status = table.column("status").to_pylist()
    for key in sorted(set(keys)):
        idx = [i for i, (k, s) in enumerate(zip(keys, status)) if k == key and s != STATUS_TRANSIENT]
        if not idx:
            continue
        sub = table.take(pa.array(idx, pa.int64()))
        names = columns[key]
        feats = sub.column("features").to_pylist()
        matrix = np.array([f if f is not None else [np.nan] * len(names) for f in feats], dtype=np.float64).reshape(len(idx), len(names))
        arrays = {
            "content_hash": sub.column("key"),
            "model_fingerprint": pa.array([fingerprint] * len(idx), pa.string()),
            "config_hash": pa.array([key] * len(idx), pa.string()),
            "status": sub.column("status"),
            "error": sub.column("error"),
        }
        for j, name in enumerate(names):
            arrays[name] = pa.array(matrix[:, j], pa.float64())
        store.write(fingerprint, key, pa.table(arrays))
    transient = [i for i, s in enumerate(status) if s == STATUS_TRANSIENT]
    if transient and transient_dir:
        sub = table.take(pa.array(transient, pa.int64()))
        storage.write_parquet(_part(transient_dir), pa.table([sub.column("key"), sub.column("error")],
                                                             schema=TRANSIENT_SCHEMA))
    return table.select(list(SUMMARY_SCHEMA.names)).cast(SUMMARY_SCHEMA)

"""The Ray Data stages of the feature stream, and the one thin actor adapter.

Stream per model (``run.py`` wires it)::

    rows {uri, loc, content_hash, key, label, captions, cfgs}
      ── map_batches(decode_batch)            CPU tasks: read bytes (shard members by locator),
                                              check hash, decode, preprocess
                                              (+ model-free descriptors → the store, where needed)
      ── map_batches(FeatureActor, compute=ActorPoolStrategy(min, max), num_gpus=…)
      ── map_batches(write_batch)             CPU tasks: one atomic part file per batch and config
      ── summary rows {content_hash, cfg, status, error, actor}   (the driver only counts these)

:class:`FeatureStage` is Ray-free (NeMo Curator's stage shape: ``setup`` loads the model once,
``process`` maps a column batch to feature rows) and is unit-testable alone;
:class:`FeatureActor` adapts it to ``map_batches`` and checks that output rows map one-to-one
onto (input row, config) pairs by content hash. Images are decoded and preprocessed in CPU
tasks, not in the actor, so GPU actors only run the model. (Ray Data fuses a task stage into the
next actor stage when their resources match: with ``num_gpus: 0`` the decode runs inside the CPU
feature actors, which saves a copy; with GPUs the stages differ and decode stays in CPU tasks.)

Row statuses: ``ok``; ``error`` — a property of the bytes (undecodable, too small…), stored so
re-runs do not retry it; ``transient`` — could not read or the object changed since planning,
never stored (the next run retries it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from cdi_ray.pipeline.model_cache import materialize_model

log = logging.getLogger(__name__)

STATUS_OK, STATUS_ERROR, STATUS_TRANSIENT = "ok", "error", "transient"

#: Columns every decoded batch carries into the feature actor.
DECODED_COLUMNS = ("content_hash", "cfgs", "image", "status", "error")
#: Optional columns: the image's store key (default: its content hash), class index (-1: none) and
#: captions (a JSON list) — what the model is conditioned on (:mod:`cdi_ray.conditioning`).
CONDITIONING_COLUMNS = ("key", "label", "captions")

#: Output schema of the feature actor; features travel as one list column because batches of
#: different configs have different widths (14 gray-box, 26 white-box columns).
FEATURE_SCHEMA = pa.schema([
    ("content_hash", pa.string()),
    ("cfg", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("features", pa.list_(pa.float64())),
    ("actor", pa.string()),
])

SUMMARY_SCHEMA = pa.schema([
    ("content_hash", pa.string()),
    ("cfg", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("actor", pa.string()),
])


# ----------------------------------------------------------------------------------------------
# model description (s3:// models are fetched once per node: model_cache.py)
# ----------------------------------------------------------------------------------------------
def describe_model(uri: str, store_root: str, load_options: dict | None = None) -> dict:
    """Fingerprint, preprocessing geometry and conditioning of a model (``{fingerprint, image_size,
    image_channels, family, conditioning_kind, num_classes, null_class, class_names}``).

    The description is cached in the feature store by fingerprint (and load options, which can
    set the null class), so the model is loaded at most once ever for this; the fingerprint
    itself is a hash of the weights (seconds per GB).
    """
    from cdi_ray.models.fingerprint import model_fingerprint
    from cdi_ray.pipeline.store import FeatureStore

    path = materialize_model(uri)
    fp = model_fingerprint(path)
    store = FeatureStore(store_root)
    cache_id = fp if not load_options else fp + "-" + hashlib.sha256(
        json.dumps(load_options, sort_keys=True, default=str).encode()).hexdigest()[:16]
    info = store.model_info(cache_id)
    if info is None or "conditioning_kind" not in info:
        from cdi_ray.models.loader import load_model

        model = load_model(path, device="cpu", **(load_options or {}))
        info = {"image_size": int(model.image_size), "image_channels": int(model.image_channels), "family": model.family,
                "conditioning_kind": model.conditioning_kind, "num_classes": model.num_classes,
                "null_class": model.null_class,
                "class_names": {str(k): str(v) for k, v in (getattr(model, "class_names", None) or {}).items()}}
        try:
            store.put_model_info(cache_id, info)
        except OSError as exc:  # a read-only store still works, just slower next time
            log.warning("cannot cache model info in %s: %s", store_root, exc)
    return {"fingerprint": fp, **info}


# ----------------------------------------------------------------------------------------------
# stage 1: read, check, decode, preprocess (CPU tasks)
# ----------------------------------------------------------------------------------------------
#: Store "fingerprint" of the model-free descriptor partitions (``model=_descriptors/cfg=<key>``);
#: a real fingerprint is a sha256 hex digest, so it cannot collide.
DESCRIPTOR_PARTITION = "_descriptors"


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
    from cdi_ray.pipeline.store import FeatureStore

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
    """``{uri, content_hash, cfgs[, loc, desc, key, label, captions]}`` →
    ``{content_hash, cfgs, image (B,C,size,size) float32, status, error[, key, label, captions]}``.

    The bytes are re-hashed: an object rewritten since planning must not be stored under the
    old hash (status ``transient``; the next run sees the new hash).

    ``descriptors`` (``{"store_root", "key"}``): for the rows whose ``desc`` column is set, the
    model-free descriptors (:mod:`cdi_ray.controls.descriptors`) are computed here, from the bytes,
    decoded image and preprocessed array this stage holds anyway, and published to the store's
    descriptor partition ``key`` (one atomic part file per batch).
    """
    n = len(batch["uri"])
    images = np.zeros((n, channels, size, size), dtype=np.float32)
    status = np.full(n, STATUS_OK, dtype=object)
    errors = np.full(n, "", dtype=object)
    want = [bool(d) for d in batch["desc"]] if descriptors and "desc" in batch else [False] * n
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
    out = {
        "content_hash": np.asarray(batch["content_hash"], dtype=object),
        "cfgs": np.asarray(batch["cfgs"], dtype=object),
        "image": images,
        "status": status,
        "error": errors,
    }
    out.update({c: batch[c] for c in CONDITIONING_COLUMNS if c in batch})
    return out


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
# stage 2: features (the model, once per actor)
# ----------------------------------------------------------------------------------------------
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

    def setup(self) -> None:
        from cdi_ray.features.config import FeatureConfig
        from cdi_ray.features.extractor import FeatureExtractor
        from cdi_ray.models.loader import load_model

        path = materialize_model(self.model_uri)
        self.model = load_model(path, device=self.device, dtype=self.dtype, **self.load_options)
        if self.model.fingerprint != self.fingerprint:
            raise RuntimeError(
                f"model {self.model_uri} changed during the run (fingerprint {self.model.fingerprint[:12]}… "
                f"≠ planned {self.fingerprint[:12]}…); re-run the audit"
            )
        self.extractors = {
            key: FeatureExtractor(self.model, FeatureConfig(**kwargs, device=self.device))
            for key, kwargs in self.configs.items()
        }

    def process(self, batch: dict[str, np.ndarray]) -> list[tuple[str, str, str, str, list[float] | None]]:
        """Rows ``(image key, config key, status, error, features)`` — one per (image, config).

        The image key is the content hash, or the ``key`` column for images conditioned on a
        label / captions, which travel in ``label`` / ``captions`` into :class:`ImageMeta`.
        """
        hashes = [str(h) for h in batch["content_hash"]]
        keys = [str(k) for k in batch["key"]] if "key" in batch else hashes
        metas = image_metas(batch)
        cfgs = [str(c).split(",") for c in batch["cfgs"]]
        status = [str(s) for s in batch["status"]]
        errors = [str(e) for e in batch["error"]]
        out = []
        for key, extractor in self.extractors.items():
            rows = [i for i in range(len(hashes)) if key in cfgs[i]]
            good = [i for i in rows if status[i] == STATUS_OK]
            feats = self._features_split(extractor, batch["image"], metas, good) if good else {}
            for i in rows:
                if isinstance(feats.get(i), list):
                    out.append((keys[i], key, STATUS_OK, None, feats[i]))
                else:
                    # out of memory is the machine's limit, not the image's: not stored, retried next run
                    out.append((keys[i], key, STATUS_TRANSIENT if i in feats else status[i],
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


def image_metas(batch: dict[str, np.ndarray]) -> list:
    """One :class:`ImageMeta` per row: content hash (the seed root) and the conditioning columns."""
    from cdi_ray.models.base import ImageMeta

    n = len(batch["content_hash"])
    labels = batch["label"] if "label" in batch else [-1] * n
    captions = batch["captions"] if "captions" in batch else [""] * n
    return [ImageMeta(content_hash=str(h), label=None if int(lab) < 0 else int(lab),
                      captions=tuple(json.loads(str(c))) if str(c) else ())
            for h, lab, c in zip(batch["content_hash"], labels, captions)]


class FeatureActor:
    """``map_batches`` adapter: ``FeatureStage`` loaded in ``__init__``, one call per batch.

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
        missing = [c for c in DECODED_COLUMNS if c not in batch]
        if missing:
            raise KeyError(f"FeatureActor needs columns {list(DECODED_COLUMNS)}; missing {missing}")
        rows = self.stage.process(batch)
        # One-to-one: every (input hash, requested config) exactly once, nothing else.
        keys = batch["key"] if "key" in batch else batch["content_hash"]
        expected = sorted((str(h), k) for h, cs in zip(keys, batch["cfgs"]) for k in str(cs).split(","))
        got = sorted((r[0], r[1]) for r in rows)
        if got != expected:
            raise RuntimeError(f"feature rows do not map one-to-one onto inputs ({len(got)} rows for {len(expected)} expected)")
        cols = list(zip(*rows)) if rows else [[]] * 5
        return pa.table(
            [pa.array(cols[0], pa.string()), pa.array(cols[1], pa.string()), pa.array(cols[2], pa.string()),
             pa.array(cols[3], pa.string()), pa.array(cols[4], pa.list_(pa.float64())),
             pa.array([self.actor_id] * len(rows), pa.string())],
            schema=FEATURE_SCHEMA,
        )


# ----------------------------------------------------------------------------------------------
# stage 3: publish to the store (CPU tasks)
# ----------------------------------------------------------------------------------------------
def write_batch(table: pa.Table, *, store_root: str, fingerprint: str, columns: dict[str, list[str]]) -> pa.Table:
    """Write the batch's ``ok`` and ``error`` rows as one part file per config; return the summary.

    ``transient`` rows are not stored (the next run retries them).
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
            "content_hash": sub.column("content_hash"),
            "model_fingerprint": pa.array([fingerprint] * len(idx), pa.string()),
            "config_hash": pa.array([key] * len(idx), pa.string()),
            "status": sub.column("status"),
            "error": sub.column("error"),
        }
        for j, name in enumerate(names):
            arrays[name] = pa.array(matrix[:, j], pa.float64())
        store.write(fingerprint, key, pa.table(arrays))
    return table.select(["content_hash", "cfg", "status", "error", "actor"]).cast(SUMMARY_SCHEMA)


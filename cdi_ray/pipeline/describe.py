"""Stage 2 — describe the models: what each one is, before anything is computed on it.

Planning needs of every model its fingerprint (the store partition), its preprocessing geometry
(decode size; the model-free descriptors' partition) and its conditioning (class labels: how many,
the null class, the class names; captions). :func:`describe_model` learns them by loading the
model once; the description is cached in the store by fingerprint and load options, so each
model is loaded for this at most once per store (the fingerprint itself hashes the weights,
cached per process by file size and mtime).

Each model is described in a Ray task, never on the driver — the driver then neither loads a
model (gigabytes for a large one) nor imports the model stack — and an ``s3://`` model is fetched
on a worker node, where the actors will find it in the node cache. The tasks run while the
sources are listed and hashed (:func:`describe_models` returns a function that waits for them).

A local model's description is also kept in a node cache (``$CDI_RAY_CACHE/descriptions/``), keyed
by what ``stat`` says of its files (path, size, mtime) and the load options: a later run on the
node — a new output folder, so a new store — knows the model without a task, without hashing its
weights. A model rewritten since is a new key; one rewritten with its sizes and times forged is
caught where it is loaded (the feature actor checks the planned fingerprint).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field

from cdi_ray import storage
from cdi_ray.pipeline.model_cache import cache_root, materialize_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What planning knows of one model (JSON-safe; cached in the store's ``_models/``)."""

    fingerprint: str
    image_size: int
    image_channels: int
    family: str
    conditioning_kind: str = "none"  # "none" | "class" | "text"
    num_classes: int | None = None
    null_class: int | None = None
    class_names: dict[str, str] = field(default_factory=dict)

    @property
    def geometry(self) -> tuple[int, int]:
        """``(image size, channels)`` the model's images are preprocessed to."""
        return self.image_size, self.image_channels

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelInfos:
    """Stage 2's record: each model used by a live audit described, or why it cannot be used."""

    infos: dict[str, ModelInfo]
    errors: dict[str, str]

    def fingerprint(self, name: str) -> str:
        return self.infos[name].fingerprint


def describe_model(uri: str, store_root: str, load_options: dict | None = None) -> ModelInfo:
    """Fingerprint, geometry and conditioning of the model at ``uri`` (a folder or ``s3://`` prefix).

    Raises:
        cdi_ray.models.ModelLoadError: the model cannot be loaded (the message names the fix).
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
    known = {k: info[k] for k in ModelInfo.__dataclass_fields__ if k in info and k != "fingerprint"}
    return ModelInfo(fingerprint=fp, **known)


def _node_cache_file(uri: str, load_options: dict) -> str | None:
    """Where the node cache keeps a local model's description (None for ``s3://`` or a missing folder)."""
    if storage.is_remote(uri) or not os.path.isdir(storage.local_path(uri)):
        return None
    root = storage.local_path(uri)
    files = []
    try:
        for dirpath, dirnames, names in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(n for n in names if not n.startswith(".")):
                st = os.stat(os.path.join(dirpath, name))
                files.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns))
    except OSError:  # e.g. a dangling link: no cache, the task says what is wrong
        return None
    if not files:
        return None
    key = json.dumps([DESCRIPTION_VERSION, root, files, load_options], sort_keys=True, default=str)
    return os.path.join(os.path.dirname(cache_root()), "descriptions", hashlib.sha256(key.encode()).hexdigest() + ".json")


#: Bump when :class:`ModelInfo` or how it is learnt changes (old node-cache entries are then ignored).
DESCRIPTION_VERSION = 1


def _cached(path: str | None) -> ModelInfo | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            return ModelInfo(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _remember(path: str | None, info: ModelInfo) -> None:
    if path is None:
        return
    try:
        storage.atomic_write_bytes(path, json.dumps(info.to_dict(), sort_keys=True).encode())
    except OSError as exc:  # the cache is an optimisation: a read-only home still works
        log.debug("cannot cache the description in %s: %s", path, exc)


def describe_models(manifest, names: list[str], store_root: str):
    """Start describing ``names`` (models of ``manifest``) — from the node cache, else in Ray tasks;
    returns a function that waits for them and gives the :class:`ModelInfos`, so that other stages
    run meanwhile. A model that cannot be used fails only the audits on it."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(describe_model)
    specs = [manifest.models[n] for n in names]
    caches = [_node_cache_file(s.uri, dict(s.options)) for s in specs]
    pending = [_cached(c) or task.remote(s.uri, store_root, dict(s.options)) for s, c in zip(specs, caches)]

    def result() -> ModelInfos:
        infos, errors = {}, {}
        for name, spec, cache, handle in zip(names, specs, caches, pending):
            if isinstance(handle, ModelInfo):
                infos[name] = handle
                continue
            try:
                infos[name] = ray.get(handle)
            except Exception as exc:  # noqa: BLE001 — fails the audits on this model only
                cause = getattr(exc, "cause", None) or exc
                errors[name] = f"model {name!r} ({spec.uri}) cannot be used: {type(cause).__name__}: {cause}"
                continue
            _remember(cache, infos[name])
        return ModelInfos(infos, errors)

    return result

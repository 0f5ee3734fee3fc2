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
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field

from cdi_ray.pipeline.model_cache import materialize_model

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


def describe_models(manifest, names: list[str], store_root: str):
    """Start describing ``names`` (models of ``manifest``) in Ray tasks; returns a function that
    waits for them and gives the :class:`ModelInfos`, so that other stages run meanwhile. A model
    that cannot be used fails only the audits on it."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2)(describe_model)
    specs = [manifest.models[n] for n in names]
    pending = [task.remote(s.uri, store_root, dict(s.options)) for s in specs]

    def result() -> ModelInfos:
        infos, errors = {}, {}
        for name, spec, ref in zip(names, specs, pending):
            try:
                infos[name] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 — fails the audits on this model only
                cause = getattr(exc, "cause", None) or exc
                errors[name] = f"model {name!r} ({spec.uri}) cannot be used: {type(cause).__name__}: {cause}"
        return ModelInfos(infos, errors)

    return result

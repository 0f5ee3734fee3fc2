"""Features and model-free descriptors of bundle images, in process, cached on disk.

The reference and guard benchmarks (``jobs/reference_results.py``, ``jobs/guard_evidence.py``)
evaluate thousands of audits on the same images; this computes each image's features once. It
runs the same ``FeatureExtractor`` the pipeline's actors run, on the PNG bytes ``cdi-ray demo``
writes, so content hashes — and therefore every per-image random draw — match the pipeline's.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

#: Images per extraction batch: the demo UNet is ~1 M parameters at 16×16, so 256 fit easily.
BATCH = 256
DEFAULT_CACHE = Path.home() / ".cache" / "cdi-ray" / "reference"


def demo_features(model_name: str, indices: np.ndarray, *, seed: int = 0, preset: str | tuple[str, ...] = "white-box",
                  overrides: dict | None = None,
                  cache: Path | None = DEFAULT_CACHE) -> tuple[np.ndarray, list[str], float]:
    """``(X, columns, seconds)``: features of bundle images ``indices`` on demo model ``model_name``.

    ``preset`` and ``overrides`` are ``FeatureConfig``'s ``features`` and ``overrides``.

    Cached under ``cache`` by (model fingerprint, feature-config hash, indices); ``seconds`` is the
    extraction time of the run that computed them.
    """
    import torch

    from cdi_ray.demo.audit import encode_png
    from cdi_ray.demo.bundle import demo_model_dir, load_bundle
    from cdi_ray.features.config import FeatureConfig
    from cdi_ray.features.extractor import FeatureExtractor
    from cdi_ray.images import content_hash
    from cdi_ray.models import load_model
    from cdi_ray.models.base import ImageMeta

    indices = np.asarray(indices, dtype=np.int64)
    model = load_model(demo_model_dir(model_name))
    config = FeatureConfig(features=preset, overrides=overrides or {}, seed=seed)
    key = hashlib.sha256(f"{model.fingerprint}|{config.config_hash()}|{indices.tobytes().hex()}".encode()).hexdigest()[:16]
    file = cache / f"{model_name}-{key}.npz" if cache is not None else None
    if file is not None and file.exists():
        data = np.load(file, allow_pickle=False)
        return data["X"], list(data["columns"]), float(data["seconds"])
    bundle = load_bundle()
    extractor = FeatureExtractor(model, config)
    rows, t0 = [], time.perf_counter()
    for start in range(0, len(indices), BATCH):
        idx = indices[start:start + BATCH]
        metas = [ImageMeta(content_hash=content_hash(encode_png(bundle.images[int(i)]))) for i in idx]
        cols = extractor(torch.from_numpy(bundle.images_float(idx)), metas)
        rows.append(np.stack([cols[c] for c in extractor.columns], axis=1))
    seconds = time.perf_counter() - t0
    X = np.concatenate(rows) if rows else np.zeros((0, len(extractor.columns)))
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(file, X=X, columns=np.array(extractor.columns), seconds=seconds)
    return X, list(extractor.columns), seconds


def demo_descriptors(indices: np.ndarray, *, size: int = 16, channels: int = 1) -> np.ndarray:
    """Model-free descriptors (:mod:`cdi_ray.controls.descriptors`) of bundle images as the demo's PNG files."""
    from cdi_ray.controls.descriptors import descriptor_matrix, image_descriptors
    from cdi_ray.demo.audit import encode_png
    from cdi_ray.demo.bundle import load_bundle
    from cdi_ray.images import decode_image, preprocess

    bundle = load_bundle()
    rows = []
    for i in np.asarray(indices, dtype=np.int64):
        data = encode_png(bundle.images[int(i)])
        img = decode_image(data, name=f"bundle[{int(i)}]")
        rows.append(image_descriptors(data, img, preprocess(img, size=size, channels=channels)))
    return descriptor_matrix(rows)

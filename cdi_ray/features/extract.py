"""One model over a set of image files → one Parquet file of feature rows (``cdi-ray features``).

Columns, in order: ``image_id`` (the file name), ``content_hash`` (sha256 of the file's bytes),
``model_fingerprint``, ``feature_config_hash``, then the preset's feature columns (float64).
The ``FeatureConfig`` JSON and the column list are stored in the schema metadata
(``cdi_ray.feature_config``, ``cdi_ray.feature_columns``).

Single process, no Ray: the reference implementation of what ``pipeline/`` does at scale, and the
quick way to featurise a folder.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from cdi_ray.features.config import FeatureConfig
from cdi_ray.features.extractor import FeatureExtractor
from cdi_ray.localfs import read_regular
from cdi_ray.models.base import ImageMeta

log = logging.getLogger(__name__)

ID_COLUMNS = ("image_id", "content_hash", "model_fingerprint", "feature_config_hash")


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def list_images(images: str | os.PathLike) -> list[tuple[Path, int | None]]:
    """The image files named by ``images``, with an optional class label each.

    ``images`` is a directory (its image files, by extension, sorted by name; not recursive,
    hidden files skipped) or a text file with one path per line (relative paths are relative to
    the list file; blank lines and ``#`` comments skipped; ``path<TAB>label`` gives a class label).
    """
    src = Path(images)
    if not src.exists():
        raise FileNotFoundError(f"images: '{src}' does not exist; pass a folder of images or a text file listing image paths")
    if src.is_dir():
        exts = _image_extensions()
        files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)
        if not files:
            raise FileNotFoundError(f"images: no image files in folder '{src}' (looked for {', '.join(sorted(exts)[:8])}, …)")
        return [(p, None) for p in files]
    out: list[tuple[Path, int | None]] = []
    for lineno, line in enumerate(src.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, _, label = line.partition("\t")
        p = Path(path.strip())
        if not p.is_absolute():
            p = src.parent / p
        if not p.is_file():
            raise FileNotFoundError(f"images: '{p}' (line {lineno} of '{src}') is not a file")
        try:
            lab = int(label) if label.strip() else None
        except ValueError:
            raise ValueError(f"images: line {lineno} of '{src}' has label {label.strip()!r}, expected an integer class index") from None
        out.append((p, lab))
    if not out:
        raise FileNotFoundError(f"images: the list file '{src}' names no image")
    return out


def _check_labels(files: list[tuple[Path, int | None]], model) -> None:
    """Class-conditional models need a label per image (unless loaded with a null class for missing ones)."""
    from cdi_ray.images import ImageError

    n_classes = getattr(model, "num_classes", None)
    null_ok = getattr(model, "missing_label", "error") == "null"
    how = "give labels in a list file, one 'path<TAB>label' per line"
    for path, label in files:
        if label is None and not null_ok:
            raise ImageError(str(path), f"has no class label, but the model is class-conditional "
                                        f"({n_classes} classes); {how}")
        if label is not None and n_classes is not None and not 0 <= label < n_classes:
            raise ImageError(str(path), f"class label {label} is outside the model's [0, {n_classes - 1}]; {how}")


def _batches(items: list, size: int) -> Iterator[list]:
    for s in range(0, len(items), size):
        yield items[s:s + size]


def extract_to_parquet(
    model_dir: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    preset: str = "white-box",
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 32,
    config: FeatureConfig | None = None,
    labels: Mapping[str, int] | None = None,
    captions: Mapping[str, str | Sequence[str]] | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> int:
    """Compute the features of every image and write them to ``out`` (Parquet). Returns the row count.

    Args:
        model_dir (`str`): a local model directory (``cdi_ray.models.load_model``).
        images (`str`): a folder of images or a text file listing image paths (see ``list_images``).
        out (`str`): the Parquet file to write (parent folders are created; written atomically).
        preset (`str`, *optional*, defaults to ``"white-box"``): ``"white-box"`` (26) or ``"gray-box"`` (14).
        seed (`int`, *optional*, defaults to 0): the audit seed.
        device (`str`, *optional*, defaults to ``"cpu"``).
        batch_size (`int`, *optional*, defaults to 32): images per model batch.
        config (`FeatureConfig`, *optional*): full settings; replaces ``preset``, ``seed``, ``device``.
        labels (`Mapping[str, int]`, *optional*): class label per image file name (class-conditional models);
            a label from the list file takes precedence.
        captions (`Mapping[str, str | Sequence[str]]`, *optional*): caption(s) per image file name (text-conditional
            models; with several, one is chosen per image by the seed).
        model_options (`Mapping`, *optional*): family options for ``load_model``, e.g. ``{"missing_caption": "empty"}``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cdi_ray.images import content_hash, decode_image, preprocess
    from cdi_ray.models import load_model

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = config if config is not None else FeatureConfig(features=preset, seed=seed, device=device)
    files = list_images(images)
    model = load_model(model_dir, device=cfg.device, **dict(model_options or {}))
    extractor = FeatureExtractor(model, cfg)
    mode = "L" if model.image_channels == 1 else "RGB"
    labels = dict(labels or {})
    files = [(p, lab if lab is not None else labels.get(p.name)) for p, lab in files]
    if model.conditioning_kind == "class":
        _check_labels(files, model)
    captions = {name: (c,) if isinstance(c, str) else tuple(c) for name, c in (captions or {}).items()}
    if model.conditioning_kind == "text":
        from cdi_ray.images import ImageError

        for path, _ in files:
            if model.meta_problem(ImageMeta(str(path), captions=captions.get(path.name, ()))):
                raise ImageError(str(path), "has no caption, but the model is text-conditional; pass captions="
                                 "{file name: caption(s)}, or model_options={'missing_caption': 'empty'}")

    from cdi_ray.sources.reading import max_image_bytes

    ids: list[str] = []
    hashes: list[str] = []
    columns: dict[str, list[np.ndarray]] = {c: [] for c in extractor.columns}
    for batch in _batches(files, batch_size):
        arrays, metas = [], []
        for path, label in batch:
            data = read_regular(str(path), max_image_bytes(), "image")  # a regular file, bounded in size
            h = content_hash(data)
            img = decode_image(data, name=str(path), mode=mode)
            arrays.append(preprocess(img, size=model.image_size, channels=model.image_channels))
            metas.append(ImageMeta(content_hash=h, label=label, captions=captions.get(path.name, ())))
            ids.append(path.name)
            hashes.append(h)
        feats = extractor(torch.from_numpy(np.stack(arrays)), metas)
        for c in extractor.columns:
            columns[c].append(feats[c])
        log.info("features: %d / %d images", len(ids), len(files))

    n = len(ids)
    fields = {
        "image_id": pa.array(ids, pa.string()),
        "content_hash": pa.array(hashes, pa.string()),
        "model_fingerprint": pa.array([model.fingerprint] * n, pa.string()),
        "feature_config_hash": pa.array([extractor.config_hash] * n, pa.string()),
    }
    for c in extractor.columns:
        fields[c] = pa.array(np.concatenate(columns[c]).astype(np.float64), pa.float64())
    table = pa.table(fields).replace_schema_metadata({
        "cdi_ray.feature_config": cfg.model_dump_json(),
        "cdi_ray.feature_columns": json.dumps(extractor.columns),
    })
    dest = Path(out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n

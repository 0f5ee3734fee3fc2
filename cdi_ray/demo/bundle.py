"""The bundled demo data (``fashion16``) and the two demo models, read from the installed package.

``fashion16.npz`` holds a class-balanced subset of Fashion-MNIST (Zalando, MIT licence),
downscaled to 16×16 uint8 (see ``docs/DEMO_DATA.md`` and ``jobs/build_bundle.py``).
Its indices are split into three disjoint pools, stored contiguously:

* ``heldout`` — never used to train either demo model;
* ``easy``    — the members of ``models/easy``;
* ``hard``    — the members of ``models/hard``.

Example::

    from cdi_ray.demo import load_bundle, demo_model_dir, load_split
    b = load_bundle()                       # verifies sha256 against fashion16.json
    split = load_split("easy")              # {"members": [...], "heldout": [...], "training": {...}}
    P = b.images[split["members"]]          # (500, 16, 16) uint8
    U = b.images[split["heldout"]]
    unet_dir = demo_model_dir("easy") / "unet"
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import numpy as np

BUNDLE_NAME = "fashion16"
DEMO_MODELS = ("easy", "hard")
_ARRAYS = ("images", "labels", "source_index")


class BundleIntegrityError(ValueError):
    """The bundle file does not match the hashes recorded in its JSON (corrupt or modified)."""


@dataclass(frozen=True)
class Bundle:
    """The demo images with their labels and provenance.

    Attributes:
        images (`ndarray` of shape (N, 16, 16), uint8): grey-scale images, 0 = black.
        labels (`ndarray` of shape (N,), uint8): Fashion-MNIST class 0–9 (names in ``class_names``).
        source_index (`ndarray` of shape (N,), int32): row of the image in the Fashion-MNIST train split.
        pools (`dict[str, range]`): ``"heldout"``, ``"easy"``, ``"hard"`` → bundle indices.
        class_names (`tuple[str, ...]`).
        meta (`dict`): the full ``fashion16.json`` (hashes, provenance, licence).
    """

    images: np.ndarray
    labels: np.ndarray
    source_index: np.ndarray
    pools: dict[str, range]
    class_names: tuple[str, ...]
    meta: dict[str, Any] = field(repr=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pool(self, name: str) -> np.ndarray:
        """Bundle indices of pool ``name`` as an int64 array."""
        if name not in self.pools:
            raise KeyError(f"unknown pool {name!r}; valid pools: {sorted(self.pools)}")
        r = self.pools[name]
        return np.arange(r.start, r.stop, dtype=np.int64)

    def images_float(self, index: np.ndarray | slice | None = None) -> np.ndarray:
        """Images scaled to [-1, 1] as float32 of shape (n, 1, 16, 16), the demo models' input."""
        x = self.images if index is None else self.images[index]
        return (x.astype(np.float32) / 127.5 - 1.0)[:, None]


@contextlib.contextmanager
def _asset(*parts: str) -> Iterator[Path]:
    """A real filesystem path to a file under ``cdi_ray/demo_assets`` (works from wheels and zips)."""
    ref = resources.files("cdi_ray").joinpath("demo_assets", *parts)
    with resources.as_file(ref) as p:
        yield Path(p)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_bundle(verify: bool = True, path: str | Path | None = None) -> Bundle:
    """Load the bundled ``fashion16`` demo data.

    Args:
        verify (`bool`, *optional*, defaults to `True`):
            check the sha256 of the ``.npz`` file and of every array against ``fashion16.json``,
            and the arrays' dtypes and shapes. A mismatch raises `BundleIntegrityError`.
        path (`str` or `Path`, *optional*):
            an ``.npz`` to load instead of the packaged one; its JSON must sit next to it with
            the same stem. Defaults to ``cdi_ray/demo_assets/fashion16.npz`` in the installed package.

    Returns:
        `Bundle`
    """
    if path is None:
        with _asset(f"{BUNDLE_NAME}.npz") as npz_path, _asset(f"{BUNDLE_NAME}.json") as json_path:
            return _load(npz_path, json_path, verify)
    npz_path = Path(path)
    return _load(npz_path, npz_path.with_suffix(".json"), verify)


def _load(npz_path: Path, json_path: Path, verify: bool) -> Bundle:
    if not npz_path.is_file():
        raise FileNotFoundError(f"demo bundle {npz_path} is missing; rebuild it with `python jobs/build_bundle.py`")
    if not json_path.is_file():
        raise FileNotFoundError(f"demo bundle metadata {json_path} is missing; rebuild with `python jobs/build_bundle.py`")
    meta = json.loads(json_path.read_text())
    fix = "the file is corrupt or was modified; reinstall cdi-ray or rebuild it with `python jobs/build_bundle.py`"

    # 1. whole-file hash: catches truncation and any byte flip before NumPy parses anything
    if verify:
        got = _sha256_file(npz_path)
        if got != meta["npz_sha256"]:
            raise BundleIntegrityError(
                f"{npz_path}: sha256 {got} does not match {meta['npz_sha256']} recorded in {json_path.name}; {fix}")

    # 2. parse
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAYS}
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as e:
        raise BundleIntegrityError(f"{npz_path}: cannot be read as the demo bundle ({type(e).__name__}: {e}); {fix}") from e

    # 3. per-array dtype, shape and content hashes
    if verify:
        for k, a in arrays.items():
            want = meta["arrays"][k]
            if str(a.dtype) != want["dtype"] or list(a.shape) != want["shape"]:
                raise BundleIntegrityError(
                    f"{npz_path}: array {k!r} is {a.dtype}{list(a.shape)}, expected {want['dtype']}{want['shape']}; {fix}")
            got = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
            if got != want["sha256"]:
                raise BundleIntegrityError(f"{npz_path}: array {k!r} sha256 {got} != recorded {want['sha256']}; {fix}")

    for a in arrays.values():
        a.setflags(write=False)
    pools = {name: range(p["start"], p["stop"]) for name, p in meta["pools"].items()}
    return Bundle(images=arrays["images"], labels=arrays["labels"], source_index=arrays["source_index"],
                  pools=pools, class_names=tuple(meta["class_names"]), meta=meta)


def demo_model_dir(name: str) -> Path:
    """Directory of a shipped demo model (``"easy"`` or ``"hard"``): ``model_index.json``, ``unet/``, ``scheduler/``, ``split.json``.

    The path is inside the installed package; it is a real directory for regular (non-zip) installs.
    """
    if name not in DEMO_MODELS:
        raise ValueError(f"name must be one of {list(DEMO_MODELS)}, got {name!r}")
    d = Path(str(resources.files("cdi_ray").joinpath("demo_assets", "models", name)))
    if not (d / "unet").is_dir():
        raise FileNotFoundError(f"demo model {name!r} not found at {d}; train it with `python jobs/train_demo_models.py --which {name}`")
    return d


def load_split(name: str) -> dict[str, Any]:
    """``split.json`` of a demo model: ``members``/``heldout`` bundle indices and its training settings."""
    return json.loads((demo_model_dir(name) / "split.json").read_text())

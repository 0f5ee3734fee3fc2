"""A model's identity: sha256 over its config and weight files.

``model_fingerprint(dir)`` = sha256 of the sorted list of (relative path, sha256 of the file's
bytes) for every config/weight file under ``dir``. Hidden files and folders (``.git``,
``.cache``, ``.ipynb_checkpoints``…) and ``__pycache__`` are ignored, and so are files that are
neither config nor weights (README.md, sample images), so editing a model card does not
invalidate the feature store.

Hashing gigabytes takes seconds, so each file's digest is cached in-process by
(absolute path, size, mtime_ns, inode): a second call only stats the files.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from .base import ModelLoadError

FINGERPRINT_VERSION = "cdi-ray-fingerprint-v1"

# Config and weight files of diffusers / transformers / original checkpoints (tokenizer files included).
FINGERPRINT_SUFFIXES = (
    ".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".npz",
    ".yaml", ".yml", ".txt", ".model",
)
_CHUNK = 1 << 20

_cache: dict[tuple[str, int, int, int], str] = {}
_lock = threading.Lock()


def _file_sha256(file: str, key: tuple[str, int, int, int]) -> str:
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _cache[key] = digest
    return digest


def fingerprint_files(path: str | Path) -> list[tuple[str, str]]:
    """Sorted (relative POSIX path, sha256 hex) of the files that make up the fingerprint."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLoadError(f"cannot fingerprint model '{path}': not a directory. Fix: pass the model's local directory")
    entries: list[tuple[str, str]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(FINGERPRINT_SUFFIXES):
                continue
            file = os.path.join(dirpath, name)
            try:
                st = os.stat(file)
            except OSError:  # dangling symlink
                continue
            key = (os.path.abspath(file), st.st_size, st.st_mtime_ns, st.st_ino)
            rel = Path(os.path.relpath(file, root)).as_posix()
            entries.append((rel, _file_sha256(file, key)))
    entries.sort()
    return entries


def model_fingerprint(path: str | Path) -> str:
    """sha256 hex over the sorted (relative path, sha256 of bytes) of the model's config/weight files."""
    entries = fingerprint_files(path)
    if not entries:
        raise ModelLoadError(f"cannot fingerprint model '{path}': it holds no config or weight files. "
                             "Fix: point at a directory written by `save_pretrained`")
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for rel, digest in entries:
        h.update(f"\n{rel}\x00{digest}".encode())
    return h.hexdigest()


def clear_fingerprint_cache() -> None:
    """Forget cached file digests (tests; or after files were rewritten within the mtime resolution)."""
    with _lock:
        _cache.clear()

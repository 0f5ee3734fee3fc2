"""``cdi-ray pack``: a folder of images (+ a metadata sidecar) → WebDataset tar or Parquet shards.

The bytes are copied unchanged, so every image keeps its content hash and the features a folder
run stored are reused by a run over the shards (:mod:`cdi_ray.sources`). Ray-free.
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
from typing import Iterator

from cdi_ray import storage
from cdi_ray.sources import ImageEntry, attach_sidecar

log = logging.getLogger(__name__)

#: Rows per Parquet row group: one decode batch reads about one row group.
ROW_GROUP_ROWS = 64


def _pack_key(rel: str) -> str:
    """A WebDataset key for an image path: no dots (the key ends at the first dot), no '/'."""
    stem = rel.rsplit(".", 1)[0]
    return stem.replace("/", "__").replace(".", "_")


def iter_pack_shards(entries: list[ImageEntry], root: str, fmt: str, shard_size: int) -> Iterator[tuple[str, bytes, int]]:
    """``(shard file name, shard bytes, images)`` for ``entries`` packed ``shard_size`` to a shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shard_size <= 0:
        raise ValueError(f"--shard-size must be positive, got {shard_size}")
    prefix = root.rstrip("/") + "/"
    for n, start in enumerate(range(0, len(entries), shard_size)):
        chunk = entries[start: start + shard_size]
        rels = [e.uri[len(prefix):] if e.uri.startswith(prefix) else storage.basename(e.uri) for e in chunk]
        if fmt == "webdataset":
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                used: set[str] = set()
                for e, rel in zip(chunk, rels):
                    key = _pack_key(rel)
                    while key in used:
                        key += "_"
                    used.add(key)
                    members = [(key + os.path.splitext(rel)[1].lower(), storage.read_bytes(e.uri))]
                    if e.label is not None:
                        members.append((key + ".cls", e.label.encode()))
                    if e.captions:
                        members.append((key + ".txt", "\n".join(e.captions).encode()))
                    for name, data in members:
                        info = tarfile.TarInfo(name)
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        tar.addfile(info, io.BytesIO(data))
            yield f"shard-{n:06d}.tar", buf.getvalue(), len(chunk)
        elif fmt == "parquet":
            table = pa.table({
                "id": pa.array(rels, pa.string()),
                "image": pa.array([storage.read_bytes(e.uri) for e in chunk], pa.binary()),
                "label": pa.array([e.label for e in chunk], pa.string()),
                "captions": pa.array([list(e.captions) for e in chunk], pa.list_(pa.string())),
            })
            buf = io.BytesIO()
            pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS, compression="none")
            yield f"shard-{n:06d}.parquet", buf.getvalue(), len(chunk)
        else:
            raise ValueError(f"unknown shard format {fmt!r} — use webdataset or parquet")


def pack(src: str, dest: str, *, fmt: str, shard_size: int = 1000, metadata: str | None = None) -> dict:
    """Pack the images under folder/prefix ``src`` (+ a sidecar) into shards under ``dest``.

    Images are packed in URI order with their labels and captions (``KEY.cls`` / ``KEY.txt`` in
    tars; ``label`` / ``captions`` columns in Parquet, image bytes in ``image``, the path in ``id``).
    The bytes are copied unchanged, so every image keeps its content hash. Each shard is written
    atomically. Returns ``{"shards": [URI…], "images": n}``.
    """
    root = storage.normalize(src).rstrip("/")
    listed = storage.list_images(root)
    files = [e for e in listed if e.error is None]  # a FIFO, a device, a broken link …: not packed
    for e in listed:
        if e.error is not None:
            log.warning("not packed: %s", e.error)
    if not files:
        raise FileNotFoundError(f"no image files under {src}")
    if metadata is None:
        for name in ("metadata.jsonl", "metadata.csv"):
            if storage.exists(storage.join(root, name)):
                metadata = storage.join(root, name)
                break
    entries = attach_sidecar(files, root, metadata) if metadata else [ImageEntry(e.uri, e.size, e.version) for e in files]
    out = []
    dest = dest if storage.is_remote(dest) else storage.normalize(dest)
    for name, data, _ in iter_pack_shards(entries, root, fmt, shard_size):
        uri = storage.join(dest, name)
        storage.atomic_write_bytes(uri, data)
        out.append(uri)
    return {"shards": out, "images": len(entries), "metadata": metadata}

"""The records every source shape produces: an :class:`ImageEntry` per image, a :class:`ShardRef`
per shard not indexed yet, and the listing table (:data:`LISTING_SCHEMA`, one row per image, in a
stable order) that carries them between tasks and files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa

from cdi_ray import storage


@dataclass(frozen=True)
class ImageEntry:
    """One image of a collection, with what travels with it.

    ``label`` is the collection's own name for the class (a string such as ``"n01440764"`` or
    ``"3"``; mapped to a model's index by :mod:`cdi_ray.conditioning`); ``captions`` are its
    caption(s). ``content_hash`` is known for shard members (hashed while indexing the shard),
    ``None`` for loose files (hashed by the pipeline). ``error`` is a per-image problem found while
    listing (e.g. a sidecar row that is not valid JSON): the image is reported as unusable.
    ``size`` is -1 for a listed URI that does not exist.
    """

    uri: str
    size: int
    version: str
    loc: str = ""
    label: str | None = None
    captions: tuple[str, ...] = ()
    content_hash: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ShardSpec:
    """How to read one kind of shard (``kind`` is ``"webdataset"`` or ``"parquet"``)."""

    kind: str
    image_column: str = "image"
    label_column: str | None = None
    caption_column: str | None = None
    id_column: str | None = None

    def cache_id(self) -> str:
        return json.dumps([self.kind, self.image_column, self.label_column, self.caption_column, self.id_column])

    @classmethod
    def from_cache_id(cls, text: str) -> "ShardSpec":
        return cls(*json.loads(text))


@dataclass(frozen=True)
class ShardRef:
    """A listed shard whose images are not known yet (:func:`cdi_ray.sources.shards.index_shard_cached`)."""

    entry: storage.FileEntry
    spec: ShardSpec


#: Columns of a listing, in order.
LISTING_SCHEMA = pa.schema([
    ("uri", pa.string()), ("size", pa.int64()), ("version", pa.string()), ("loc", pa.string()),
    ("label", pa.string()), ("captions", pa.list_(pa.string())), ("content_hash", pa.string()), ("error", pa.string()),
])
LISTING_COLUMNS = tuple(LISTING_SCHEMA.names)


def entries_table(entries: Iterable[ImageEntry]):
    """A listing table of ``entries`` (in their order)."""
    entries = list(entries)
    return pa.table({
        "uri": pa.array([e.uri for e in entries], pa.string()),
        "size": pa.array([e.size for e in entries], pa.int64()),
        "version": pa.array([e.version for e in entries], pa.string()),
        "loc": pa.array([e.loc for e in entries], pa.string()),
        "label": pa.array([e.label for e in entries], pa.string()),
        "captions": pa.array([list(e.captions) for e in entries], pa.list_(pa.string())),
        "content_hash": pa.array([e.content_hash for e in entries], pa.string()),
        "error": pa.array([e.error for e in entries], pa.string()),
    }, schema=LISTING_SCHEMA)


def table_entries(table) -> list[ImageEntry]:
    """The entries of a listing table (small tables: tests, one shard)."""
    cols = {c: table.column(c).to_pylist() for c in LISTING_COLUMNS}
    return [ImageEntry(u, s, v, loc or "", lab, tuple(caps or ()), h, err)
            for u, s, v, loc, lab, caps, h, err in zip(*(cols[c] for c in LISTING_COLUMNS))]


def read_listing(parts: Iterable[str]):
    """One listing table from its part files (a source's images, in order)."""
    tables = [storage.read_parquet(p, columns=list(LISTING_COLUMNS)).cast(LISTING_SCHEMA) for p in parts]
    return pa.concat_tables(tables) if tables else LISTING_SCHEMA.empty_table()

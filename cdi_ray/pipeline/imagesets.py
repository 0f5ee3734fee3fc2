"""The images each audit run reads: sources resolved to content hashes, and keyed image sets.

Part of planning (:mod:`cdi_ray.pipeline.plan`), Ray-free. A source's listing is **resolved**
once per batch — each image's content hash (this run's hash results first, then the store's
URI → hash index), or the reason it has none — and written to ``<run>/sources/<id>.parquet``.
Under a model, a resolved source becomes an **image set**: each usable image's store key under
that model (the content hash; for conditional models the key of (content, conditioning),
:mod:`cdi_ray.conditioning`, written to ``<run>/keys/…``). Aggregation reads the same files, so
it sees exactly the images and keys that were planned.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cdi_ray import storage
from cdi_ray.conditioning import LabelProblems, condition_images, read_label_map
from cdi_ray.pipeline.hashing import RESULT_SCHEMA, HashedImages
from cdi_ray.pipeline.listing import Listings
from cdi_ray.pipeline.store import FeatureStore
from cdi_ray.sources import read_listing

#: A resolved source: each listed image with its content hash, or the reason it cannot be used.
RESOLVED_SCHEMA = pa.schema([("uri", pa.string()), ("content_hash", pa.string()), ("reason", pa.string()),
                             ("loc", pa.string()), ("label", pa.string()), ("captions", pa.list_(pa.string()))])


@dataclass(frozen=True)
class ImageSet:
    """One side of a run as aggregation reads it: the resolved source, and each row's store key
    under the run's model (``keys`` None: the content hash is the key)."""

    images: str
    keys: str | None = None


def _hash_lookup(hashed: HashedImages, store: FeatureStore) -> tuple[pa.Table, pa.Table]:
    """``(this run's results, the store's index)`` as tables keyed for joins."""
    try:
        files = [e.uri for e in storage.iter_files(hashed.results) if e.uri.endswith(".parquet")]
    except FileNotFoundError:
        files = []
    results = pa.concat_tables([storage.read_parquet(f).cast(RESULT_SCHEMA) for f in files]) if files \
        else RESULT_SCHEMA.empty_table()
    results = results.select(["uri", "content_hash", "error"]).rename_columns(["uri", "run_hash", "run_error"])
    index = store.hash_index() if not hashed.rehash else RESULT_SCHEMA.empty_table().drop_columns(["error"])
    index = index.filter(pc.not_equal(index.column("version"), ""))
    index = index.group_by(["uri", "size", "version"], use_threads=False).aggregate([("content_hash", "first")])
    return results, index.rename_columns(["uri", "size", "version", "index_hash"])


def resolve(listing: pa.Table, results: pa.Table, index: pa.Table) -> pa.Table:
    """A listing (in its order) with each image's content hash, or the reason it has none (:data:`RESOLVED_SCHEMA`).

    ``results`` and ``index`` hold the whole batch's URIs: they are cut to this listing's before the
    joins, which would otherwise build a hash table of the whole batch per source (a batch of
    4,000 small sources then spent minutes planning)."""
    uris = listing.column("uri")
    results = results.filter(pc.is_in(results.column("uri"), value_set=uris))
    index = index.filter(pc.is_in(index.column("uri"), value_set=uris))
    t = listing.select(["uri", "size", "version", "content_hash", "error"])
    t = t.append_column("_order", pa.array(range(listing.num_rows), pa.int64()))
    t = t.join(results, "uri", join_type="left outer", use_threads=False)
    t = t.join(index, ["uri", "size", "version"], join_type="left outer", use_threads=False).sort_by("_order")
    error, size = t.column("error"), t.column("size")
    missing = pc.and_(pc.is_null(error), pc.less(size, 0))
    known = pc.coalesce(t.column("content_hash"), t.column("run_hash"), t.column("index_hash"))
    usable = pc.and_(pc.is_null(error), pc.invert(missing))
    content_hash = pc.if_else(usable, known, pa.scalar(None, pa.string()))
    none = pa.scalar(None, pa.string())
    reason = pc.coalesce(error, pc.if_else(missing, "missing: the file does not exist", none), t.column("run_error"),
                         pc.if_else(pc.is_null(content_hash), "unreadable", none))
    return pa.table([t.column("uri"), content_hash, reason, listing.column("loc"), listing.column("label"),
                     listing.column("captions")], schema=RESOLVED_SCHEMA)


class Sources:
    """Resolved sources and keyed image sets, each computed (and written) once per batch."""

    def __init__(self, listings: Listings, hashed: HashedImages, store: FeatureStore, run_dir: str):
        self.listings, self.run_dir = listings, run_dir
        self.results, self.index = _hash_lookup(hashed, store)
        self.resolved: dict[str, tuple[str, pa.Table]] = {}
        self.keyed: dict[tuple, tuple] = {}   # (source, model, labels) → (ImageSet, keyed table, report, problems)

    def resolve(self, sid: str) -> tuple[str, pa.Table]:
        if sid not in self.resolved:
            table = resolve(read_listing(self.listings.sources[sid].parts), self.results, self.index)
            uri = storage.join(self.run_dir, "sources", f"{sid}.parquet")
            storage.write_parquet(uri, table)
            self.resolved[sid] = (uri, table)
        return self.resolved[sid]

    def image_set(self, sid: str, info, missing: str, label_map) -> tuple:
        """``(ImageSet, keyed table, report, problems)`` of one source under one model.

        The keyed table has a row per usable image: ``key, content_hash, uri, loc, label, captions``;
        ``missing`` and ``label_map`` are the audit's labels rule (they matter for class models only).
        """
        kind = info.conditioning_kind
        rule = (json.dumps(info.to_dict(), sort_keys=True), missing, json.dumps(label_map, sort_keys=True)) \
            if kind == "class" else ()
        cache = (sid, kind, *rule)
        if cache in self.keyed:
            return self.keyed[cache]
        uri, t = self.resolve(sid)
        hashes = t.column("content_hash")
        if kind == "none":
            keyed = pa.table({"key": hashes, "content_hash": hashes, "uri": t.column("uri"), "loc": t.column("loc"),
                              "label": pa.nulls(t.num_rows, pa.int64()), "captions": t.column("captions")})
            out = (ImageSet(uri), keyed.filter(pc.is_valid(hashes)), None, LabelProblems())
        else:
            source = label_map if isinstance(label_map, str) else ("inline" if label_map else None)
            conds, report, problems = condition_images(
                t.column("uri").to_pylist(), hashes.to_pylist(), t.column("label").to_pylist(),
                [tuple(c or ()) for c in t.column("captions").to_pylist()], info.to_dict(),
                label_map=read_label_map(label_map) if kind == "class" else {}, missing=missing, map_source=source)
            keys = pa.array([c.key if c else None for c in conds], pa.string())
            keys_uri = storage.join(self.run_dir, "keys", hashlib.sha256(repr(cache).encode()).hexdigest()[:24] + ".parquet")
            storage.write_parquet(keys_uri, pa.table({"key": keys}))
            keyed = pa.table({"key": keys, "content_hash": hashes, "uri": t.column("uri"), "loc": t.column("loc"),
                              "label": pa.array([c.label if c else None for c in conds], pa.int64()),
                              "captions": pa.array([list(c.captions) if c else [] for c in conds], pa.list_(pa.string()))})
            out = (ImageSet(uri, keys_uri), keyed.filter(pc.is_valid(keys)), report, problems)
        self.keyed[cache] = out
        return out

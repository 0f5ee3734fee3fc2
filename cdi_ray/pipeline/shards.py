"""Indexing shard sources: one Ray Data task per shard turns it into its images.

A shard is read once, streaming, in a CPU task on a worker (never in the driver): a tar from
one GET read as it arrives, a Parquet file row group by row group. The task hashes each image's
bytes and returns one small row per image — URI, locator, size, content hash, label, captions,
error — never the bytes. The feature stream later fetches only the images it computes, by
locator (:func:`cdi_ray.sources.read_images`).

Each shard's index is cached in the feature store (``_shards/<name>.parquet``, the name derived
from the shard's URI, version — S3 ETag or local mtime — and how it is read), so a nightly
re-run reads only new or changed shards, as the URI → hash cache does for loose files.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from cdi_ray import storage
from cdi_ray.pipeline.plan import Listing, ShardRef
from cdi_ray.sources import ImageEntry, ShardSpec, index_shard, shard_cache_name

log = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([
    ("shard", pa.string()), ("spec", pa.string()), ("uri", pa.string()), ("loc", pa.string()), ("size", pa.int64()),
    ("version", pa.string()), ("content_hash", pa.string()), ("label", pa.string()),
    ("captions", pa.list_(pa.string())), ("error", pa.string()),
])
#: Where the member lists of indexed shards are kept, under the store root.
INDEX_FOLDER = "_shards"


def _rows(shard: str, spec: ShardSpec, entries: list[ImageEntry], error: str | None, version: str) -> pa.Table:
    if error:  # the shard itself (or its tail) could not be read: one row says so
        entries = entries + [ImageEntry(shard, -1, version, loc="shard", error=error)]
    return pa.Table.from_pylist([{"shard": shard, "spec": spec.cache_id(), "uri": e.uri, "loc": e.loc, "size": e.size, "version": e.version,
                                  "content_hash": e.content_hash, "label": e.label, "captions": list(e.captions),
                                  "error": e.error} for e in entries], schema=INDEX_SCHEMA)


def index_batch(batch: dict[str, np.ndarray], *, store_root: str) -> pa.Table:
    """Ray Data stage: ``{uri, version, size, spec}`` rows (one per shard) → one row per image.

    A shard that cannot be read at all gives one row with its error (the audit reports it as an
    unusable entry; the other shards go on). Complete indexes are cached in the store.
    """
    from cdi_ray.pipeline.store import table_bytes

    tables = []
    for uri, version, size, spec_json in zip(batch["uri"], batch["version"], batch["size"], batch["spec"]):
        uri, version, spec = str(uri), str(version), ShardSpec(*json.loads(str(spec_json)))
        try:
            entries, error = index_shard(uri, version, spec, int(size))
        except FileNotFoundError:
            entries, error = [], f"missing: shard {uri} does not exist"
        except Exception as exc:  # noqa: BLE001 — this shard's images are unusable, the others go on
            entries, error = [], f"shard_unreadable: {uri}: {type(exc).__name__}: {exc}"
        table = _rows(uri, spec, entries, error, version)
        if error is None:
            try:
                storage.atomic_write_bytes(storage.join(store_root, INDEX_FOLDER, shard_cache_name(uri, version, spec) + ".parquet"),
                                           table_bytes(table))
            except OSError as exc:  # a read-only store still works, just re-reads the shard next time
                log.warning("cannot cache the index of %s: %s", uri, exc)
        tables.append(table)
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def _cached(store_root: str, ref: ShardRef) -> pa.Table | None:
    import pyarrow.parquet as pq

    uri = storage.join(store_root, INDEX_FOLDER, shard_cache_name(ref.entry.uri, ref.entry.version, ref.spec) + ".parquet")
    try:
        return pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 — a damaged cache file is re-made
        log.warning("ignoring the damaged shard index %s: %s", uri, exc)
        return None


def index_shards(refs: list[ShardRef], store_root: str) -> tuple[dict[tuple[str, str], list[ImageEntry]], dict]:
    """``(shard URI, spec id) → its images`` for every shard, from the cache or a Ray Data pass; and counts."""
    import ray

    out: dict[tuple[str, str], list[ImageEntry]] = {}
    distinct = {(r.entry.uri, r.spec.cache_id()): r for r in refs}
    with ThreadPoolExecutor(16) as pool:
        cached = dict(zip(distinct, pool.map(lambda r: _cached(store_root, r), distinct.values())))
    todo = [r for k, r in distinct.items() if cached[k] is None]
    tables = [t for t in cached.values() if t is not None]
    if todo:
        items = [{"uri": r.entry.uri, "version": r.entry.version, "size": r.entry.size,
                  "spec": r.spec.cache_id()} for r in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, min(200, len(items))))
        ds = ds.map_batches(index_batch, batch_size=1, batch_format="numpy", fn_kwargs={"store_root": store_root})
        tables.extend(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    by_shard: dict[tuple[str, str], list[ImageEntry]] = defaultdict(list)
    for t in tables:
        for row in t.to_pylist():
            by_shard[(row["shard"], row["spec"])].append(ImageEntry(row["uri"], row["size"], row["version"], loc=row["loc"],
                                                     label=row["label"], captions=tuple(row["captions"] or ()),
                                                     content_hash=row["content_hash"], error=row["error"]))
    for key in distinct:
        out[key] = by_shard.get(key, [])
    counts = {"shards": len(distinct), "indexed": len(todo), "from_cache": len(distinct) - len(todo),
              "images": sum(len(v) for v in out.values())}
    return out, counts


def expand_shard_listings(listings: dict[str, Listing], store_root: str) -> dict:
    """Replace every listed shard by its images, in place (an audit keeps its shards' order)."""
    refs = [e for li in listings.values() if not li.error for e in (*li.published, *li.unpublished) if isinstance(e, ShardRef)]
    if not refs:
        return {"shards": 0}
    members, counts = index_shards(refs, store_root)
    for li in listings.values():
        for side in ("published", "unpublished"):
            entries = getattr(li, side)
            if any(isinstance(e, ShardRef) for e in entries):
                setattr(li, side, [m for e in entries
                                   for m in (members[(e.entry.uri, e.spec.cache_id())] if isinstance(e, ShardRef) else [e])])
    return counts

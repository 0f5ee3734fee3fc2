"""Stage 3 — hash every listed image whose hash is not known yet.

De-duplication is by *content*: two URIs (or two audits' prefixes) holding the same bytes must
be seen as one image before any model time is spent on them, so every image is hashed before
planning. A hash is known without reading when the image is a shard member (hashed while its
shard was indexed) or when the store's URI → hash index has the URI with the same size and
version (S3 ETag or local mtime) — so a nightly run reads only new or changed objects.

:func:`images_to_hash` (Ray-free; run in a Ray task) writes the run's distinct URIs that need
reading to ``<run>/hashing/todo/``, :data:`HASH_CHUNK` a file; one Ray task per file
(:func:`hash_chunk`, at most :data:`cdi_ray.pipeline.cluster.MAX_IN_FLIGHT` at a time) reads and
hashes them, adds them to the store's index and records every result (a hash, or why not) under
``<run>/hashing/results/``, where planning looks first.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cdi_ray import storage
from cdi_ray.sources import read_listing

#: Images per hashing task (one index part file each).
HASH_CHUNK = 1024
#: Reads in flight inside a hashing task (hashing is I/O-bound: S3 GETs, disk reads).
HASH_THREADS = 8
#: Columns of a hash result of this run (a hash, or why the URI could not be read).
RESULT_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("version", pa.string()),
                           ("content_hash", pa.string()), ("error", pa.string())])


@dataclass(frozen=True)
class HashedImages:
    """Stage 3's record: counts, and where this run's hash results are."""

    listed: int        # distinct image URIs of the live audits
    index_hits: int    # hashes known without reading (the store's index, or indexed with their shard)
    hashed: int        # read and hashed now
    unreadable: int    # could not be used as listed (missing, bad metadata) or read now
    results: str       # folder of this run's hash results (RESULT_SCHEMA part files)
    rehash: bool = False  # the store's index was ignored

    def counts(self) -> dict:
        return {"listed": self.listed, "hashed": self.hashed, "hash_index_hits": self.index_hits,
                "unreadable": self.unreadable}


def distinct_images(parts: list[str]) -> pa.Table:
    """The listings' rows (but captions), one per URI — its first listing wins — in URI order."""
    table = read_listing(parts).drop_columns(["captions"])
    table = table.append_column("_order", pa.array(range(table.num_rows), pa.int64()))
    first = table.group_by("uri", use_threads=False).aggregate([("_order", "min")])
    return table.take(first.column("_order_min")).drop_columns(["_order"]).sort_by("uri")


def with_index(table: pa.Table, index: pa.Table) -> pa.Table:
    """``table`` (``uri, size, version``…) with the ``content_hash`` the index has for the same URI,
    size and version (null where it has none; an empty version never matches)."""
    index = index.filter(pc.not_equal(index.column("version"), "")).rename_columns(
        ["uri", "size", "version", "_indexed"])
    index = index.group_by(["uri", "size", "version"], use_threads=False).aggregate([("_indexed", "first")])
    joined = table.join(index, ["uri", "size", "version"], join_type="left outer", use_threads=False)
    return joined.rename_columns([c if c != "_indexed_first" else "indexed_hash" for c in joined.column_names])


def images_to_hash(parts: list[str], store_root: str, todo_dir: str, rehash: bool = False) -> dict:
    """Write the URIs of ``parts`` whose hash is unknown to ``todo_dir`` (:data:`HASH_CHUNK` a file);
    return the counts ``{listed, index_hits, to_hash, unreadable}`` and ``todo`` (the files)."""
    from cdi_ray.pipeline.store import FeatureStore

    images = distinct_images(parts)
    bad = pc.or_(pc.is_valid(images.column("error")), pc.less(images.column("size"), 0))
    known = pc.and_(pc.invert(bad), pc.is_valid(images.column("content_hash")))
    rest = images.filter(pc.invert(pc.or_(bad, known))).select(["uri", "size", "version"])
    index = RESULT_SCHEMA.empty_table().select(["uri", "size", "version", "content_hash"])
    if not rehash:
        index = FeatureStore(store_root).hash_index()
    rest = with_index(rest, index)
    todo = rest.filter(pc.is_null(rest.column("indexed_hash"))).select(["uri", "size", "version"]).sort_by("uri")
    files = []
    for i, start in enumerate(range(0, todo.num_rows, HASH_CHUNK)):
        files.append(storage.join(todo_dir, f"part-{i:06d}.parquet"))
        storage.write_parquet(files[-1], todo.slice(start, HASH_CHUNK))
    n_bad = pc.sum(bad).as_py() or 0
    return {"listed": images.num_rows, "index_hits": images.num_rows - n_bad - todo.num_rows,
            "to_hash": todo.num_rows, "unreadable": n_bad, "todo": files}


def _read_hash(uri: str) -> tuple[str | None, int | None, str | None]:
    """``(content hash, size, None)`` of one object, or ``(None, None, why not)``."""
    from cdi_ray.images import content_hash
    from cdi_ray.sources.reading import read_image

    try:
        data = read_image(uri)  # bounded in size and time: a FIFO or a device is never read
        return content_hash(data), len(data), None
    except FileNotFoundError:
        return None, None, "missing: the file does not exist"
    except PermissionError as exc:
        return None, None, f"access_denied: {exc}"
    except (storage.BadEntry, storage.TooLarge, TimeoutError) as exc:  # messages are named reasons already
        return None, None, str(exc)
    except Exception as exc:  # noqa: BLE001 — reported per image, retried next run
        return None, None, f"unreadable: {type(exc).__name__}: {exc}"


def hash_chunk(todo: str, store_root: str, results_dir: str) -> tuple[int, int]:
    """Read and hash one todo file's images (a Ray task); add the hashes to the store's index (for
    later runs) and every result to ``results_dir`` (for this run's planning). Returns ``(hashed, unreadable)``."""
    from cdi_ray.pipeline.store import FeatureStore

    table = storage.read_parquet(todo)
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        got = list(pool.map(_read_hash, table.column("uri").to_pylist()))
    hashes, sizes, errors = (list(c) for c in zip(*got)) if got else ([], [], [])
    sizes = [s if s is not None else old for s, old in zip(sizes, table.column("size").to_pylist())]
    results = pa.table([table.column("uri"), pa.array(sizes, pa.int64()), table.column("version"),
                        pa.array(hashes, pa.string()), pa.array(errors, pa.string())], schema=RESULT_SCHEMA)
    ok = results.filter(pc.is_valid(results.column("content_hash")))
    FeatureStore(store_root).add_hashes(ok.select(["uri", "size", "version", "content_hash"]))
    storage.write_parquet(storage.join(results_dir, storage.basename(todo)), results)
    return ok.num_rows, results.num_rows - ok.num_rows


def hash_images(parts: list[str], store_root: str, run_dir: str, *, rehash: bool = False) -> HashedImages:
    """Stage 3 (see the module docstring) over the listing files ``parts`` of the live audits."""
    from cdi_ray.pipeline import cluster

    folder = storage.join(run_dir, "hashing")
    results = storage.join(folder, "results")
    counts = cluster.call(images_to_hash, parts, store_root, storage.join(folder, "todo"), rehash)
    hashed = unreadable = 0
    for res in cluster.call_many(hash_chunk, [(t, store_root, results) for t in counts["todo"]]):
        if isinstance(res, BaseException):  # the task itself died: its images stay unhashed (unreadable)
            raise res
        hashed, unreadable = hashed + res[0], unreadable + res[1]
    return HashedImages(listed=counts["listed"], index_hits=counts["index_hits"], hashed=hashed,
                        unreadable=counts["unreadable"] + unreadable, results=results, rehash=rehash)

"""Stage 1 — list every audit's sources: manifest sources → listing files in the run's folder.

Each distinct source (a source named by many audits is listed once) is listed in a Ray task,
which writes its images as one listing table (:data:`cdi_ray.sources.LISTING_SCHEMA`) under
``<run folder>/listings/``; a shard source returns its shards instead, and each distinct shard is
indexed by a task of its own (:func:`cdi_ray.sources.index_shard_cached`: from the store's cache,
else read once, streaming). The driver keeps one :class:`SourceListing` per source — which files
hold its images, how many — never the images.

A source that cannot be listed fails only the audits that name it.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cdi_ray import storage
from cdi_ray.sources import ShardRef, entries_table, index_shard_cached, list_source, source_id

log = logging.getLogger(__name__)

#: Sources listed by one task (their listing calls run in threads: S3 LIST is latency-bound).
SOURCES_PER_TASK = 64
#: Listing threads inside a task.
LIST_THREADS = 16


@dataclass(frozen=True)
class SourceListing:
    """One listed source: the Parquet files holding its images (in order), how many, or why it failed."""

    source_id: str
    parts: tuple[str, ...] = ()
    images: int = 0
    error: str | None = None


@dataclass(frozen=True)
class Listings:
    """Stage 1's record: every distinct source, and which two each audit names."""

    sources: dict[str, SourceListing]
    of_audit: dict[str, tuple[str, str]]  # audit id → (published, unpublished) source ids
    shards: dict = field(default_factory=lambda: {"shards": 0})

    def sides(self, audit_id: str) -> tuple[SourceListing, SourceListing]:
        p, u = self.of_audit[audit_id]
        return self.sources[p], self.sources[u]

    def error(self, audit_id: str) -> str | None:
        """Why an audit's sources cannot be listed (None: both listed)."""
        p, u = self.sides(audit_id)
        if not (p.error or u.error):
            return None
        why = "; ".join(f"{side}: {s.error}" for side, s in (("published", p), ("unpublished", u)) if s.error)
        return f"cannot list sources — {why}"


def _list_one(source, out_uri: str):
    """One source → ``(listing file, images)`` or its shards; an error as the message."""
    try:
        items = list_source(source)
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if items and isinstance(items[0], ShardRef):
        return items
    storage.write_parquet(out_uri, entries_table(items))
    return (out_uri, len(items))


def list_batch(sources: list[tuple[str, object]], folder: str) -> dict[str, object]:
    """Ray task: list ``(source id, source)`` pairs into ``folder``; source id → what :func:`_list_one` gives."""
    with ThreadPoolExecutor(max(1, min(LIST_THREADS, len(sources)))) as pool:
        got = pool.map(lambda item: _list_one(item[1], storage.join(folder, f"{item[0]}.parquet")), sources)
        return {sid: res for (sid, _), res in zip(sources, got)}


def list_sources(audits, run_dir: str, store_root: str) -> Listings:
    """List the sources of ``audits`` (see the module docstring)."""
    from cdi_ray.pipeline import cluster

    of_audit, distinct = {}, {}
    for a in audits:
        ids = (source_id(a.published), source_id(a.unpublished))
        of_audit[a.id] = ids
        distinct.setdefault(ids[0], a.published)
        distinct.setdefault(ids[1], a.unpublished)
    folder = storage.join(run_dir, "listings")
    items = list(distinct.items())
    chunks = [items[i:i + SOURCES_PER_TASK] for i in range(0, len(items), SOURCES_PER_TASK)]
    listed: dict[str, object] = {}
    for chunk, res in zip(chunks, cluster.call_many(list_batch, [(c, folder) for c in chunks])):
        if isinstance(res, BaseException):  # the task itself died: its sources fail, the others go on
            res = {sid: f"listing failed: {type(res).__name__}: {res}" for sid, _ in chunk}
        listed.update(res)
    sources: dict[str, SourceListing] = {}
    shard_sources = {sid: res for sid, res in listed.items() if isinstance(res, list)}
    for sid, res in listed.items():
        if isinstance(res, str):
            sources[sid] = SourceListing(sid, error=res)
        elif isinstance(res, tuple):
            sources[sid] = SourceListing(sid, (res[0],), res[1])
    counts = {"shards": 0}
    if shard_sources:
        indexes, counts = _index_shards([r for refs in shard_sources.values() for r in refs], store_root,
                                        storage.join(run_dir, "shards"))
        for sid, refs in shard_sources.items():
            got = [indexes[_shard_key(r)] for r in refs]
            sources[sid] = SourceListing(sid, tuple(g.uri for g in got), sum(g.images for g in got))
    return Listings(sources, of_audit, counts)


def _shard_key(ref: ShardRef) -> tuple[str, str]:
    return ref.entry.uri, ref.spec.cache_id()


def _index_shards(refs: list[ShardRef], store_root: str, scratch: str):
    """``shard key → ShardIndex`` for every distinct shard (one task each), and the counts."""
    from cdi_ray.pipeline import cluster
    from cdi_ray.sources import ShardIndex, index_table, shard_cache_name

    distinct = {_shard_key(r): r for r in refs}
    results = cluster.call_many(index_shard_cached, [(r, store_root, scratch) for r in distinct.values()])
    out = {}
    for (key, ref), res in zip(distinct.items(), results):
        if isinstance(res, BaseException):  # the task died (e.g. out of memory): an unreadable shard
            bad = storage.join(scratch, shard_cache_name(ref.entry.uri, ref.entry.version, ref.spec) + ".parquet")
            storage.write_parquet(bad, index_table(ref.entry.uri, ref.spec, [], f"shard_unreadable: {ref.entry.uri}: "
                                                   f"{type(res).__name__}: {res}", ref.entry.version))
            res = ShardIndex(bad, 1, False)
        out[key] = res
    indexed = sum(not r.from_cache for r in out.values())
    counts = {"shards": len(out), "indexed": indexed, "from_cache": len(out) - indexed,
              "images": sum(r.images for r in out.values())}
    return out, counts

"""Listing a source: the images a manifest source names, as rows of one table shape.

A listed image is an :class:`~cdi_ray.sources.records.ImageEntry`; a listing is a Parquet table
of them (:mod:`cdi_ray.sources.records`). Loose files are listed here
(folders, prefixes, URI lists, list files, with an optional sidecar); a shard source lists its
shards (:class:`ShardRef`), whose images :mod:`cdi_ray.sources.shards` indexes.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re

from cdi_ray import storage
from cdi_ray.sources.records import ImageEntry, ShardRef, ShardSpec
from cdi_ray.sources.sidecar import attach_sidecar

# ----------------------------------------------------------------------------------------------
# shard patterns
# ----------------------------------------------------------------------------------------------
_BRACE = re.compile(r"\{([^{}]*)\}")
_GLOB_CHARS = set("*?[")


def expand_braces(pattern: str) -> list[str]:
    """``a{000..002}b`` → a000b, a001b, a002b (zero padding kept); ``{x,y}`` → alternatives."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise ValueError(f"brace range {{{body}}} in {pattern!r} runs backwards — write {{{hi}..{lo}}}")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def expand_pattern(pattern: str) -> list[storage.FileEntry]:
    """The shard files a pattern names, sorted by URI (a plain URI names itself).

    Raises:
        FileNotFoundError: a named shard does not exist, or a glob matches nothing.
    """
    out: dict[str, storage.FileEntry] = {}
    for uri in expand_braces(pattern):
        if not _GLOB_CHARS & set(uri):
            try:
                out[storage.normalize(uri)] = storage.stat(uri)
            except storage.BadEntry as exc:  # a FIFO, a device, a broken link: that shard is unusable, not the source
                out[storage.normalize(uri)] = storage.FileEntry(storage.normalize(uri), -1, "", str(exc))
            continue
        cut = min(uri.index(c) for c in _GLOB_CHARS if c in uri)
        folder = uri[:cut].rsplit("/", 1)[0] if "/" in uri[:cut] else "."
        full = uri if storage.is_remote(uri) else os.path.join(storage.local_path(folder), uri[len(folder):].lstrip("/"))
        matched = [e for e in storage.iter_files(folder) if fnmatch.fnmatchcase(e.uri, full)]
        if not matched:
            raise FileNotFoundError(f"no shard matches {uri!r}")
        out.update((e.uri, e) for e in matched)
    if not out:
        raise FileNotFoundError(f"the pattern {pattern!r} names no shard")
    return [out[u] for u in sorted(out)]


# ----------------------------------------------------------------------------------------------
# a manifest source → its images (or shards)
# ----------------------------------------------------------------------------------------------
def source_id(source) -> str:
    """A short stable id of a manifest source: equal sources (in any audits) are listed once."""
    if isinstance(source, str):
        key = ["prefix", source]
    elif isinstance(source, list):
        key = ["list", list(source)]
    else:
        key = [type(source).__name__, source.model_dump(mode="json")]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def shard_spec(shards) -> ShardSpec:
    """How the shards of a ``WebDatasetShards`` / ``ParquetShards`` source are read."""
    from cdi_ray.spec import ParquetShards

    if isinstance(shards, ParquetShards):
        return ShardSpec("parquet", shards.image_column, shards.label_column, shards.caption_column, shards.id_column)
    return ShardSpec("webdataset")


def list_source(source) -> list[ImageEntry] | list[ShardRef]:
    """The images a source names (a shard source: its shards), in a stable order.

    Raises:
        FileNotFoundError: the folder / prefix / list file / shard does not exist, or holds no images.
        ValueError: a malformed metadata sidecar or shard pattern (the message names it).
    """
    from cdi_ray.spec import ImageFolder, ListFile, shard_source

    shards = shard_source(source)
    if shards is not None:
        spec = shard_spec(shards)
        patterns = shards.webdataset if spec.kind == "webdataset" else shards.parquet
        found = {e.uri: e for p in ([patterns] if isinstance(patterns, str) else patterns) for e in expand_pattern(p)}
        return [ShardRef(found[u], spec) for u in sorted(found)]
    if isinstance(source, (str, ImageFolder)):
        folder = source if isinstance(source, str) else source.folder
        entries = storage.list_images(folder)
        if not entries:
            hint = ""
            if any(e.uri.endswith((".tar", ".parquet")) for e in storage.iter_files(folder)):
                hint = " — it holds shards: write {webdataset: …/*.tar} or {parquet: …/*.parquet}"
            raise FileNotFoundError(f"no image files under {folder} (looked for {', '.join(sorted(storage.IMAGE_EXTENSIONS))}){hint}")
        if isinstance(source, ImageFolder) and source.metadata:
            return attach_sidecar(entries, storage.normalize(folder), source.metadata)
        return [ImageEntry(e.uri, e.size, e.version, error=e.error) for e in entries]
    uris = storage.read_list_file(source.list_file) if isinstance(source, ListFile) else [storage.normalize(u) for u in source]
    if not uris:
        raise FileNotFoundError(f"list file {source.list_file} names no images")
    out = [listed_entry(uri) for uri in uris]
    if isinstance(source, ListFile) and source.metadata:
        return attach_sidecar(out, None, source.metadata)
    return [ImageEntry(e.uri, e.size, e.version, error=e.error) for e in out]


def listed_entry(uri: str) -> storage.FileEntry:
    """One URI named by a list: its size and version, or why it cannot be used (never raises)."""
    from cdi_ray.redaction import carries_credentials, redact

    if carries_credentials(uri):  # the URI itself would leak into results: only its redacted form is kept
        return storage.FileEntry(redact(uri), -1, "", "credentials_in_uri: the listed URI carries credentials or a "
                                                      "signature — list plain URIs; access comes from the environment")
    try:
        return storage.stat(uri)
    except FileNotFoundError:
        return storage.FileEntry(uri, -1, "")  # reported per image later ("missing")
    except storage.BadEntry as exc:  # a FIFO, a device, a dangling link …: named, never opened
        return storage.FileEntry(uri, -1, "", str(exc))
    except (OSError, ValueError):  # denied, S3 still failing, an odd scheme: hashing reads it and names the reason
        return storage.FileEntry(uri, 0, "")

"""Indexing one shard: a WebDataset tar or a Parquet file → its images, hashed, with locators.

A shard is read once, streaming (a tar from one GET, read as it arrives; a Parquet file row group
by row group through ranged GETs). Each image becomes one small row — URI, locator, size,
content hash, label, captions, error — never its bytes; the feature stream later fetches only
the images it computes, by locator (:func:`cdi_ray.sources.reading.read_images`).

A shard's index is cached in the feature store (``_shards/<name>.parquet``, the name derived from
the shard's URI, version — S3 ETag or local mtime — and how it is read), so a nightly re-run
reads only new or changed shards, as the URI → hash index does for loose files. The pipeline
runs :func:`index_shard_cached` in one Ray task per shard.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from dataclasses import dataclass, field

import pyarrow as pa

from cdi_ray import storage
from cdi_ray.localfs import too_large_reason
from cdi_ray.sources.records import LISTING_SCHEMA, ImageEntry, ShardRef, ShardSpec, entries_table
from cdi_ray.sources.reading import PARQUET, TAR, _image_bytes, max_image_bytes, open_seekable, open_stream
from cdi_ray.sources.sidecar import parse_captions, parse_label

log = logging.getLogger(__name__)


@dataclass
class _Sample:
    images: list[tuple[str, int, int, str]] = field(default_factory=list)  # (name, offset, size, hash)
    label: str | None = None
    captions: tuple[str, ...] = ()
    error: str | None = None


def _split_key(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (dot + ext).lower()


def _read_tar_meta(sample: _Sample, ext: str, data: bytes) -> None:
    try:
        text = data.decode("utf-8")
        if ext == ".cls":
            sample.label = parse_label(text.strip())
        elif ext == ".txt":
            sample.captions = tuple(line.strip() for line in text.splitlines() if line.strip())
        elif ext == ".json":
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            if obj.get("label") is not None:
                sample.label = parse_label(obj["label"])
            caps = parse_captions(obj.get("captions")) or parse_captions(obj.get("caption"))
            if caps:
                sample.captions = caps
    except (UnicodeDecodeError, ValueError) as exc:
        sample.error = f"bad_metadata: {ext[1:]} member is unreadable ({type(exc).__name__}: {exc}); fix or remove it"


def index_tar(uri: str, version: str) -> tuple[list[ImageEntry], str | None]:
    """Stream a WebDataset tar once: its images (hashed, with offsets) and their metadata.

    Returns ``(images, error)``; ``error`` says why reading stopped early (a truncated or
    corrupt archive) — the images read before that point are kept.
    """
    from cdi_ray.images import content_hash

    samples: dict[str, _Sample] = {}
    too_large: list[ImageEntry] = []
    error = None
    with open_stream(uri) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    sample = samples.setdefault(key, _Sample())
                    if m.size > max_image_bytes():  # never read into memory: an unusable member
                        too_large.append(ImageEntry(f"{uri}#{m.name}", m.size, version, error=too_large_reason(
                            f"{uri}#{m.name}", m.size, max_image_bytes(), "image")))
                        continue
                    data = tar.extractfile(m).read()
                    if ext in storage.IMAGE_EXTENSIONS:
                        sample.images.append((m.name, m.offset_data, m.size, content_hash(data)))
                    elif ext in (".cls", ".txt", ".json"):
                        _read_tar_meta(sample, ext, data)
        except tarfile.CompressionError:
            raise ValueError(f"{uri}: compressed tar shards cannot be read by byte range — pack them uncompressed "
                             "(`cdi-ray pack … --format webdataset`)") from None
        except (tarfile.TarError, EOFError, OSError) as exc:
            error = f"shard_truncated: {uri} could not be read to the end ({type(exc).__name__}: {exc})"
    out = []
    for s in samples.values():
        for name, offset, size, h in s.images:
            out.append(ImageEntry(f"{uri}#{name}", size, version, loc=f"{TAR}:{offset}:{size}", label=s.label,
                                  captions=s.captions, content_hash=h, error=s.error))
    return out + too_large, error


def index_parquet(uri: str, version: str, spec: ShardSpec, size: int | None = None) -> tuple[list[ImageEntry], str | None]:
    """Read a Parquet shard row group by row group: its images (hashed) and their metadata columns."""
    import pyarrow.parquet as pq

    from cdi_ray.images import content_hash

    out: list[ImageEntry] = []
    with open_seekable(uri, size) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        wanted = [c for c in (spec.image_column, spec.label_column, spec.caption_column, spec.id_column) if c]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"{uri} has no column(s) {missing} — its columns are {sorted(names)}; "
                             "fix image_column / label_column / caption_column / id_column")
        row0 = 0
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=list(dict.fromkeys(wanted)))
            cols = {c: table.column(c).to_pylist() for c in dict.fromkeys(wanted)}
            for r in range(table.num_rows):
                data = _image_bytes(cols[spec.image_column][r])
                ident = cols[spec.id_column][r] if spec.id_column else None
                name = f"{uri}#{ident}" if ident is not None else f"{uri}#row={row0 + r}"
                error, label, caps = None, None, ()
                try:
                    label = parse_label(cols[spec.label_column][r]) if spec.label_column else None
                    caps = parse_captions(cols[spec.caption_column][r]) if spec.caption_column else ()
                except ValueError as exc:
                    error = f"bad_metadata: {exc}"
                if data is None:
                    out.append(ImageEntry(name, 0, version, loc=f"{PARQUET}:{g}:{r}:{spec.image_column}",
                                          error=f"no_image: the {spec.image_column!r} cell is empty"))
                    continue
                out.append(ImageEntry(name, len(data), version, loc=f"{PARQUET}:{g}:{r}:{spec.image_column}",
                                      label=label, captions=caps, content_hash=content_hash(bytes(data)), error=error))
            row0 += table.num_rows
    return out, None


def index_shard(uri: str, version: str, spec: ShardSpec, size: int | None = None) -> tuple[list[ImageEntry], str | None]:
    if spec.kind == "webdataset":
        return index_tar(uri, version)
    return index_parquet(uri, version, spec, size)


def shard_cache_name(uri: str, version: str, spec: ShardSpec) -> str:
    """Name of a shard's cached index: changes when the shard (its version) or the spec does."""
    return hashlib.sha256("\0".join([uri, version, spec.cache_id()]).encode()).hexdigest()[:40]


# ----------------------------------------------------------------------------------------------
# the cached index of a shard
# ----------------------------------------------------------------------------------------------
#: Where the indexes of shards are cached, under the feature store's root.
INDEX_FOLDER = "_shards"
#: A cached index: the shard, how it was read, and one listing row per image.
INDEX_SCHEMA = pa.schema([("shard", pa.string()), ("spec", pa.string()), *LISTING_SCHEMA])


@dataclass(frozen=True)
class ShardIndex:
    """One indexed shard: the Parquet file listing its images, how many rows, and whether it was cached."""

    uri: str
    images: int
    from_cache: bool


def index_table(shard: str, spec: ShardSpec, entries: list[ImageEntry], error: str | None, version: str) -> pa.Table:
    """A shard's index; a shard that could not be read (to the end) gets one more row that says so."""
    if error:  # the audit reports it as an unusable entry; the other shards go on
        entries = entries + [ImageEntry(shard, -1, version, loc="shard", error=error)]
    listing = entries_table(entries)
    n = listing.num_rows
    return pa.table([pa.array([shard] * n, pa.string()), pa.array([spec.cache_id()] * n, pa.string()),
                     *listing.columns], schema=INDEX_SCHEMA)


def _rows_of(uri: str) -> int | None:
    """Rows of a complete Parquet file (footer only); None when it is missing or damaged."""
    import pyarrow.parquet as pq

    try:
        with open_seekable(uri) as f:
            return pq.read_metadata(f).num_rows
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 — a damaged cache file is made again
        log.warning("ignoring the damaged shard index %s: %s", uri, exc)
        return None


def index_shard_cached(ref: ShardRef, store_root: str, scratch: str) -> ShardIndex:
    """The index of one shard: from the store's cache, else read now and cached.

    A shard that cannot be read (to the end) is indexed with its error row but not cached (the
    next run tries again); nor is anything when the store is read-only — such an index is written
    under ``scratch`` (the run's own folder) instead.
    """
    uri, version = ref.entry.uri, ref.entry.version
    name = shard_cache_name(uri, version, ref.spec) + ".parquet"
    cached = storage.join(store_root, INDEX_FOLDER, name)
    rows = _rows_of(cached)
    if rows is not None:
        return ShardIndex(cached, rows, True)
    try:
        if ref.entry.error:  # listed as unusable (not a regular file …): never opened
            raise storage.BadEntry(ref.entry.error)
        entries, error = index_shard(uri, version, ref.spec, ref.entry.size)
    except storage.BadEntry as exc:
        entries, error = [], str(exc)
    except FileNotFoundError:
        entries, error = [], f"missing: shard {uri} does not exist"
    except Exception as exc:  # noqa: BLE001 — this shard's images are unusable, the others go on
        entries, error = [], f"shard_unreadable: {uri}: {type(exc).__name__}: {exc}"
    table = index_table(uri, ref.spec, entries, error, version)
    if error is None:
        try:
            storage.write_parquet(cached, table)
            return ShardIndex(cached, table.num_rows, False)
        except OSError as exc:  # a read-only store still works, it just reads the shard again next time
            log.warning("cannot cache the index of %s: %s", uri, exc)
    where = storage.join(scratch, name)
    storage.write_parquet(where, table)
    return ShardIndex(where, table.num_rows, False)

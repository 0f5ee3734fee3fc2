"""Image collections as they are stored: loose files (+ a metadata sidecar) or packed shards.

Large collections are packed into shards rather than kept as millions of small objects:

* **WebDataset tar** — ``shard-000123.tar`` holding ``KEY.jpg`` / ``KEY.png`` beside ``KEY.cls``
  (class label), ``KEY.txt`` (caption(s), one per line) and/or ``KEY.json`` (``label``,
  ``caption`` or ``captions``). ``KEY`` is a member's path up to the first ``.`` of its file name.
* **Parquet** — an image-bytes column (binary, or a ``{bytes, path}`` struct as Hugging Face
  ``datasets`` writes it) beside optional label / caption / id columns.

Every image gets a URI that names it in reports — the file's own URI, ``SHARD#KEY.ext`` for a
tar member, ``SHARD#ID`` (or ``SHARD#row=N``) for a Parquet row — and a *locator* that says how
to get its bytes back without scanning the shard again: ``""`` (the whole object),
``tar:OFFSET:SIZE`` (one ranged read), ``parquet:ROW_GROUP:ROW:COLUMN``. An image's identity
is still the sha256 of its encoded bytes, whatever container it came in
(:func:`cdi_ray.images.content_hash`).

Shard *patterns* name many shards: a glob (``s3://b/p/shard-*.tar``), a brace range
(``shard-{000000..000099}.tar``) or alternatives (``{a,b}.parquet``).

This module is Ray-free; the Ray Data pass that indexes shards is :mod:`cdi_ray.pipeline.shards`.
"""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import re
import tarfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from cdi_ray import storage

#: Member locator prefixes.
TAR, PARQUET = "tar", "parquet"
#: Tar members of one decode batch closer than this are fetched with one ranged read.
COALESCE_GAP = 1 << 20
#: Largest single ranged read when coalescing tar members.
COALESCE_MAX = 64 << 20
#: Parquet row groups (image column only) kept per process for the rows that follow.
ROW_GROUP_CACHE = 4


# ----------------------------------------------------------------------------------------------
# one listed image
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageEntry:
    """One image of a collection, with what travels with it.

    ``label`` is the collection's own name for the class (a string such as ``"n01440764"`` or
    ``"3"``; mapped to a model's index by :mod:`cdi_ray.conditioning`); ``captions`` are its
    caption(s). ``content_hash`` is known for shard members (hashed while indexing the shard),
    ``None`` for loose files (hashed by the pipeline). ``error`` is a per-image problem found while
    listing (e.g. a sidecar row that is not valid JSON): the image is reported as unusable.
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
            out[storage.normalize(uri)] = storage.stat(uri)
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
# sidecar metadata of loose image files
# ----------------------------------------------------------------------------------------------
_NAME_KEYS = ("file", "name", "image", "path")


def _captions(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(v for v in value if v.strip())
    raise ValueError(f"captions must be a string or a list of strings, got {value!r}")


def _label(value) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"a label must be a class name or an integer index, got {value!r}")
    return str(value).strip()


def read_sidecar(uri: str) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """``image name → (label, captions)`` from a JSONL or CSV sidecar.

    Each JSONL line / CSV row names an image (``file``, ``name``, ``image`` or ``path``: its path
    relative to the collection's folder, or its file name) and gives ``label`` and/or ``caption`` /
    ``captions`` (CSV: several captions separated by ``|``).

    Raises:
        ValueError: the sidecar is malformed; the message names the line and the fix.
    """
    text = storage.read_bytes(uri).decode("utf-8-sig")
    rows: list[tuple[int, dict]] = []
    if uri.lower().endswith(".csv"):
        for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            caps = row.get("captions") or row.get("caption")
            rows.append((n, {**row, "captions": caps.split("|") if caps else None, "caption": None}))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{uri} line {n}: not valid JSON ({exc.msg}) — write one JSON object per line") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{uri} line {n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    out: dict[str, tuple[str | None, tuple[str, ...]]] = {}
    for n, row in rows:
        name = next((row[k] for k in _NAME_KEYS if row.get(k)), None)
        if not isinstance(name, str):
            raise ValueError(f"{uri} line {n}: no image name — give it as one of {', '.join(_NAME_KEYS)}")
        try:
            caps = _captions(row.get("captions")) or _captions(row.get("caption"))
            out[name.strip().lstrip("./")] = (_label(row.get("label")), caps)
        except ValueError as exc:
            raise ValueError(f"{uri} line {n}: {exc}") from None
    return out


def attach_sidecar(entries: list[storage.FileEntry], root: str | None, sidecar: str) -> list[ImageEntry]:
    """Loose files with their sidecar metadata (matched by path under ``root``, else by file name)."""
    meta = read_sidecar(sidecar)
    out = []
    for e in entries:
        rel = e.uri[len(root.rstrip("/")) + 1:] if root and e.uri.startswith(root.rstrip("/") + "/") else None
        label, caps = meta.get(rel) if rel in meta else meta.get(storage.basename(e.uri), (None, ()))
        out.append(ImageEntry(e.uri, e.size, e.version, label=label, captions=caps))
    return out


# ----------------------------------------------------------------------------------------------
# reading: whole objects, byte ranges, seekable S3 objects
# ----------------------------------------------------------------------------------------------
def read_range(uri: str, offset: int, length: int) -> bytes:
    """``length`` bytes of an object from ``offset`` (one ranged GET on S3)."""
    if length <= 0:
        return b""
    if storage.is_remote(uri):
        bucket, key = storage.split_s3(uri)
        body = storage.s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")["Body"]
        data = body.read()
    else:
        with open(storage.local_path(uri), "rb") as f:
            f.seek(offset)
            data = f.read(length)
    if len(data) != length:
        raise OSError(f"{uri}: expected {length} bytes at offset {offset}, got {len(data)} (the shard is shorter "
                      "than when it was indexed; re-run to re-index it)")
    return data


class _S3Object(io.RawIOBase):
    """A seekable read-only view of one S3 object through ranged GETs (Parquet reads its footer
    and the needed column chunks only, never the whole shard)."""

    def __init__(self, uri: str, size: int):
        self.uri, self.size, self.pos = uri, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        buffer[:n] = read_range(self.uri, self.pos, n)
        self.pos += n
        return n


def open_seekable(uri: str, size: int | None = None):
    """A binary file object for a local path or an S3 object (buffered ranged reads)."""
    if not storage.is_remote(uri):
        return open(storage.local_path(uri), "rb")
    size = storage.stat(uri).size if size is None else size
    return io.BufferedReader(_S3Object(uri, size), buffer_size=1 << 20)


def open_stream(uri: str):
    """A forward-only binary stream over a whole object (one GET on S3, read as it arrives)."""
    if not storage.is_remote(uri):
        return open(storage.local_path(uri), "rb")
    from botocore.exceptions import ClientError

    bucket, key = storage.split_s3(uri)
    try:
        return storage.s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise FileNotFoundError(uri) from None
        raise


def container_of(uri: str, loc: str) -> str:
    """The shard URI of a member (a loose file is its own container)."""
    return uri.rsplit("#", 1)[0] if loc else uri


def _image_bytes(value) -> bytes | None:
    """A Parquet image cell: raw bytes, or a ``{bytes, path}`` struct (Hugging Face ``datasets``)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) else None


class _RowGroups:
    """A small per-process cache of Parquet image columns (one row group each): the rows of a
    decode batch usually come from the same row groups."""

    def __init__(self, capacity: int = ROW_GROUP_CACHE):
        self.capacity = capacity
        self.items: OrderedDict[tuple, list] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, uri: str, group: int, column: str) -> list:
        key = (uri, group, column)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        import pyarrow.parquet as pq

        with open_seekable(uri) as f:
            values = pq.ParquetFile(f).read_row_group(group, columns=[column]).column(0).to_pylist()
        with self.lock:
            self.items[key] = values
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)
        return values


_ROW_GROUPS = _RowGroups()


def read_images(uris: list[str], locs: list[str]) -> list[bytes | BaseException]:
    """The encoded bytes of each image (or the exception that stopped it), reading each shard's
    members together: nearby tar members with one ranged read, Parquet rows by row group."""
    out: list[bytes | BaseException | None] = [None] * len(uris)
    tar_groups: dict[str, list[tuple[int, int, int]]] = {}
    for i, (uri, loc) in enumerate(zip(uris, locs)):
        try:
            if not loc:
                out[i] = storage.read_bytes(uri)
            elif loc.startswith(TAR + ":"):
                _, off, size = loc.split(":")
                tar_groups.setdefault(container_of(uri, loc), []).append((int(off), int(size), i))
            elif loc.startswith(PARQUET + ":"):
                _, group, row, column = loc.split(":", 3)
                value = _image_bytes(_ROW_GROUPS.get(container_of(uri, loc), int(group), column)[int(row)])
                out[i] = value if value is not None else ValueError("the row holds no image bytes")
            else:
                raise ValueError(f"unknown locator {loc!r}")
        except Exception as exc:  # noqa: BLE001 — reported per image by the caller
            out[i] = exc
    for shard, members in tar_groups.items():
        members.sort()
        span: list[tuple[int, int, int]] = []

        def flush():
            if not span:
                return
            start, end = span[0][0], max(o + s for o, s, _ in span)
            try:
                blob = read_range(shard, start, end - start)
                for o, s, j in span:
                    out[j] = blob[o - start: o - start + s]
            except Exception as exc:  # noqa: BLE001
                for _, _, j in span:
                    out[j] = exc
            span.clear()

        for m in members:
            if span and (m[0] - max(o + s for o, s, _ in span) > COALESCE_GAP or m[0] + m[1] - span[0][0] > COALESCE_MAX):
                flush()
            span.append(m)
        flush()
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# indexing one shard (what the pipeline's Ray tasks run)
# ----------------------------------------------------------------------------------------------
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
            sample.label = _label(text.strip())
        elif ext == ".txt":
            sample.captions = tuple(line.strip() for line in text.splitlines() if line.strip())
        elif ext == ".json":
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            if obj.get("label") is not None:
                sample.label = _label(obj["label"])
            caps = _captions(obj.get("captions")) or _captions(obj.get("caption"))
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
    error = None
    with open_stream(uri) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    data = tar.extractfile(m).read()
                    sample = samples.setdefault(key, _Sample())
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
    return out, error


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
                    label = _label(cols[spec.label_column][r]) if spec.label_column else None
                    caps = _captions(cols[spec.caption_column][r]) if spec.caption_column else ()
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

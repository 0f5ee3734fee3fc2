"""URIs → bytes: local paths, ``file://`` and ``s3://``, with listing and atomic writes.

Local paths go through ``os``; ``s3://`` goes through one boto3 client per process. boto3 (not
pyarrow's S3FileSystem) because it gives the three things the pipeline relies on directly:

* explicit pagination of ``ListObjectsV2`` (prefixes with millions of images);
* a single ``PutObject`` per write — S3 makes an object visible whole or not at all, whereas
  pyarrow's S3 output stream completes a multipart upload from its destructor, so an exception
  half-way can publish a truncated object;
* the object's ETag, which the planner uses to notice a re-uploaded image.

Endpoint and credentials come only from the environment / instance role, exactly as boto3 reads
them (``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores and tests,
``AWS_ACCESS_KEY_ID``…, the EC2 instance profile). Nothing here takes, stores or logs a secret.

Local files are read as regular files only, with size bounds, and folders are listed without
following a loop (:mod:`cdi_ray.localfs`): a FIFO, a device or a broken link is an entry with a
named reason, never opened. The S3 client and its error mapping are :mod:`cdi_ray.s3`.

Failures come out as OSErrors that name the URI: ``FileNotFoundError`` (404), ``PermissionError``
(403) and :class:`StorageError` (anything still failing after the retries), so one unreadable
object fails its image or its audit, not the batch.
This module imports no Ray.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Iterator

from cdi_ray import localfs
from cdi_ray.localfs import BadEntry, NotARegularFile, TooLarge  # noqa: F401 — raised from here
from cdi_ray.s3 import StorageError, _is_missing, _s3_errors, reset_client, s3_client  # noqa: F401 — the storage API

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})



#: Keys per ListObjectsV2 page (S3's maximum; tests lower it to exercise pagination).
S3_PAGE_SIZE = 1000

_S3 = "s3://"
_FILE = "file://"


# ----------------------------------------------------------------------------------------------
# URI helpers
# ----------------------------------------------------------------------------------------------
def is_remote(uri: str) -> bool:
    return str(uri).startswith(_S3)


def local_path(uri: str) -> str:
    """The filesystem path of a local URI (plain path or ``file://``)."""
    uri = str(uri)
    if is_remote(uri):
        raise ValueError(f"{uri} is not a local path")
    if uri.startswith(_FILE):
        uri = uri[len(_FILE):]
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}; use a local path, file:// or s3://")
    return os.path.abspath(os.path.expanduser(uri))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``("bucket", "key")``."""
    rest = uri[len(_S3):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket; write s3://BUCKET/KEY")
    return bucket, key


def normalize(uri: str) -> str:
    """A canonical spelling: absolute local path, or ``s3://bucket/key`` as given."""
    return str(uri) if is_remote(uri) else local_path(uri)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (no normalisation of the base's scheme)."""
    out = str(base)
    for p in parts:
        p = str(p).strip("/")
        if not p:
            continue
        out = out.rstrip("/") + "/" + p if out else p
    return out


def is_within(uri: str, root: str) -> bool:
    """True if ``uri`` is ``root`` or below it, after resolving ``..`` (and, locally, symlinks):
    the check that keeps outputs inside an operator's configured root."""
    uri, root = str(uri), str(root)
    if is_remote(uri) != is_remote(root):
        return False
    if is_remote(uri):
        (b1, k1), (b2, k2) = split_s3(uri), split_s3(root)
        if ".." in k1.split("/") or ".." in k2.split("/"):
            return False  # S3 keys take '..' literally; a location that spells one is never trusted
        k1, k2 = k1.strip("/"), k2.strip("/")
        return b1 == b2 and (not k2 or k1 == k2 or k1.startswith(k2 + "/"))
    u, r = os.path.realpath(local_path(uri)), os.path.realpath(local_path(root))
    return u == r or u.startswith(r.rstrip(os.sep) + os.sep)


def parent(uri: str) -> str:
    uri = str(uri).rstrip("/")
    if is_remote(uri):
        bucket, key = split_s3(uri)
        return f"{_S3}{bucket}/{key.rsplit('/', 1)[0]}" if "/" in key else f"{_S3}{bucket}"
    return os.path.dirname(local_path(uri))


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------------------------
# reading, listing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """One listed file: its URI, size in bytes and a version tag (S3 ETag or local mtime_ns).

    ``error`` is set for an entry that cannot be used — a FIFO, a device, a dangling link, a
    directory loop (:mod:`cdi_ray.localfs`) — with its named reason; its ``size`` is -1."""

    uri: str
    size: int
    version: str
    error: str | None = None


def read_bytes(uri: str, *, max_bytes: int | None = None, what: str = "file") -> bytes:
    """The whole object: a regular file (never a FIFO or a device) or an S3 object.

    Args:
        max_bytes: refuse a larger object with :class:`TooLarge`, from its size, before reading it.
        what: how the bound is named in the refusal ("image", "manifest" …).

    Raises ``FileNotFoundError`` (missing), ``PermissionError`` (denied), :class:`NotARegularFile`,
    :class:`TooLarge` or :class:`StorageError` (S3 failed after retries). Images are read with a
    deadline too: :func:`cdi_ray.sources.reading.read_image`.
    """
    if not is_remote(uri):
        return localfs.read_regular(local_path(uri), max_bytes, what)
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        obj = s3_client().get_object(Bucket=bucket, Key=key)
        size = int(obj.get("ContentLength") or 0)
        if max_bytes is not None and size > max_bytes:
            obj["Body"].close()
            raise TooLarge(localfs.too_large_reason(uri, size, max_bytes, what))
        if max_bytes is None:
            return obj["Body"].read()
        data = obj["Body"].read(max_bytes + 1)
        if len(data) > max_bytes:
            raise TooLarge(localfs.too_large_reason(uri, len(data), max_bytes, what))
        return data


def exists(uri: str) -> bool:
    if is_remote(uri):
        bucket, key = split_s3(uri)
        try:
            with _s3_errors(uri):
                s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except FileNotFoundError:
            return False
    return os.path.exists(local_path(uri))


def iter_files(uri: str) -> Iterator[FileEntry]:
    """Every file under a folder / prefix, recursively, in lexical order of URI.

    S3 listing is paginated (1000 keys a page) and streamed. A URI naming a single file yields
    that file. Hidden files and folders (name starting with ``.``) are skipped.
    """
    if is_remote(uri):
        with _s3_errors(uri):
            yield from _iter_s3(uri)
        return
    root = local_path(uri)
    if not os.path.isdir(root):
        e = localfs.stat_entry(root)  # FileNotFoundError when nothing is there
        yield FileEntry(e.path, e.size, e.version, e.error)
        return
    for e in localfs.walk(root):  # every bad entry is an entry with its reason, never an exception
        yield FileEntry(e.path, e.size, e.version, e.error)


def _iter_s3(uri: str) -> Iterator[FileEntry]:
    bucket, key = split_s3(uri)
    client = s3_client()
    if key and not key.endswith("/"):
        # A single object, or a prefix written without its trailing slash.
        from botocore.exceptions import ClientError

        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if not _is_missing(exc):
                raise
        else:
            yield FileEntry(uri, int(head["ContentLength"]), head["ETag"].strip('"'))
            return
        key += "/"
    found = False
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=key, PaginationConfig={"PageSize": S3_PAGE_SIZE}):
        for obj in page.get("Contents", ()):
            k = obj["Key"]
            if k.endswith("/") or any(part.startswith(".") for part in k[len(key):].split("/")):
                continue
            found = True
            yield FileEntry(f"{_S3}{bucket}/{k}", int(obj["Size"]), obj["ETag"].strip('"'))
    if not found and not _prefix_exists(bucket, key):
        raise FileNotFoundError(f"{uri} does not exist")


def _prefix_exists(bucket: str, key: str) -> bool:
    resp = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    return bool(resp.get("KeyCount", 0))


def is_image_name(uri: str) -> bool:
    return os.path.splitext(uri)[1].lower() in IMAGE_EXTENSIONS


#: Reasons of entries reported whatever their name: what they point at is unknown.
_ALWAYS_REPORTED = ("dangling_symlink", "symlink_loop", "directory_loop", "unreadable_folder", "access_denied",
                    "undecodable_name")


def list_images(uri: str) -> list[FileEntry]:
    """Image files under ``uri`` (by extension, case-insensitive), sorted by URI — with the entries
    that cannot be used (``error`` set): non-regular files with an image name, and any broken link,
    link loop, directory loop or unreadable folder (its target unknown, it may have been an image)."""
    return [e for e in iter_files(uri)
            if is_image_name(e.uri) or (e.error is not None and e.error.startswith(_ALWAYS_REPORTED))]


def stat(uri: str) -> FileEntry:
    """Size and version tag of one file; :class:`BadEntry` (its reason) for a local entry that is
    not a usable regular file (a FIFO, a device, a dangling link …)."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            head = s3_client().head_object(Bucket=bucket, Key=key)
        return FileEntry(uri, int(head["ContentLength"]), head["ETag"].strip('"'))
    e = localfs.stat_entry(local_path(uri))
    if e.error:
        raise BadEntry(e.error)
    return FileEntry(e.path, e.size, e.version)


def read_list_file(uri: str) -> list[str]:
    """URIs listed one per line; blank lines and lines starting with ``#`` are skipped.

    Relative entries are taken relative to the list file's own folder.
    """
    text = read_bytes(uri).decode("utf-8")
    base = parent(uri)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_remote(line) or line.startswith(_FILE) or os.path.isabs(line):
            out.append(normalize(line))
        else:
            out.append(join(base, line) if is_remote(base) else os.path.normpath(os.path.join(base, line)))
    return out


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def atomic_write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old state or the whole new file.

    Local: write a hidden temp file in the same folder, fsync, ``os.replace``. S3: one
    ``PutObject`` (atomic per object; no multipart upload that a crash could leave completed
    half-way).
    """
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = local_path(uri)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_set(files: dict[str, bytes]) -> None:
    """Write several files as one set: all of them, or (on a failure) none — the old set stays.

    Local: every file goes to a hidden temp name beside its target first (written, fsynced); only
    when all are written are they renamed into place, in the order given — put the file whose
    presence marks a complete set last. A failure while writing (a full disk, a write error)
    removes the temps and leaves every old file as it was. S3 has no rename: the objects are PUT in
    the order given, each atomic; the bytes are all built before the first PUT, so only the
    network can fail in between, and the marker goes last.
    """
    items = list(files.items())
    if any(is_remote(uri) for uri, _ in items):
        for uri, data in items:
            atomic_write_bytes(uri, data)
        return
    staged: list[tuple[str, str]] = []
    try:
        for uri, data in items:
            path = local_path(uri)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
            staged.append((tmp, path))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


class UnwritableLocation(OSError):
    """An output location that cannot be written (found before anything is computed)."""


def probe_writable(uri: str, what: str = "output") -> None:
    """Write and delete a small probe object under the folder / prefix ``uri``.

    Raises :class:`UnwritableLocation` naming the location and the fix when ``uri`` is a file,
    lies below a file, or cannot be created or written (read-only, denied, no such bucket).
    """
    probe = join(uri, f".cdi-ray-write-probe-{uuid.uuid4().hex}")
    if not is_remote(uri):
        path = local_path(uri)
        existing = path
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if os.path.lexists(existing) and not os.path.isdir(existing):
            where = "is" if existing == path else f"lies below {existing}, which is"
            raise UnwritableLocation(f"{what}: {uri} {where} a file, not a folder — give a folder (it is created "
                                     "if missing)")
    try:
        atomic_write_bytes(probe, b"cdi-ray write probe\n")
        delete(probe)
    except OSError as exc:
        why = exc.strerror or str(exc) if not is_remote(uri) else str(exc)
        raise UnwritableLocation(f"{what}: {uri} cannot be written ({why}) — give a writable folder or s3:// "
                                 "prefix (and the permission to create it)") from None


def parquet_bytes(table, metadata: dict[str, str] | None = None, compression: str = "zstd") -> bytes:
    """A whole Parquet file in memory (its footer — Parquet's own commit marker — is written last)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    return sink.getvalue().to_pybytes()


def write_parquet(uri: str, table, metadata: dict[str, str] | None = None) -> None:
    """``table`` as one Parquet file at ``uri``, atomically (:func:`atomic_write_bytes`)."""
    atomic_write_bytes(uri, parquet_bytes(table, metadata))


def read_parquet(uri: str, columns: list[str] | None = None):
    """A whole Parquet file as a pyarrow table (``FileNotFoundError`` when it does not exist)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(read_bytes(uri)), columns=columns)


def delete(uri: str) -> None:
    """Remove one file; missing files are fine."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    try:
        os.unlink(local_path(uri))
    except FileNotFoundError:
        pass


def list_subdirs(uri: str) -> list[str]:
    """Names of the immediate sub-folders (S3: common prefixes) of ``uri``; [] when absent."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        key = key.rstrip("/") + "/" if key else ""
        names = []
        paginator = s3_client().get_paginator("list_objects_v2")
        with _s3_errors(uri):
            for page in paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/", PaginationConfig={"PageSize": S3_PAGE_SIZE}):
                for cp in page.get("CommonPrefixes", ()):
                    names.append(cp["Prefix"][len(key):].rstrip("/"))
        return sorted(names)
    root = local_path(uri)
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))

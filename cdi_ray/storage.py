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

Failures come out as OSErrors that name the URI: ``FileNotFoundError`` (404), ``PermissionError``
(403) and :class:`StorageError` (anything still failing after the retries), so one unreadable
object fails its image or its audit, not the batch.
This module imports no Ray.
"""
from __future__ import annotations

import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

#: Attempts per S3 request, the first included (``AWS_MAX_ATTEMPTS`` overrides): throttling (SlowDown, 503), other 5xx
#: and dropped connections are retried with exponential backoff and client-side rate limiting
#: (botocore's "adaptive" mode); 403 and 404 are not retried.
S3_MAX_ATTEMPTS = 8

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
# S3 client (one per process; boto3 clients are thread-safe)
# ----------------------------------------------------------------------------------------------
_client_lock = threading.Lock()
_client: tuple[int, object] | None = None


def s3_client():
    """The process's boto3 S3 client, configured from the environment only."""
    global _client
    with _client_lock:
        if _client is None or _client[0] != os.getpid():
            import boto3
            from botocore.config import Config

            attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)
            cfg = Config(retries={"total_max_attempts": attempts, "mode": "adaptive"}, max_pool_connections=32)
            _client = (os.getpid(), boto3.session.Session().client("s3", config=cfg))
        return _client[1]


def reset_client() -> None:
    """Forget the cached client (tests that change the endpoint between runs)."""
    global _client
    with _client_lock:
        _client = None


def _is_missing(exc: Exception) -> bool:
    return _code(exc) in _MISSING


_MISSING = ("404", "NoSuchKey", "NotFound", "NoSuchBucket")
_DENIED = ("403", "AccessDenied", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class StorageError(OSError):
    """An S3 request that failed after boto3's retries (throttling, 5xx, connection resets are
    retried with exponential backoff first); the message names the URI and the S3 error."""


@contextmanager
def _s3_errors(uri: str):
    """Turn botocore's errors into OSErrors that say what to do: ``FileNotFoundError`` (404),
    ``PermissionError`` (403: the environment's credentials lack the permission), else
    :class:`StorageError` — so callers handle storage failures as the OSErrors they are."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = _code(exc)
        if code in _MISSING:
            raise FileNotFoundError(f"{uri} does not exist") from None
        if code in _DENIED:
            raise PermissionError(f"{uri}: access denied ({code}) — grant the environment's credentials "
                                  "s3:GetObject / s3:ListBucket on it (s3:PutObject to write there)") from None
        raise StorageError(f"{uri}: S3 error {code or type(exc).__name__} after retries — {exc}") from None
    except BotoCoreError as exc:  # connection refused/reset, timeouts (after retries), checksum mismatch
        raise StorageError(f"{uri}: S3 request failed after retries — {type(exc).__name__}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# reading, listing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """One listed file: its URI, size in bytes and a version tag (S3 ETag or local mtime_ns)."""

    uri: str
    size: int
    version: str


def read_bytes(uri: str) -> bytes:
    """The whole object. Raises ``FileNotFoundError`` (missing), ``PermissionError`` (denied) or
    :class:`StorageError` (S3 failed after retries)."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    with open(local_path(uri), "rb") as f:
        return f.read()


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
    if os.path.isfile(root):
        st = os.stat(root)
        yield FileEntry(root, st.st_size, str(st.st_mtime_ns))
        return
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{uri} does not exist")
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            entries.append(FileEntry(p, st.st_size, str(st.st_mtime_ns)))
    yield from sorted(entries, key=lambda e: e.uri)


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


def list_images(uri: str) -> list[FileEntry]:
    """Image files under ``uri`` (by extension, case-insensitive), sorted by URI."""
    return [e for e in iter_files(uri) if os.path.splitext(e.uri)[1].lower() in IMAGE_EXTENSIONS]


def stat(uri: str) -> FileEntry:
    """Size and version tag of one file."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
        with _s3_errors(uri):
            head = s3_client().head_object(Bucket=bucket, Key=key)
        return FileEntry(uri, int(head["ContentLength"]), head["ETag"].strip('"'))
    p = local_path(uri)
    st = os.stat(p)
    return FileEntry(p, st.st_size, str(st.st_mtime_ns))


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

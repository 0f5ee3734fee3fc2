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
This module imports no Ray.
"""
from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from typing import Iterator

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

            cfg = Config(retries={"max_attempts": 8, "mode": "adaptive"}, max_pool_connections=32)
            _client = (os.getpid(), boto3.session.Session().client("s3", config=cfg))
        return _client[1]


def reset_client() -> None:
    """Forget the cached client (tests that change the endpoint between runs)."""
    global _client
    with _client_lock:
        _client = None


def _is_missing(exc: Exception) -> bool:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


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
    """The whole object. Raises ``FileNotFoundError`` when it does not exist."""
    if is_remote(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(uri) from None
            raise
    with open(local_path(uri), "rb") as f:
        return f.read()


def exists(uri: str) -> bool:
    if is_remote(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise
    return os.path.exists(local_path(uri))


def iter_files(uri: str) -> Iterator[FileEntry]:
    """Every file under a folder / prefix, recursively, in lexical order of URI.

    S3 listing is paginated (1000 keys a page) and streamed. A URI naming a single file yields
    that file. Hidden files and folders (name starting with ``.``) are skipped.
    """
    if is_remote(uri):
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
            yield FileEntry(uri, int(head["ContentLength"]), head["ETag"].strip('"'))
            return
        except ClientError as exc:
            if not _is_missing(exc):
                raise
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
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            head = s3_client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(uri) from None
            raise
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


def delete(uri: str) -> None:
    """Remove one file; missing files are fine."""
    if is_remote(uri):
        bucket, key = split_s3(uri)
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
        for page in paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/", PaginationConfig={"PageSize": S3_PAGE_SIZE}):
            for cp in page.get("CommonPrefixes", ()):
                names.append(cp["Prefix"][len(key):].rstrip("/"))
        return sorted(names)
    root = local_path(uri)
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))

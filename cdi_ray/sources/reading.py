"""Reading images back from where they are stored: whole objects, byte ranges of tar shards,
Parquet row groups — each shard's members of a decode batch together (few requests per batch)."""
from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict

from cdi_ray import localfs, storage

#: Largest encoded image read (bytes; ``$CDI_RAY_MAX_IMAGE_BYTES`` overrides): a larger file is an
#: unusable image (``too_large``), refused from its size before it is read. 256 MiB is above any
#: image the decoder accepts in practice (~89.5 MP, ``cdi_ray.images.DEFAULT_MAX_PIXELS``).
MAX_IMAGE_BYTES = 256 << 20
#: Seconds one image read may take, retries included (``$CDI_RAY_READ_TIMEOUT`` overrides): a read
#: that stalls longer (a hung mount, an S3 connection that trickles) fails that image only.
READ_TIMEOUT_S = 120.0
#: Member locator prefixes.
TAR, PARQUET = "tar", "parquet"
#: Tar members of one decode batch closer than this are fetched with one ranged read.
COALESCE_GAP = 1 << 20
#: Largest single ranged read when coalescing tar members.
COALESCE_MAX = 64 << 20
#: Parquet row groups (image column only) kept per process for the rows that follow.
ROW_GROUP_CACHE = 4


def max_image_bytes() -> int:
    return int(os.environ.get("CDI_RAY_MAX_IMAGE_BYTES") or MAX_IMAGE_BYTES)


def read_timeout() -> float:
    return float(os.environ.get("CDI_RAY_READ_TIMEOUT") or READ_TIMEOUT_S)


def read_image(uri: str) -> bytes:
    """One encoded image, bounded in size (:data:`MAX_IMAGE_BYTES`) and time (:data:`READ_TIMEOUT_S`)."""
    return with_deadline(lambda: storage.read_bytes(uri, max_bytes=max_image_bytes(), what="image"), read_timeout(),
                         f"reading {uri}")


def with_deadline(fn, timeout: float, what: str):
    """``fn()`` in a daemon thread, waited on for ``timeout`` seconds: a call that stalls (a hung
    mount, a trickling connection) raises ``TimeoutError`` here and is left behind — it cannot
    hold up the caller, and it dies with the process."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 — re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="cdi-ray-read", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"timeout: {what} took longer than {timeout:g} s — the storage stalled; "
                           "retried by the next run (CDI_RAY_READ_TIMEOUT sets the limit)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def read_range(uri: str, offset: int, length: int) -> bytes:
    """``length`` bytes of an object from ``offset`` (one ranged GET on S3)."""
    if length <= 0:
        return b""
    if storage.is_remote(uri):
        bucket, key = storage.split_s3(uri)
        body = storage.s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")["Body"]
        data = body.read()
    else:
        with localfs.open_regular(storage.local_path(uri)) as f:
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
        return localfs.open_regular(storage.local_path(uri))
    size = storage.stat(uri).size if size is None else size
    return io.BufferedReader(_S3Object(uri, size), buffer_size=1 << 20)


def open_stream(uri: str):
    """A forward-only binary stream over a whole object (one GET on S3, read as it arrives)."""
    if not storage.is_remote(uri):
        return localfs.open_regular(storage.local_path(uri))
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
                out[i] = read_image(uri)
            elif loc.startswith(TAR + ":"):
                _, off, size = loc.split(":")
                if int(size) > max_image_bytes():
                    raise storage.TooLarge(localfs.too_large_reason(uri, int(size), max_image_bytes(), "image"))
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


"""Models kept in object storage: ``s3://`` model prefixes fetched once per node into a local cache.

Every feature actor (and :func:`cdi_ray.pipeline.describe.describe_model`) calls :func:`materialize_model`; on a
node they share one cache folder (``$CDI_RAY_CACHE/models`` or ``~/.cache/cdi-ray/models``).

* Key: sha256 over the URI and every object's (relative path, size, ETag — S3's checksum of the
  object's bytes). A re-uploaded file changes its ETag, so a changed model gets a new entry and a
  stale copy is never served; an unchanged model is fetched once, ever, per node.
* Concurrency: the first process to arrive takes an exclusive ``flock`` on ``<entry>.lock``,
  fetches into ``<entry>.tmp-<random>``, checks every file's size and (single-part uploads) its
  MD5 against the ETag, fetching a mismatch once more, writes the completion record
  ``.cdi-ray-fetch.json`` (what was fetched, by whom, the files' sha256) and renames the folder
  into place — one atomic step. The others wait on the lock and find the entry complete. A
  crash leaves only a temp folder, which the next fetch removes; an entry without the record is
  never used.
* Large files are fetched with boto3's managed transfer (ranged parts, retried), streamed to disk.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid

from cdi_ray import storage

log = logging.getLogger(__name__)

#: Written last into a cache entry; its presence is what makes the entry usable (hidden: not fingerprinted).
FETCH_RECORD = ".cdi-ray-fetch.json"


def cache_root() -> str:
    """Node-local cache for models fetched from S3 (``CDI_RAY_CACHE`` or ``~/.cache/cdi-ray``)."""
    return os.path.join(os.environ.get("CDI_RAY_CACHE", os.path.expanduser("~/.cache/cdi-ray")), "models")


def _is_complete(dest: str) -> bool:
    return os.path.isfile(os.path.join(dest, FETCH_RECORD))


def _digest(path: str, name: str) -> str:
    h = hashlib.new(name)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: str) -> str:
    return _digest(path, "sha256")


def _is_md5_etag(etag: str) -> bool:
    """A single-part upload's ETag is the MD5 of the bytes (multipart ETags end in ``-<parts>``)."""
    return len(etag) == 32 and all(c in "0123456789abcdef" for c in etag)


#: Downloads of one file before a checksum mismatch is an error.
FETCH_ATTEMPTS = 2


def _fetch(uri: str, files: list[tuple[str, storage.FileEntry]], tmp: str) -> list[dict]:
    """Download every object into ``tmp``, each checked against its listing — the size, and the MD5
    where the ETag is one (botocore also checks the object's CRC where S3 stored one); a mismatch is fetched again, a second one is an error (so a download
    corrupted on the way never reaches the cache). Returns the per-file record (path, size, etag, sha256)."""
    from botocore.exceptions import FlexibleChecksumError

    client = storage.s3_client()
    record = []
    for rel, entry in files:
        path = os.path.join(tmp, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        bucket, key = storage.split_s3(entry.uri)
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                client.download_file(bucket, key, path)
            except FlexibleChecksumError as exc:  # botocore's own CRC check, where S3 stored one
                problem = f"failed its checksum ({exc})"
                log.warning("model file %s: %s (download %d of %d)", entry.uri, problem, attempt, FETCH_ATTEMPTS)
                continue
            size = os.path.getsize(path)
            if size != entry.size:
                problem = f"arrived with {size} bytes, the listing said {entry.size}"
            elif _is_md5_etag(entry.version) and _digest(path, "md5") != entry.version:
                problem = f"MD5 {_digest(path, 'md5')} ≠ ETag {entry.version}"
            else:
                break
            log.warning("model file %s: %s (download %d of %d)", entry.uri, problem, attempt, FETCH_ATTEMPTS)
        else:
            raise OSError(f"cannot fetch model {uri}: {entry.uri} {problem} after {FETCH_ATTEMPTS} downloads (corrupted "
                          "on the way, or overwritten during the fetch). Fix: re-run once the upload is complete")
        record.append({"path": rel, "size": size, "etag": entry.version, "sha256": _sha256(path)})
    return record


def materialize_model(uri: str) -> str:
    """A local directory holding the model at ``uri``: the path itself if local, else the node's cached copy.

    Raises:
        FileNotFoundError: nothing under the ``s3://`` prefix.
        OSError: the fetch failed (the cache is left without a partial entry).
    """
    if not storage.is_remote(uri):
        return storage.local_path(uri)
    prefix = uri.rstrip("/") + "/"
    entries = list(storage.iter_files(uri))
    if not entries:
        raise FileNotFoundError(f"no files under model prefix {uri}; Fix: upload the model directory there")
    files = [(e.uri[len(prefix):] if e.uri.startswith(prefix) else storage.basename(e.uri), e) for e in entries]
    key = hashlib.sha256("\n".join([uri] + [f"{rel}\0{e.size}\0{e.version}" for rel, e in files]).encode()).hexdigest()
    root = cache_root()
    dest = os.path.join(root, key[:32])
    if _is_complete(dest):
        return dest
    os.makedirs(root, exist_ok=True)
    with open(dest + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if _is_complete(dest):
            return dest
        # Whoever held the lock before us crashed: clear its leftovers (nobody else can be writing them now).
        for name in os.listdir(root):
            if name.startswith(os.path.basename(dest) + ".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        shutil.rmtree(dest, ignore_errors=True)  # an entry without its record is not trusted
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
        start = time.monotonic()
        try:
            record = _fetch(uri, files, tmp)
            with open(os.path.join(tmp, FETCH_RECORD), "w") as fh:
                json.dump({"uri": uri, "key": key, "files": record, "host": socket.gethostname(), "pid": os.getpid(),
                           "seconds": round(time.monotonic() - start, 3)}, fh, indent=1)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched model %s into %s (%d files, %.1f s)", uri, dest, len(files), time.monotonic() - start)
    return dest

"""The feature store: Parquet part files keyed by (model fingerprint, feature-config hash, image hash).

Layout under the store root (a local folder or an ``s3://`` prefix)::

    model=<fingerprint>/cfg=<config hash>/part-<uuid>.parquet   feature rows
    model=_descriptors/cfg=<geometry key>/part-<uuid>.parquet   model-free descriptors (cdi_ray.controls)
    _hashes/part-<uuid>.parquet                                  URI → content hash index
    _models/<fingerprint>.json                                   what a model is (geometry, conditioning)
    _shards/<name>.parquet                                       indexes of shards (cdi_ray.sources.shards)

One feature row per image: ``content_hash``, ``model_fingerprint``, ``config_hash``, ``status``
(``"ok"`` or ``"error"``), ``error`` (the image's failure reason, null when ok) and the feature
columns as float64 (NaN on error rows). Decode failures are stored too: they are a property of
the bytes, so a re-run must not retry them — read failures (transient) never reach the store.

Atomicity: a part file is serialised completely in memory and published with
:func:`cdi_ray.storage.atomic_write_bytes` (local temp + rename; one S3 PUT). Readers only look at
``part-*.parquet`` names and *validate* every file (Parquet footer, required columns, the
partition's fingerprint and config hash); a file that fails is skipped with a warning, never
trusted. Rows can appear twice when a retried task wrote its batch again: reading keeps the first
row per ``content_hash`` in file-name order, and features are deterministic per key, so the
choice does not matter.
"""
from __future__ import annotations

import json
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cdi_ray import storage

log = logging.getLogger(__name__)

KEY_COLUMNS = ("content_hash", "model_fingerprint", "config_hash", "status", "error")
#: Columns of the URI → content hash index.
HASH_INDEX_SCHEMA = pa.schema([("uri", pa.string()), ("size", pa.int64()), ("version", pa.string()),
                               ("content_hash", pa.string())])
#: Store "fingerprint" of the model-free descriptor partitions (``model=_descriptors/cfg=<key>``);
#: a real fingerprint is a sha256 hex digest, so it cannot collide.
DESCRIPTOR_PARTITION = "_descriptors"
STATUS_OK, STATUS_ERROR = "ok", "error"
#: Parallel GETs when reading many part files from S3.
_READ_THREADS = 16


def _part_name() -> str:
    return f"part-{uuid.uuid4().hex}.parquet"


def _read_table(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """A part file, or None (with a warning) when it is missing or not a complete Parquet file."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None  # deleted between listing and reading (compaction)
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        log.warning("ignoring unreadable feature-store file %s: %s", uri, exc)
        return None


class FeatureStore:
    """Feature rows of every (model, feature config, image) computed so far.

    Args:
        root (`str`): local folder or ``s3://`` prefix.
    """

    def __init__(self, root: str):
        self.root = storage.normalize(root) if not storage.is_remote(root) else root.rstrip("/")

    # -- layout ------------------------------------------------------------------------------
    def partition(self, fingerprint: str, config_hash: str) -> str:
        return storage.join(self.root, f"model={fingerprint}", f"cfg={config_hash}")

    def part_files(self, fingerprint: str, config_hash: str) -> list[str]:
        try:
            files = storage.iter_files(self.partition(fingerprint, config_hash))
            return sorted(e.uri for e in files if _is_part(e.uri))
        except FileNotFoundError:
            return []

    # -- reading -----------------------------------------------------------------------------
    def _tables(self, fingerprint: str, config_hash: str, columns: list[str] | None,
                hashes: pa.Array | None = None) -> list[pa.Table]:
        """Valid part files of a partition, each restricted to ``hashes`` when given (so memory
        follows the rows needed, not the partition's size)."""
        files = self.part_files(fingerprint, config_hash)
        if not files:
            return []

        def load(f):
            t = _read_table(f, columns)
            if t is None:
                return None
            if not _belongs(t, fingerprint, config_hash):
                log.warning("ignoring feature-store file %s: its rows belong to another partition", f)
                return None
            if hashes is not None:
                t = t.filter(pc.is_in(t.column("content_hash"), value_set=hashes))
            return t

        with ThreadPoolExecutor(min(_READ_THREADS, len(files))) as pool:
            return [t for t in pool.map(load, files) if t is not None]

    def keys(self, fingerprint: str, config_hash: str) -> set[str]:
        """Content hashes with a stored row (ok or a cached decode error)."""
        tables = self._tables(fingerprint, config_hash, ["content_hash", "model_fingerprint", "config_hash"])
        out: set[str] = set()
        for t in tables:
            out.update(t.column("content_hash").to_pylist())
        return out

    def stored_keys(self, fingerprint: str, config_hash: str) -> pa.Array:
        """:meth:`keys` as one Arrow array (for planning many images: no Python set per image)."""
        tables = self._tables(fingerprint, config_hash, ["content_hash", "model_fingerprint", "config_hash"])
        if not tables:
            return pa.array([], pa.string())
        return pc.unique(pa.chunked_array([t.column("content_hash") for t in tables], pa.string()))

    def read(self, fingerprint: str, config_hash: str, hashes: Iterable[str] | None = None) -> pa.Table | None:
        """Stored rows, one per content hash (restricted to ``hashes`` when given); None if empty."""
        wanted = None if hashes is None else pa.array(sorted(set(hashes)), pa.string())
        tables = self._tables(fingerprint, config_hash, None, wanted)
        if not tables:
            return None
        return dedupe(pa.concat_tables(tables, promote_options="default"))

    # -- writing -----------------------------------------------------------------------------
    def write(self, fingerprint: str, config_hash: str, table: pa.Table) -> str:
        """Publish ``table`` as one new part file, atomically; returns its URI."""
        missing = [c for c in KEY_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"feature rows lack columns {missing}")
        uri = storage.join(self.partition(fingerprint, config_hash), _part_name())
        storage.write_parquet(uri, table)
        return uri

    # -- model info cache ---------------------------------------------------------------------
    def model_info(self, fingerprint: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(storage.join(self.root, "_models", f"{fingerprint}.json")))
        except (FileNotFoundError, ValueError):
            return None

    def put_model_info(self, fingerprint: str, info: dict) -> None:
        storage.atomic_write_bytes(
            storage.join(self.root, "_models", f"{fingerprint}.json"), json.dumps(info, sort_keys=True).encode()
        )

    # -- URI → content-hash cache --------------------------------------------------------------
    def hash_index(self) -> pa.Table:
        """``uri, size, version, content_hash`` of every image hashed by earlier runs (one row per
        hashing; a URI rewritten in between has several rows, and only the one whose size and version
        match what is listed now is valid)."""
        folder = storage.join(self.root, "_hashes")
        try:
            files = sorted(e.uri for e in storage.iter_files(folder) if _is_part(e.uri))
        except FileNotFoundError:
            files = []
        if not files:
            return HASH_INDEX_SCHEMA.empty_table()
        with ThreadPoolExecutor(min(_READ_THREADS, len(files))) as pool:
            tables = list(pool.map(lambda f: _read_table(f, list(HASH_INDEX_SCHEMA.names)), files))
        good = [t.cast(HASH_INDEX_SCHEMA) for t in tables if t is not None and set(HASH_INDEX_SCHEMA.names) <= set(t.column_names)]
        return pa.concat_tables(good) if good else HASH_INDEX_SCHEMA.empty_table()

    def add_hashes(self, rows: pa.Table) -> None:
        """Remember ``uri, size, version, content_hash`` rows (one new part file)."""
        if rows.num_rows:
            storage.write_parquet(storage.join(self.root, "_hashes", _part_name()), rows.cast(HASH_INDEX_SCHEMA))


def _is_part(uri: str) -> bool:
    name = storage.basename(uri)
    return name.startswith("part-") and name.endswith(".parquet")


def _belongs(table: pa.Table, fingerprint: str, config_hash: str) -> bool:
    names = table.column_names
    if "content_hash" not in names or "model_fingerprint" not in names or "config_hash" not in names:
        return False
    if table.num_rows == 0:
        return True
    fps = pc.unique(table.column("model_fingerprint")).to_pylist()
    cfgs = pc.unique(table.column("config_hash")).to_pylist()
    return fps == [fingerprint] and cfgs == [config_hash]


def dedupe(table: pa.Table) -> pa.Table:
    """Keep the first row per ``content_hash`` (retried writes can store a key twice)."""
    seen: set[str] = set()
    keep = []
    for i, h in enumerate(table.column("content_hash").to_pylist()):
        if h not in seen:
            seen.add(h)
            keep.append(i)
    return table if len(keep) == table.num_rows else table.take(pa.array(keep, pa.int64()))

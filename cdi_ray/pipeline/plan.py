"""Planning: audits → the unique feature work a run must do.

Deduplication is by *content*, in three steps, so that an (image, model, feature config) triple
is computed once per job however many audits, URIs or earlier runs mention it:

1. **List** every audit's sources (threaded; a prefix shared by many audits is listed once).
2. **Hash** every distinct URI once (a cheap Ray Data pass: read bytes, sha256). The result is
   cached in the feature store as ``uri → (size, version, hash)`` (version = S3 ETag or local
   mtime), so a nightly run re-reads only new or changed objects. Hashing before computing costs
   one extra read of *new* images, but it is the only way to see that two URIs (or two audits'
   prefixes) hold the same bytes before any GPU time is spent on them.
3. **Subtract** what the store already holds for each (model fingerprint, config hash); the rest
   becomes :class:`ImageWork` — one row per distinct content hash per model, carrying every config
   hash it is needed under (one decode serves several configs).

This module is Ray-free: listing and set arithmetic only.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Iterable

from cdi_ray import storage
from cdi_ray.sources import ImageEntry, ShardSpec, attach_sidecar, expand_pattern
from cdi_ray.spec import AuditSpec, ImageFolder, ListFile, Manifest, ParquetShards, shard_source

log = logging.getLogger(__name__)

#: Listing calls in flight (S3 LIST is latency-bound; thousands of audits list in parallel).
LIST_THREADS = 16


# ----------------------------------------------------------------------------------------------
# 1. listing
# ----------------------------------------------------------------------------------------------
def _source_key(source) -> tuple:
    if isinstance(source, str):
        return ("prefix", source)
    if isinstance(source, list):
        return ("list", tuple(source))
    return (type(source).__name__, source.model_dump_json())


@dataclass(frozen=True)
class ShardRef:
    """A listed shard whose images are not known yet (:mod:`cdi_ray.pipeline.shards` indexes it)."""

    entry: storage.FileEntry
    spec: ShardSpec


def shard_spec(source) -> ShardSpec:
    if isinstance(source, ParquetShards):
        return ShardSpec("parquet", source.image_column, source.label_column, source.caption_column, source.id_column)
    return ShardSpec("webdataset")


def list_source(source) -> list[ImageEntry | ShardRef]:
    """The image files a source names (shard sources: its shards), in a stable order.

    Raises:
        FileNotFoundError: the folder / prefix / list file / shard does not exist, or holds no images.
        ValueError: a malformed metadata sidecar or shard pattern (the message names it).
    """
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
        return [ImageEntry(e.uri, e.size, e.version) for e in entries]
    uris = storage.read_list_file(source.list_file) if isinstance(source, ListFile) else [storage.normalize(u) for u in source]
    if not uris:
        raise FileNotFoundError(f"list file {source.list_file} names no images")
    out = []
    for uri in uris:
        try:
            out.append(storage.stat(uri))
        except FileNotFoundError:
            out.append(storage.FileEntry(uri, -1, ""))  # reported per image later ("missing")
        except OSError:  # denied, or S3 still failing: no version, so hashing reads it and names the reason
            out.append(storage.FileEntry(uri, 0, ""))
    if isinstance(source, ListFile) and source.metadata:
        return attach_sidecar(out, None, source.metadata)
    return [ImageEntry(e.uri, e.size, e.version) for e in out]


@dataclass
class Listing:
    published: list[ImageEntry] = field(default_factory=list)
    unpublished: list[ImageEntry] = field(default_factory=list)
    error: str | None = None


def expand_sources(audits: Iterable[AuditSpec], *, threads: int = LIST_THREADS) -> dict[str, Listing]:
    """``audit id → Listing``; a source that cannot be listed fails only its audits."""
    audits = list(audits)
    keys = {}
    for a in audits:
        for s in (a.published, a.unpublished):
            keys.setdefault(_source_key(s), s)

    def one(item):
        key, source = item
        try:
            return key, list_source(source), None
        except (OSError, ValueError) as exc:
            return key, None, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max(1, min(threads, len(keys)))) as pool:
        listed = {k: (entries, err) for k, entries, err in pool.map(one, keys.items())}

    out: dict[str, Listing] = {}
    for a in audits:
        p, perr = listed[_source_key(a.published)]
        u, uerr = listed[_source_key(a.unpublished)]
        if perr or uerr:
            err = "; ".join(f"{name}: {e}" for name, e in (("published", perr), ("unpublished", uerr)) if e)
            out[a.id] = Listing(error=f"cannot list sources — {err}")
        else:
            out[a.id] = Listing(published=p, unpublished=u)
    return out


# ----------------------------------------------------------------------------------------------
# feature configs
# ----------------------------------------------------------------------------------------------
def feature_config(manifest: Manifest, audit: AuditSpec, model_name: str | None = None):
    """The audit's :class:`cdi_ray.features.config.FeatureConfig` (device left at its default:
    it does not change values, and the actor sets its own). ``model_name`` (e.g. the audit's
    reference model) changes only the model-dependent parts (dtype); the features are the audit's."""
    from cdi_ray.features.config import FeatureConfig

    model = manifest.models[model_name or audit.model]
    kwargs = dict(
        features=tuple(audit.features) if audit.features else manifest.preset_of(audit),
        overrides=audit.overrides,
        seed=audit.seed,
    )
    if model.dtype != "float32":
        kwargs["autocast_dtype"] = model.dtype
    return FeatureConfig(**kwargs)


#: Family options that change only memory use and speed, never the features (text-to-image: attention and
#: VAE slicing; caption models: the embedding cache): left out of the store key, so turning them on reuses rows.
VALUE_NEUTRAL_OPTIONS = frozenset({"attention_slicing", "vae_slicing", "caption_cache_size"})


def store_key(config, model) -> str:
    """The store partition of (feature config, how the model is loaded).

    ``FeatureConfig.config_hash()`` covers everything in the config; the weight dtype and family
    options (e.g. ``missing_label``) also change values, so they are folded in when not default
    (except ``VALUE_NEUTRAL_OPTIONS``).
    """
    h = config.config_hash()
    options = {k: v for k, v in model.options.items() if k not in VALUE_NEUTRAL_OPTIONS}
    if model.dtype == "float32" and not options:
        return h
    payload = json.dumps({"config_hash": h, "dtype": model.dtype, "options": options}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# 2.–3. dedup
# ----------------------------------------------------------------------------------------------
def distinct_entries(listings: Iterable[Listing]) -> list[ImageEntry]:
    """Every URI once (first listing wins), in URI order."""
    seen: dict[str, ImageEntry] = {}
    for li in listings:
        for e in (*li.published, *li.unpublished):
            seen.setdefault(e.uri, e)
    return [seen[u] for u in sorted(seen)]


def split_cached(entries: list[storage.FileEntry], index: dict[str, tuple[int, str, str]]):
    """Entries whose hash the index knows (same size and version) → ``{uri: hash}``; the rest to hash."""
    known, todo = {}, []
    for e in entries:
        if getattr(e, "error", None):  # reported per image (e.g. a shard member with bad metadata)
            continue
        if getattr(e, "content_hash", None):  # a shard member, hashed while its shard was indexed
            known[e.uri] = e.content_hash
            continue
        hit = index.get(e.uri)
        if e.size >= 0 and hit is not None and hit[0] == e.size and hit[1] == e.version and e.version:
            known[e.uri] = hit[2]
        elif e.size >= 0:
            todo.append(e)
    return known, todo


@dataclass(frozen=True)
class ImageWork:
    """One image to compute under one model: its bytes' hash, a URI holding them, its configs,
    and what the model is conditioned on (``key``: its store key, :mod:`cdi_ray.conditioning`;
    ``loc``: where the bytes sit inside the URI's shard, :mod:`cdi_ray.sources`)."""

    uri: str
    content_hash: str
    config_hashes: tuple[str, ...] = ()
    key: str = ""
    loc: str = ""
    label: int | None = None
    captions: tuple[str, ...] = ()

    @property
    def store_key(self) -> str:
        return self.key or self.content_hash


def plan_work(
    needs: dict[str, dict[str, set[str]]],
    representative: dict[str, ImageWork],
    stored: dict[tuple[str, str], set[str]],
    fingerprints: dict[str, str],
) -> dict[str, list[ImageWork]]:
    """What each model must still compute.

    Args:
        needs: ``model name → config hash → image keys`` the audits use (the content hash, or for
            conditional models the key of (content, conditioning): :mod:`cdi_ray.conditioning`).
        representative: ``image key → ImageWork`` (one URI with those bytes and its conditioning).
        stored: ``(fingerprint, config hash) → image keys`` already in the store.
        fingerprints: ``model name → fingerprint``.

    Returns:
        ``model name → [ImageWork]`` sorted by image key; models with nothing to do are absent.
    """
    out: dict[str, list[ImageWork]] = {}
    # Two model names can point at the same weights (same fingerprint): merge them.
    by_fp: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    name_of_fp: dict[str, str] = {}
    for name, per_cfg in needs.items():
        fp = fingerprints[name]
        name_of_fp.setdefault(fp, name)
        for cfg, hashes in per_cfg.items():
            by_fp[fp][cfg] |= hashes
    for fp, per_cfg in by_fp.items():
        cfgs_of: dict[str, list[str]] = defaultdict(list)
        for cfg in sorted(per_cfg):
            have = stored.get((fp, cfg), set())
            for h in per_cfg[cfg] - have:
                cfgs_of[h].append(cfg)
        if cfgs_of:
            out[name_of_fp[fp]] = [
                replace(representative[h], config_hashes=tuple(cfgs)) for h, cfgs in sorted(cfgs_of.items())
            ]
    return out

"""Stage 4 — plan the batch: what each model must compute, and what each audit will read. Ray-free.

:func:`plan_batch` turns the listings, the model descriptions and the hashes into a
:class:`BatchPlan`. De-duplication is by content, so that an (image, model, feature config)
triple is computed once per batch however many audits, URIs or earlier runs name it:

1. **resolve** every source's listing to content hashes (the run's hash results, then the
   store's URI → hash index) or to why an image cannot be used; ``<run>/sources/<id>.parquet``;
2. **runs**: per audit, its own test on its model and, with a reference model, the reference
   control's re-run (a :class:`Role`); each run's feature config (one function:
   :meth:`cdi_ray.spec.Manifest.feature_config`), store partition (:func:`store_key`) and each
   image's store key under the run's model (its conditioning: :mod:`cdi_ray.conditioning`;
   ``<run>/keys/…`` for conditional models);
3. **work**: per model fingerprint, the image keys its runs need minus those the store holds,
   each once with every config it is needed under (one decode serves several configs), at one
   URI that holds its bytes; a model's work is a file of :class:`~cdi_ray.pipeline.rows.ImageRow`
   in read order (``<run>/work/<model>.parquet``);
4. **descriptors**: the model-free control's image descriptors the store lacks, per
   preprocessing geometry; each is computed by the first feature stream that decodes the image at
   that geometry, the rest by a descriptor-only stream (``<run>/descriptors/<key>.parquet``).

Everything per image lives in Arrow tables and files; what the returned plan holds is per audit,
per model and per partition. ``<run>/plan.json`` says what the run will compute, how much and
on which models (``cdi-ray plan``).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from enum import Enum

import pyarrow as pa
import pyarrow.compute as pc

from cdi_ray import storage
from cdi_ray.conditioning import merge_reports
from cdi_ray.pipeline import rows
from cdi_ray.pipeline.describe import ModelInfos
from cdi_ray.pipeline.hashing import HashedImages
from cdi_ray.pipeline.imagesets import ImageSet, Sources
from cdi_ray.pipeline.listing import Listings
from cdi_ray.pipeline.store import DESCRIPTOR_PARTITION, FeatureStore

log = logging.getLogger(__name__)

PLAN_JSON = "plan.json"
#: Family options that change only memory use and speed, never the features (text-to-image: attention and
#: VAE slicing; caption models: the embedding cache): left out of the store key, so turning them on reuses rows.
VALUE_NEUTRAL_OPTIONS = frozenset({"attention_slicing", "vae_slicing", "caption_cache_size"})


class Role(str, Enum):
    """Why a run of an audit's test exists."""

    AUDIT = "audit"                  # the audit's own test: its verdict, its report
    REFERENCE = "reference-model"    # the reference-model control (cdi_ray.controls.reference)


@dataclass(frozen=True)
class AuditRun:
    """One test an audit needs: the model, the store partition of its features, its images."""

    role: Role
    model: str
    fingerprint: str
    feature_key: str
    columns: tuple[str, ...]
    published: ImageSet
    unpublished: ImageSet
    images: int = 0  # usable images on both sides (what aggregating the run holds)


@dataclass(frozen=True)
class AuditPlan:
    """One audit as planned: its runs, or why it cannot run at all."""

    audit_id: str
    model: str
    error: str | None = None
    main: AuditRun | None = None
    reference: AuditRun | None = None
    reference_error: str | None = None  # why the reference control cannot run (it then fires)
    descriptor_key: str | None = None   # the model-free control's descriptor partition
    conditioning: dict | None = None    # what the images were conditioned on (provenance)
    feature_config: dict | None = None  # provenance


@dataclass(frozen=True)
class StreamPlan:
    """One model's feature stream: its work file and what the actors need to load."""

    model: str
    fingerprint: str
    work: str
    images: int
    rows: int                       # images × the configs each is computed under
    configs: dict[str, dict]        # config key → FeatureConfig arguments
    columns: dict[str, list[str]]   # config key → feature columns
    load_options: dict
    geometry: tuple[int, int]
    descriptor_key: str
    described: int                  # images whose descriptors the stream computes


@dataclass(frozen=True)
class DescriptorPlan:
    """The model-free descriptors of one preprocessing geometry."""

    key: str
    geometry: tuple[int, int]
    missing: str       # file of (uri, content_hash, loc) the store lacked when planned
    needed: int
    stored_before: int


@dataclass(frozen=True)
class BatchPlan:
    """Stage 4's record (see the module docstring)."""

    run_dir: str
    audits: dict[str, AuditPlan]
    streams: dict[str, StreamPlan]
    descriptors: dict[str, DescriptorPlan] = field(default_factory=dict)
    needed: int = 0  # (model name, config, image key) triples the audits use

    @property
    def to_compute(self) -> int:
        return sum(s.rows for s in self.streams.values())

    @property
    def transient_dir(self) -> str:
        """Where the streams record images they could not compute now (read by aggregation)."""
        return storage.join(self.run_dir, "transient")

    def summary(self) -> dict:
        """What ``plan.json`` holds: per model what would be computed, per audit what it reads."""
        return {
            "run": self.run_dir, "needed": self.needed, "to_compute": self.to_compute,
            "models": {s.model: {"fingerprint": s.fingerprint, "images": s.images, "rows": s.rows,
                                 "features": {k: c.get("features") for k, c in s.configs.items()},
                                 "descriptors": s.described, "work": s.work} for s in self.streams.values()},
            "descriptors": {d.key: {"needed": d.needed, "stored_before": d.stored_before} for d in self.descriptors.values()},
            "audits": [{"audit_id": a.audit_id, "model": a.model, "status": "failed" if a.error else "planned",
                        "error": a.error, "feature_key": a.main.feature_key if a.main else None,
                        "reference": a.reference.model if a.reference else None} for a in self.audits.values()],
        }


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


def audit_models(manifest, audit) -> list[str]:
    """The models an audit's runs use: its own, then its reference model's (if any)."""
    ref = manifest.controls_of(audit).reference_model
    return [audit.model] + ([ref] if ref else [])


@dataclass(frozen=True)
class FeatureSetup:
    """An audit's features under one of its models: the config, its store partition and columns —
    or why it cannot be built."""

    config: dict | None = None          # FeatureConfig arguments (JSON-safe)
    key: str | None = None              # store partition (:func:`store_key`)
    columns: tuple[str, ...] = ()
    error: str | None = None


def feature_setups(manifest) -> dict[tuple[str, str], FeatureSetup]:
    """``(audit id, model) → FeatureSetup`` for every audit's runs. Per audit, never per image; built
    where the manifest was validated (the feature registry imports torch, which planning then need not)."""
    out = {}
    for a in manifest.audits:
        for model in audit_models(manifest, a):
            try:
                config = manifest.feature_config(a, model)
                out[(a.id, model)] = FeatureSetup(config.model_dump(mode="json", exclude={"device"}),
                                                  store_key(config, manifest.models[model]), tuple(config.columns))
            except Exception as exc:  # noqa: BLE001 — the audit (or its control) fails with the reason
                out[(a.id, model)] = FeatureSetup(error=str(exc))
    return out


# ----------------------------------------------------------------------------------------------
# 2. runs: per audit, its test and its reference control's
# ----------------------------------------------------------------------------------------------
class _Needs:
    """Which keyed image sets each (model, config) needs — by set, never image by image."""

    def __init__(self):
        self.by_name: dict[tuple[str, str], dict[int, pa.Table]] = {}   # (model, config) → sets
        self.by_fp: dict[str, dict[str, dict[int, pa.Table]]] = {}      # fingerprint → config → sets
        self.name_of_fp: dict[str, str] = {}                            # the name a fingerprint's stream runs under
        self.configs: dict[str, dict] = {}
        self.columns: dict[str, list[str]] = {}

    def add(self, model: str, fingerprint: str, setup: FeatureSetup, tables) -> None:
        key = setup.key
        self.configs[key] = setup.config
        self.columns[key] = list(setup.columns)
        self.name_of_fp.setdefault(fingerprint, model)
        for t in tables:
            self.by_name.setdefault((model, key), {})[id(t)] = t
            self.by_fp.setdefault(fingerprint, {}).setdefault(key, {})[id(t)] = t

    def needed(self) -> int:
        return sum(pc.count_distinct(pa.chunked_array([t.column("key") for t in sets.values()])).as_py()
                   for sets in self.by_name.values())


class FeatureConfigError(ValueError):
    """An audit's feature settings the feature registry refuses."""


def _run(manifest, audit, model: str, role: Role, setup: FeatureSetup, models: ModelInfos, sources: Sources,
         needs: _Needs):
    """``(AuditRun, conditioning report)`` of one run.

    Raises:
        FeatureConfigError: the feature config cannot be built.
        ValueError, OSError: labels the model cannot use, or a label map that cannot be read.
    """
    if setup.error:
        raise FeatureConfigError(setup.error)
    spec, info = manifest.models[model], models.infos[model]
    missing = audit.labels.missing or ("null" if spec.options.get("missing_label") == "null" else "error")
    pid, uid = sources.listings.of_audit[audit.id]
    (p_set, p_keyed, p_rep, p_prob), (u_set, u_keyed, u_rep, u_prob) = (
        sources.image_set(sid, info, missing, audit.labels.map) for sid in (pid, uid))
    message = p_prob.add(u_prob).message()
    if message:
        raise ValueError(message)
    needs.add(model, info.fingerprint, setup, (p_keyed, u_keyed))
    report = merge_reports(p_rep, u_rep).to_dict() if p_rep is not None else {"kind": "none"}
    return AuditRun(role, model, info.fingerprint, setup.key, setup.columns, p_set, u_set,
                    p_keyed.num_rows + u_keyed.num_rows), report


def plan_audit(manifest, audit, setups: dict, models: ModelInfos, sources: Sources, needs: _Needs) -> AuditPlan:
    """One live audit's runs (its own test, and its reference control's re-run)."""
    from cdi_ray.controls.descriptors import descriptor_key

    setup = setups[(audit.id, audit.model)]
    try:
        main, report = _run(manifest, audit, audit.model, Role.AUDIT, setup, models, sources, needs)
    except FeatureConfigError as exc:
        return AuditPlan(audit.id, audit.model, error=f"invalid feature config: {exc}")
    except (OSError, ValueError) as exc:  # labels the model cannot use: this audit fails alone
        return AuditPlan(audit.id, audit.model, error=f"labels: {exc}")
    controls = manifest.controls_of(audit)
    ref, reference, ref_error = controls.reference_model, None, None
    if ref:
        if ref in models.errors:
            ref_error = models.errors[ref]
        else:
            try:
                reference = _run(manifest, audit, ref, Role.REFERENCE, setups[(audit.id, ref)], models, sources, needs)[0]
            except Exception as exc:  # noqa: BLE001 — the control then cannot run, so it fires
                ref_error = f"invalid feature config for reference {ref!r}: {exc}"
    if audit.calibration == "reference" and reference is None:
        return AuditPlan(audit.id, audit.model, error="reference calibration impossible: "
                         + (ref_error or "no reference features"))
    dk = descriptor_key(*models.infos[audit.model].geometry) if controls.model_free else None
    return AuditPlan(audit.id, audit.model, main=main, reference=reference, reference_error=ref_error,
                     descriptor_key=dk, conditioning=report, feature_config=setup.config)


# ----------------------------------------------------------------------------------------------
# 3. work: per fingerprint, each image key the store lacks, once, with all its configs
# ----------------------------------------------------------------------------------------------
def _first_per(table: pa.Table, column: str) -> pa.Table:
    """The first row of each run of equal ``column`` values (``table`` sorted by it)."""
    values = table.column(column).combine_chunks()
    if len(values) == 0:
        return table
    changed = pc.not_equal(values.slice(1), values.slice(0, len(values) - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), changed.fill_null(True)]))


def work_table(fingerprint: str, per_config: dict[str, dict[int, pa.Table]], store: FeatureStore) -> pa.Table:
    """One row per image key some config still needs: the smallest URI holding it, its
    conditioning, and ``configs`` (sorted)."""
    parts = []
    for cfg in sorted(per_config):
        t = pa.concat_tables(list(per_config[cfg].values()))
        stored = store.stored_keys(fingerprint, cfg)
        if len(stored):
            t = t.filter(pc.invert(pc.is_in(t.column("key"), value_set=stored)))
        parts.append(t.append_column("config", pa.array([cfg] * t.num_rows, pa.string())))
    t = pa.concat_tables(parts)
    configs = t.select(["key", "config"]).group_by("key", use_threads=False).aggregate([("config", "distinct")])
    configs = configs.sort_by("key")
    reps = _first_per(t.sort_by([("key", "ascending"), ("uri", "ascending")]), "key").drop_columns(["config"])
    # one row per key on both sides, both in key order (Arrow joins carry no list columns)
    return reps.append_column("configs", pa.array([sorted(c) for c in configs.column("config_distinct").to_pylist()],
                                                  pa.list_(pa.string())))


def _read_order(table: pa.Table) -> list[int]:
    """Row order of a stream: members of one shard together, by position (a decode batch then reads
    neighbouring tar members with one ranged read and Parquet rows by row group); loose files by URI."""
    def key(uri: str, loc: str) -> tuple:
        if not loc:
            return uri, ()
        return uri.rsplit("#", 1)[0], tuple(int(p) if p.isdigit() else 0 for p in loc.split(":")[1:3])

    keys = [key(u, loc) for u, loc in zip(table.column("uri").to_pylist(), table.column("loc").to_pylist())]
    return sorted(range(len(keys)), key=keys.__getitem__)


def plan_stream(name: str, spec, info, table: pa.Table, needs: "_Needs", describe: pa.Array, run_dir: str) -> StreamPlan:
    """Write one model's work file (:mod:`cdi_ray.pipeline.rows`, in read order) and describe the stream.

    An image given the model's null class travels without a label and the actors load the model
    with ``missing_label="null"`` — the adapters' own way to the null class (an explicit index
    ``num_classes`` is out of range for them). Labelled images are unaffected by that option, and
    their store keys already say which label was used.
    """
    from cdi_ray.controls.descriptors import descriptor_key

    table = table.take(pa.array(_read_order(table), pa.int64()))
    labels = table.column("label")
    null = info.null_class
    use_null = null is not None and bool(pc.any(pc.equal(labels, null)).as_py())
    if use_null:
        labels = pc.if_else(pc.equal(labels, null), pa.scalar(None, pa.int64()), labels)
    flags = pc.is_in(table.column("content_hash"), value_set=describe) if len(describe) else \
        pa.array([False] * table.num_rows)
    work = storage.join(run_dir, "work", f"{name}.parquet")
    storage.write_parquet(work, rows.encode_columns(
        uri=table.column("uri"), loc=table.column("loc"), content_hash=table.column("content_hash"),
        key=table.column("key"), label=labels, captions=table.column("captions"), configs=table.column("configs"),
        describe=flags))
    configs = sorted({c for cs in table.column("configs").to_pylist() for c in cs})
    options = {**spec.options, "missing_label": "null"} if use_null else dict(spec.options)
    return StreamPlan(name, info.fingerprint, work, table.num_rows, int(pc.sum(pc.list_value_length(table.column("configs"))).as_py()),
                      {k: needs.configs[k] for k in configs}, {k: needs.columns[k] for k in configs}, options,
                      info.geometry, descriptor_key(*info.geometry), int(pc.sum(flags).as_py() or 0))


# ----------------------------------------------------------------------------------------------
# 4. descriptors of the model-free control
# ----------------------------------------------------------------------------------------------
def plan_descriptors(audits: dict[str, AuditPlan], models: ModelInfos, sources: Sources, store: FeatureStore,
                     run_dir: str) -> tuple[dict[str, DescriptorPlan], dict[str, pa.Array]]:
    """Per descriptor partition: the content hashes of audits with the control on that the store
    lacks (``<run>/descriptors/<key>.parquet``, each at its smallest URI), and those hashes."""
    wanted: dict[str, dict[str, None]] = {}
    geometry: dict[str, tuple[int, int]] = {}
    for a in audits.values():
        if a.main is not None and a.descriptor_key:
            wanted.setdefault(a.descriptor_key, {}).update(dict.fromkeys(sources.listings.of_audit[a.audit_id]))
            geometry[a.descriptor_key] = models.infos[a.model].geometry
    plans, missing = {}, {}
    for dk, sids in wanted.items():
        t = pa.concat_tables([sources.resolve(sid)[1].select(["content_hash", "uri", "loc"]) for sid in sids])
        t = t.filter(pc.is_valid(t.column("content_hash")))
        needed = pc.count_distinct(t.column("content_hash")).as_py()
        stored = store.stored_keys(DESCRIPTOR_PARTITION, dk)
        if len(stored):
            t = t.filter(pc.invert(pc.is_in(t.column("content_hash"), value_set=stored)))
        t = _first_per(t.sort_by([("content_hash", "ascending"), ("uri", "ascending")]), "content_hash")
        uri = storage.join(run_dir, "descriptors", f"{dk}.parquet")
        storage.write_parquet(uri, t.select(["uri", "content_hash", "loc"]))
        plans[dk] = DescriptorPlan(dk, geometry[dk], uri, needed, needed - t.num_rows)
        missing[dk] = t.column("content_hash").combine_chunks()
    return plans, missing


# ----------------------------------------------------------------------------------------------
# the whole plan
# ----------------------------------------------------------------------------------------------
def plan_batch(manifest, listings: Listings, models: ModelInfos, hashed: HashedImages, *, store_root: str,
               run_dir: str, setups: dict | None = None) -> BatchPlan:
    """Plan every audit of ``manifest`` (see the module docstring); writes the plan's files under
    ``run_dir`` and ``plan.json``. ``setups``: :func:`feature_setups` (built here when not given)."""
    from cdi_ray.controls.descriptors import descriptor_key

    setups = feature_setups(manifest) if setups is None else setups
    store = FeatureStore(store_root)
    sources, needs = Sources(listings, hashed, store, run_dir), _Needs()
    audits = {}
    for a in manifest.audits:
        error = listings.error(a.id) or models.errors.get(a.model)
        audits[a.id] = AuditPlan(a.id, a.model, error=error) if error else plan_audit(manifest, a, setups, models,
                                                                                     sources, needs)
    descriptors, missing = plan_descriptors(audits, models, sources, store, run_dir)
    tables = {needs.name_of_fp[fp]: work_table(fp, per_config, store) for fp, per_config in needs.by_fp.items()}
    claimed = {dk: pa.array([], pa.string()) for dk in missing}
    streams = {}
    for name in sorted(n for n, t in tables.items() if t.num_rows):
        info, t = models.infos[name], tables[name]
        dk = descriptor_key(*info.geometry)
        describe = pa.array([], pa.string())
        if dk in missing:  # each missing descriptor by the first stream that decodes its image at this geometry
            mine = pc.unique(t.column("content_hash"))
            mine = mine.filter(pc.and_(pc.is_in(mine, value_set=missing[dk]),
                                       pc.invert(pc.is_in(mine, value_set=claimed[dk]))))
            describe, claimed[dk] = mine, pa.concat_arrays([claimed[dk], mine])
        streams[name] = plan_stream(name, manifest.models[name], info, t, needs, describe, run_dir)
    plan = BatchPlan(run_dir, audits, streams, descriptors, needed=needs.needed())
    storage.atomic_write_bytes(storage.join(run_dir, PLAN_JSON), json.dumps(plan.summary(), indent=1).encode())
    return plan

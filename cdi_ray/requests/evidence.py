"""The evidence of an owner's deliverable: exactly what each test ran on, and the features to re-run it.

Per audit of a request the evidence manifest (``evidence.json``) records the model (URI and
fingerprint), the feature configuration (store key and config hash, columns), the seed, the test
procedure with the options it ran with (the permutation cap included), the controls, and — in
``evidence-images.parquet`` — every listed image in the order the test saw it: URI, content
hash, store key, and why it could not be used if so. ``features/`` holds this request's rows of
the feature store (features and model-free descriptors), in the store's own layout, so the test
can be re-run from the folder alone (:mod:`cdi_ray.requests.verify`), with nothing of another owner.

Ray-free.
"""
from __future__ import annotations

import io
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cdi_ray import storage
from cdi_ray.pipeline.plan import Role

IMAGES_FILE, FEATURES_DIR = "evidence-images.parquet", "features"
IMAGE_COLUMNS = {"audit_id": pa.string(), "role": pa.string(), "set": pa.string(), "position": pa.int64(),
                 "uri": pa.string(), "content_hash": pa.string(), "store_key": pa.string(), "reason": pa.string()}
#: Feature-row files written at once.
WRITE_THREADS = 8
#: An audit's runs, as ``role`` in ``evidence-images.parquet``: its own test and the reference-model control's re-run.
MAIN, REFERENCE = Role.AUDIT.value, Role.REFERENCE.value
@dataclass(frozen=True)
class TestRecord:
    """One run the aggregate stage made for an audit: the store partition it read and the
    :class:`~cdi_ray.pipeline.aggregator.AuditJob` it ran (images in the order the test saw them) —
    exactly the arguments of :meth:`~cdi_ray.pipeline.aggregator.AuditAggregator.run_group`."""

    __test__ = False  # not a pytest class

    fingerprint: str
    feature_key: str
    columns: tuple[str, ...]
    job: Any  #: cdi_ray.pipeline.aggregator.AuditJob


# ----------------------------------------------------------------------------------------------
# test records ↔ plain data
# ----------------------------------------------------------------------------------------------
def record_to_dict(record: TestRecord) -> dict:
    """A :class:`TestRecord` without its image lists (those go to ``evidence-images.parquet``)."""
    job = record.job
    return {"fingerprint": record.fingerprint, "feature_key": record.feature_key, "columns": list(record.columns),
            "job": {"audit_id": job.audit_id, "role": job.role.value, "procedure": job.procedure, "alpha": job.alpha,
                    "seed": job.seed, "options": dict(job.options), "controls": dict(job.controls),
                    "descriptor_key": job.descriptor_key,
                    "calibration": list(job.calibration) if job.calibration else None,
                    "calibration_keys": [list(p) for p in job.calibration_keys]}}


def image_rows(record: TestRecord) -> list[dict]:
    """``evidence-images.parquet`` rows of one test, in the job's order."""
    job = record.job
    return [{"audit_id": job.audit_id, "role": job.role.value, "set": side, "position": i, "uri": r.uri,
             "content_hash": r.content_hash, "store_key": r.key, "reason": r.reason}
            for side, refs in (("published", job.published), ("unpublished", job.unpublished))
            for i, r in enumerate(refs)]


def record_from_dict(data: dict, images: list[dict]) -> TestRecord:
    """Rebuild the :class:`TestRecord` the pipeline ran from the evidence (``images``: this test's
    rows of ``evidence-images.parquet``)."""
    from cdi_ray.pipeline.aggregator import AuditJob, ImageRef

    j = data["job"]
    sides = defaultdict(list)
    for row in sorted(images, key=lambda r: (r["set"], r["position"])):
        sides[row["set"]].append(ImageRef(row["uri"], row["content_hash"], row["reason"], row["store_key"]))
    job = AuditJob(j["audit_id"], tuple(sides["published"]), tuple(sides["unpublished"]), j["procedure"], j["alpha"],
                   j["seed"], dict(j["options"]), controls=dict(j["controls"]), descriptor_key=j["descriptor_key"],
                   calibration=tuple(j["calibration"]) if j["calibration"] else None,
                   calibration_keys=tuple(tuple(p) for p in j["calibration_keys"]), role=Role(j["role"]))
    return TestRecord(data["fingerprint"], data["feature_key"], tuple(data["columns"]), job)


def test_result_from_dict(d: dict):
    """A :class:`cdi_ray.stats.TestResult` from its ``to_dict()`` (without the held-out scores)."""
    from cdi_ray.stats import TestResult

    nan = float("nan")
    num = lambda k: nan if d.get(k) is None else float(d[k])  # noqa: E731 — json_safe wrote NaN as null
    return TestResult(procedure=d["procedure"], pvalue=float(d["pvalue"]), statistic=num("statistic"),
                      statistic_name=d["statistic_name"], effect_size=num("effect_size"), auc=num("auc"),
                      direction=d["direction"], pvalue_reverse=num("pvalue_reverse"), n_published=int(d["n_published"]),
                      n_unpublished=int(d["n_unpublished"]), alpha=float(d["alpha"]), seed=int(d["seed"]),
                      calibrated=bool(d["calibrated"]), n_permutations=d.get("n_permutations"),
                      n_exceedances=d.get("n_exceedances"), p_at_floor=bool(d.get("p_at_floor")),
                      p_tail_estimate=d.get("p_tail_estimate"), options=dict(d.get("options") or {}))


def images_parquet(rows: list[dict]) -> bytes:
    table = pa.table({k: pa.array([r.get(k) for r in rows], t) for k, t in IMAGE_COLUMNS.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def read_images(folder: str) -> list[dict]:
    return pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(folder, IMAGES_FILE)))).to_pylist()


# ----------------------------------------------------------------------------------------------
# which store rows a test reads (the aggregate stage's reads, mirrored)
# ----------------------------------------------------------------------------------------------
def store_reads(record: TestRecord) -> dict[tuple[str, str], set[str]]:
    """``(fingerprint, partition key) → store keys`` a test reads: its features, the model-free
    descriptors of its images, and the reference model's rows when calibrated."""
    from cdi_ray.pipeline.store import DESCRIPTOR_PARTITION

    job = record.job
    refs = [r for r in (*job.published, *job.unpublished) if r.content_hash]
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    out[(record.fingerprint, record.feature_key)] |= {r.store_key for r in refs}
    if job.controls and job.descriptor_key:
        out[(DESCRIPTOR_PARTITION, job.descriptor_key)] |= {r.content_hash for r in refs}
    if job.calibration:
        mapped = dict(job.calibration_keys)
        out[tuple(job.calibration)] |= {mapped.get(r.store_key, r.store_key) for r in refs}
    return out


def copy_rows(source_root: str, wanted: dict[str, dict[tuple[str, str], set[str]]], dest_of) -> int:
    """Copy each owner's store rows into their folder; returns the rows written.

    Args:
        source_root: the batch's feature store.
        wanted: owner key → partition → store keys (:func:`store_reads`, merged over their tests).
        dest_of: owner key → the feature store root of their deliverable.

    Each partition is read once for all owners (restricted to the keys they need), then split.
    """
    from cdi_ray.pipeline.store import FeatureStore

    source = FeatureStore(source_root)
    partitions: dict[tuple[str, str], set[str]] = defaultdict(set)
    for per in wanted.values():
        for part, keys in per.items():
            partitions[part] |= keys
    writes = []
    for part, keys in sorted(partitions.items()):
        table = source.read(*part, keys)
        if table is None:
            continue
        for owner, per in wanted.items():
            if part not in per:
                continue
            mine = table.filter(pc.is_in(table.column("content_hash"), value_set=pa.array(sorted(per[part]), pa.string())))
            if mine.num_rows:
                writes.append((dest_of(owner), part, mine))
    with ThreadPoolExecutor(WRITE_THREADS) as pool:  # one small atomic write each: I/O-bound
        list(pool.map(lambda w: FeatureStore(w[0]).write(*w[1], w[2]), writes))
    return sum(w[2].num_rows for w in writes)


def merge_reads(tests: Iterable) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for t in tests:
        for part, keys in store_reads(t).items():
            out[part] |= keys
    return out


"""``run_requests``: a requests file → one deliverable per owner, the status ledger, the rejected rows.

Steps (each timed):

1. **intake** — the registry and every row (:mod:`~cdi_ray.requests.intake`); bad rows become
   named rejections, the others go on;
2. **skip** — requests the ledger has ``done`` with the same inputs (and a deliverable in place)
   are carried over untouched; only failed, new or changed ones run;
3. **audit** — the requests that run expand into audits (:mod:`~cdi_ray.requests.expand`) and
   go through the pipeline's stages once (:mod:`~cdi_ray.requests.engine`: the feature store
   makes images shared by requests, or stored by earlier runs, cost nothing);
4. **decide** — each request corrected within itself (:mod:`~cdi_ray.requests.family`);
5. **deliver** — per owner: the feature rows, then the folder (:mod:`~cdi_ray.requests.deliverable`);
6. **ledger** — ``requests.parquet``, ``rejected.csv`` and the operator's ``index.html``, with
   batch-wide BH as a figure.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from cdi_ray import storage
from cdi_ray.pipeline.results import software_versions
from cdi_ray.requests import evidence as ev
from cdi_ray.requests import ledger as led
from cdi_ray.requests.deliverable import RESULTS_FILE, decide_request, family_of, folder_of, write_deliverable
from cdi_ray.requests.expand import audit_id, expand, inputs_hash
from cdi_ray.requests.family import FAMILIES, batch_bh, family_max_permutations
from cdi_ray.exits import EXIT_OK, EXIT_PARTIAL
from cdi_ray.requests.intake import IntakeError, load_registry, read_requests
from cdi_ray.spec import location_problems
from cdi_ray.spec import output_root as configured_root

log = logging.getLogger(__name__)

#: Requests whose feature rows are copied together (each store partition is read once per chunk,
#: so the driver holds at most this many requests' rows).
DELIVER_CHUNK = 256
INDEX_FILE = "index.html"
#: Deliverables written at once (each is ~10 small atomic writes).
WRITE_THREADS = 8


@dataclass
class RequestsRun:
    """What :func:`run_requests` did; ``exit_code`` as ``jobs/audit.py``."""

    out: str
    summary: dict
    outcomes: dict = field(default_factory=dict, repr=False)  #: request id → RequestOutcome (this run's)

    @property
    def exit_code(self) -> int:
        return self.summary["exit_code"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _clear(folder: str) -> None:
    """Remove an earlier deliverable of a request that runs again (its feature rows included)."""
    try:
        for f in list(storage.iter_files(folder)):
            storage.delete(f.uri)
    except FileNotFoundError:
        pass


def run_requests(requests_uri: str, registry_uri: str, out: str, *, feature_store: str | None = None,
                 family: str = "owner", q: float = 0.05, rerun_done: bool = False, address: str | None = None,
                 num_cpus: int | None = None, output_root: str | None = None) -> RequestsRun:
    """Run every request of ``requests_uri`` against the models of ``registry_uri`` into ``out``.

    Args:
        feature_store: default ``<out>/features`` (shared by every run into ``out``).
        family: ``owner`` — Holm within each request (default); ``batch`` — Benjamini–Hochberg at
            ``q`` across every test of the file (verdicts then depend on the batch, and every
            request is re-tested each run).
        q: level of batch-wide BH (the decision level with ``family="batch"``, else a figure).
        rerun_done: re-test requests the ledger has done (features still come from the store).
        output_root: every output must lie under it (default ``$CDI_RAY_OUTPUT_ROOT``; unset: anywhere).

    Raises:
        IntakeError: the requests file or the registry cannot be used (exit code 2).
    """
    if family not in FAMILIES:
        raise IntakeError(f"family must be one of {FAMILIES}, got {family!r}")
    if not 0 < q < 1:
        raise IntakeError(f"q must be in (0, 1), got {q}")
    t_start, run_id, timings = time.time(), uuid.uuid4().hex, {}
    store = feature_store or storage.join(out, "features")
    outside = location_problems({"--out": out, "--feature-store": store}, configured_root(output_root))
    if outside:
        raise IntakeError("; ".join(outside))

    def lap(name, t0):
        timings[name] = round(time.time() - t0, 3)

    # 1. intake
    t0 = time.time()
    registry = load_registry(registry_uri, output=out)
    intake = read_requests(requests_uri, registry, output=out)
    if not intake.accepted and not intake.rejected:
        raise IntakeError(f"requests file {requests_uri} names no requests")
    lap("intake", t0)

    # 2. skip what is done
    ledger = led.read_ledger(out)
    hashes = {r.request_id: inputs_hash(r, registry, family) for r in intake.accepted}

    def carried(r) -> bool:
        row = ledger.get(r.request_id)
        return (family == "owner" and not rerun_done and row is not None and row["state"] == "done"
                and row["inputs_hash"] == hashes[r.request_id]
                and storage.exists(storage.join(folder_of(out, r.request_id), RESULTS_FILE)))

    keep = [r for r in intake.accepted if carried(r)]
    todo = [r for r in intake.accepted if not carried(r)]

    # 3. audit
    t0 = time.time()
    records, counters, warnings, tests = {}, {}, {}, None
    software = software_versions()
    if todo:
        from cdi_ray.requests.engine import ensure_ray, run_audits

        n_audits = sum(len(r.models) for r in todo)
        cap = family_max_permutations(n_audits, q) if family == "batch" else None
        expansion = expand(todo, registry, output=out, feature_store=store, batch_cap=cap)
        warnings = expansion.warnings
        ensure_ray(address, num_cpus=num_cpus)
        engine = run_audits(expansion.manifest, out=out, feature_store=store, software=software)
        records, counters, tests = engine.records, engine.counters, engine.tests
    lap("audit", t0)

    # 4. decide
    t0 = time.time()
    alpha = q if family == "batch" else registry.alpha
    min_samples = (registry.defaults.get("test") or {}).get("min_samples")
    adjusted: dict[str, float | None] = {}
    if family == "batch":
        ids = [audit_id(r.request_id, m) for r in todo for m in r.models]
        p = [records[a].entry.get("p_value") if records[a].entry["status"] == "done" else None for a in ids]
        adjusted = dict(zip(ids, batch_bh(p, q)))
    outcomes = {}
    n_tested = sum(p is not None for p in adjusted.values())
    for r in todo:
        fam = family_of(r, alpha, "holm" if family == "owner" else "bh", q=q, n_tested=n_tested)
        adj = [adjusted[audit_id(r.request_id, m)] for m in r.models] if family == "batch" else None
        outcome = decide_request(r, records, alpha=alpha, min_samples=min_samples, family=fam, adjusted=adj)
        for entry in outcome.entries:
            if entry["audit_id"] in warnings:
                entry["family_warning"] = warnings[entry["audit_id"]]
        outcomes[r.request_id] = outcome
    lap("decide", t0)

    # 5. deliver: feature rows first, then the folder (results.json last marks it complete)
    t0 = time.time()
    rows_copied = 0
    order = list(outcomes.values())
    for i in range(0, len(order), DELIVER_CHUNK):
        chunk = order[i:i + DELIVER_CHUNK]
        for o in chunk:
            if o.request.request_id in ledger:
                _clear(folder_of(out, o.request.request_id))
        ran = tests.records([audit_id(o.request.request_id, m) for o in chunk for m in o.request.models])
        wanted = {o.request.request_id: ev.merge_reads(
            t for m in o.request.models for t in ran[audit_id(o.request.request_id, m)] if t is not None) for o in chunk}
        rows_copied += ev.copy_rows(store, wanted, lambda rid: storage.join(folder_of(out, rid), ev.FEATURES_DIR))
        with ThreadPoolExecutor(WRITE_THREADS) as pool:  # many small atomic writes: I/O-bound (fsync, S3 PUT)
            list(pool.map(lambda o: write_deliverable(out, o, records, ran, registry, inputs_hash=hashes[o.request.request_id],
                                                      feature_store=store, software=software), chunk))
    lap("deliver", t0)

    # 6. ledger, rejected rows, index
    t0 = time.time()
    now = _now()
    rows = dict(ledger)
    for r in keep:  # carried over: the file may have changed its contact or position
        rows[r.request_id] = {**ledger[r.request_id], "contact": r.contact, "row": r.row}
    for rid, o in outcomes.items():
        r = o.request
        rows[rid] = {"request_id": rid, "owner": r.owner, "contact": r.contact, "row": r.row, "state": o.state,
                     "reason": o.reason, "verdict": o.verdict, "used_models": o.used_models, "models": list(r.models),
                     "family": o.family["method"], "results": led.result_rows(o.entries), "inputs_hash": hashes[rid],
                     "deliverable": folder_of(out, rid), "run_id": run_id, "updated_at": now}
    for x in intake.rejected:
        if x.request_id and x.reason != "duplicate_id" and x.request_id not in hashes:
            rows[x.request_id] = led.rejected_row(x, run_id=run_id, now=now)
    in_file = [r.request_id for r in intake.accepted]
    bh = _batch_bh_figure(rows, in_file, q)
    led.write_ledger(out, list(rows.values()))
    led.write_rejected(out, intake.rejected)
    lap("ledger", t0)

    states = Counter(rows[rid]["state"] for rid in in_file)
    states["rejected"] = len(intake.rejected)
    partial = states["rejected"] or states["failed"]
    feats = counters.get("features") or {}
    summary = {
        "exit_code": EXIT_PARTIAL if partial else EXIT_OK, "out": out, "run_id": run_id, "finished_at": _now(),
        "requests": len(intake.accepted) + len(intake.rejected),
        "states": {k: states.get(k, 0) for k in led.STATES},
        "carried_over": len(keep), "run": len(todo), "audits_run": sum(len(r.models) for r in todo),
        "verdicts": dict(Counter(rows[rid]["verdict"] for rid in in_file if rows[rid].get("verdict"))),
        "family_rule": ("Holm within each request at α = %g (no other owner enters an owner's verdict)" % registry.alpha
                        if family == "owner" else "Benjamini–Hochberg at q = %g across the batch" % q),
        "batch_bh": bh,
        "features": {k: feats.get(k) for k in ("needed", "to_compute", "computed")},
        "feature_rows_delivered": rows_copied,
        "seconds": round(time.time() - t_start, 3), "timings": timings,
        "pipeline": {k: counters.get(k) for k in ("seconds", "timings", "max_permutations")} if counters else None,
    }
    try:
        from cdi_ray.requests.page import render_batch_html

        html = render_batch_html(summary, [rows[rid] for rid in in_file], [x.__dict__ for x in intake.rejected])
        storage.atomic_write_bytes(storage.join(out, INDEX_FILE), html.encode())
    except Exception as exc:  # noqa: BLE001 — the ledger is written; the page is a convenience
        log.error("writing the batch index failed: %s", exc)
    return RequestsRun(out, summary, outcomes)


def _batch_bh_figure(rows: dict, in_file: list[str], q: float) -> dict:
    """Batch-wide BH over every tested (request, model) of the file: set ``p_batch_bh`` per
    result and return the figure (how many it would flag, next to the decision rule's count)."""
    refs = [(rid, i) for rid in in_file for i, x in enumerate(rows[rid].get("results") or [])
            if x.get("p_value") is not None and x.get("status") == "done"]
    adjusted = batch_bh([rows[rid]["results"][i]["p_value"] for rid, i in refs], q) if refs else []
    for (rid, i), a in zip(refs, adjusted):
        rows[rid]["results"] = [dict(x) for x in rows[rid]["results"]]
        rows[rid]["results"][i]["p_batch_bh"] = a
    return {"q": q, "n_tested": len(refs), "flagged": sum(a is not None and a <= q for a in adjusted),
            "flagged_by_rule": sum(x.get("verdict") == "used" for rid in in_file for x in rows[rid].get("results") or [])}

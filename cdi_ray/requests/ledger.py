"""The status ledger ``<out>/requests.parquet`` and ``<out>/rejected.csv``.

One ledger row per request ever seen in ``<out>``: its state — ``done``, ``failed`` (with the
reason; retried on the next run) or ``rejected`` (the row's reason; re-checked on the next run) —
the request-level verdict and, per model, the result. A re-run with the same requests file skips
a request whose row is ``done`` with the same :func:`cdi_ray.requests.expand.inputs_hash` and
whose deliverable is in place; everything else runs.

Each file is written whole and atomically (the ledger is small: one row per request).
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from cdi_ray import storage
from cdi_ray.requests.intake import Rejection

LEDGER_FILE, REJECTED_FILE = "requests.parquet", "rejected.csv"
STATES = ("done", "failed", "rejected")

RESULT_TYPE = pa.struct([("model", pa.string()), ("audit_id", pa.string()), ("status", pa.string()),
                         ("verdict", pa.string()), ("p_value", pa.float64()), ("p_adjusted", pa.float64()),
                         ("p_batch_bh", pa.float64()), ("n_published", pa.int64()), ("n_unpublished", pa.int64()),
                         ("controls_fired", pa.string()), ("error", pa.string())])
SCHEMA = pa.schema([
    ("request_id", pa.string()), ("owner", pa.string()), ("contact", pa.string()), ("row", pa.int64()),
    ("state", pa.string()), ("reason", pa.string()), ("rejection", pa.string()), ("verdict", pa.string()),
    ("used_models", pa.list_(pa.string())), ("models", pa.list_(pa.string())), ("family", pa.string()),
    ("results", pa.list_(RESULT_TYPE)), ("inputs_hash", pa.string()), ("deliverable", pa.string()),
    ("run_id", pa.string()), ("updated_at", pa.string()),
])
REJECTED_COLUMNS = ("row", "request_id", "owner", "reason", "detail")


def read_ledger(out: str) -> dict[str, dict]:
    """``request_id → row`` of ``<out>/requests.parquet`` (empty if there is none yet)."""
    uri = storage.join(out, LEDGER_FILE)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return {}
    return {r["request_id"]: r for r in pq.read_table(pa.BufferReader(data)).to_pylist()}


def write_ledger(out: str, rows: list[dict]) -> str:
    uri = storage.join(out, LEDGER_FILE)
    table = pa.Table.from_pylist([{k: r.get(k) for k in SCHEMA.names} for r in rows], schema=SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.atomic_write_bytes(uri, sink.getvalue())
    return uri


def result_rows(entries: list[dict]) -> list[dict]:
    """The ledger's per-model results of a request's corrected entries."""
    return [{"model": e["model"], "audit_id": e["audit_id"], "status": e["status"], "verdict": e["verdict"],
             "p_value": e.get("p_value"), "p_adjusted": e.get("p_adjusted"), "p_batch_bh": None,
             "n_published": e.get("n_published"), "n_unpublished": e.get("n_unpublished"),
             "controls_fired": e.get("controls_fired"), "error": e.get("error")} for e in entries]


def rejected_row(r: Rejection, *, run_id: str, now: str) -> dict:
    return {"request_id": r.request_id or f"(row {r.row})", "owner": r.owner, "row": r.row, "state": "rejected",
            "reason": f"{r.reason}: {r.detail}", "rejection": r.reason, "results": [], "run_id": run_id,
            "updated_at": now}


def write_rejected(out: str, rejected: list[Rejection]) -> str:
    """``<out>/rejected.csv``: one line per rejected row (just the header when none was)."""
    sink = io.StringIO()
    w = csv.DictWriter(sink, fieldnames=REJECTED_COLUMNS)
    w.writeheader()
    for r in rejected:
        w.writerow({k: v for k, v in asdict(r).items() if k in REJECTED_COLUMNS})
    uri = storage.join(out, REJECTED_FILE)
    storage.atomic_write_bytes(uri, sink.getvalue().encode())
    return uri

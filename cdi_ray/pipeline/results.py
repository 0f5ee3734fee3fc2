"""Stage 7 — batch results: FDR across the batch, verdicts, ``results.json`` / ``results.parquet``, reports.

Files under the output location:

* ``results.json`` — ``{"schema", "manifest_hash", "fdr", "summary", "audits": [...], "run": {...}}``;
  one entry per audit in manifest order. Everything but ``run`` (timings, compute counters) is a
  pure function of the manifest and the stored features, so a re-run writes identical entries.
* ``results.parquet`` — the same entries, one row each, scalars only.
* ``images.parquet`` — every image an audit could not use: ``audit_id, set, uri, content_hash, reason``.

Each entry: ``audit_id, model, model_fingerprint, feature_key, status`` (done / failed),
``verdict`` (used / not_detected / inconclusive — a failed audit is inconclusive, with the failure
as its reason), ``verdict_reason, p_value, p_adjusted, fdr_reject, n_published, n_unpublished,
statistic, effect_size, auc, direction, procedure, calibrated, alpha, seed, error,
controls_fired`` (comma-separated names of the controls that fired, "" if none), ``controls``
(per control run: ``name, fired, pvalue, alpha, reason, n_published, n_unpublished, statistic,
auc, separating`` — the best-separating descriptors with their AUC), ``n_unusable,
unusable_images``; a nightly run adds ``sequential`` (the standing audit's night, look and α
spent: :class:`cdi_ray.pipeline.standing.NightlyLook`). The verdict policy is
:func:`cdi_ray.stats.verdict` (docs/VERDICTS.md).

The FDR adjustment runs over the audits that produced a p-value (failed audits are excluded);
with ``fdr.method: none`` each audit is judged at its own alpha.

Reports (docs/REPORTS.md), written after ``results.json``:

* ``audits/<audit_id>.json`` — :func:`audit_document`: the results entry, the batch's FDR
  settings, the report payload (score histograms, per-feature AUCs and weights, p-value vs n;
  :func:`cdi_ray.pipeline.payload.report_payload`) and the provenance needed to re-run it;
* ``audits/<audit_id>.html`` and ``index.html`` — rendered from those JSON files by
  :mod:`cdi_ray.report` (``cdi-ray report`` re-renders them).
"""
from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cdi_ray import storage

log = logging.getLogger(__name__)

SCHEMA = "cdi-ray/results/v1"
AUDIT_SCHEMA = "cdi-ray/audit/v1"
RESULTS_JSON, RESULTS_PARQUET, IMAGES_PARQUET = "results.json", "results.parquet", "images.parquet"
DIFF_JSON, DIFF_MD = "diff.json", "diff.md"
AUDITS_DIR, INDEX_HTML = "audits", "index.html"

#: Columns of results.parquet, in order (the JSON entries carry these plus ``unusable_images``).
ENTRY_COLUMNS = {
    "audit_id": pa.string(), "model": pa.string(), "model_fingerprint": pa.string(), "feature_key": pa.string(),
    "status": pa.string(), "verdict": pa.string(), "verdict_reason": pa.string(),
    "p_value": pa.float64(), "p_adjusted": pa.float64(), "fdr_reject": pa.bool_(),
    "n_published": pa.int64(), "n_unpublished": pa.int64(),
    "statistic": pa.float64(), "effect_size": pa.float64(), "auc": pa.float64(), "direction": pa.string(),
    "procedure": pa.string(), "feature_calibration": pa.string(), "calibrated": pa.bool_(), "alpha": pa.float64(), "seed": pa.int64(),
    "error": pa.string(), "controls_fired": pa.string(), "n_unusable": pa.int64(),
}
#: Separating descriptors listed per control in results.json.
TOP_DESCRIPTORS = 5
IMAGE_COLUMNS = {"audit_id": pa.string(), "set": pa.string(), "uri": pa.string(), "content_hash": pa.string(), "reason": pa.string()}

_FDR = {"bh": "benjamini_hochberg", "by": "benjamini_yekutieli", "bonferroni": "bonferroni"}


def _num(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class BatchResult:
    """What ``run_manifest`` returns: the entries written, where, and what was computed."""

    output: str
    audits: list[dict]
    summary: dict
    fdr: dict
    run: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when every audit is done, 3 when some failed (the others were still written)."""
        return 0 if all(a["status"] == "done" for a in self.audits) else 3

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "fdr": self.fdr, "summary": self.summary, "audits": self.audits, "run": self.run}


def adjust(pvalues: list[float | None], method: str, q: float) -> tuple[list[float | None], list[bool]]:
    """FDR-adjusted p-values and decisions (None / False where the audit has no p-value)."""
    if method == "none":
        return [None] * len(pvalues), [False] * len(pvalues)
    from cdi_ray import stats

    res = getattr(stats, _FDR[method])(
        [float("nan") if p is None else p for p in pvalues], q
    )
    return [_num(a) for a in res.adjusted], [bool(r) for r in res.reject]


def build_entries(outcomes: list[dict], *, fdr_method: str, q: float) -> tuple[list[dict], dict]:
    """Verdicts after the batch's FDR adjustment.

    Args:
        outcomes: per audit, in manifest order: ``audit_id, model, model_fingerprint, feature_key,
            status, result (TestResult | None), n_published, n_unpublished, error, unusable, alpha,
            seed, procedure, min_samples``.
    """
    from cdi_ray.stats import verdict

    pvalues = [_num(o["result"].pvalue) if o["status"] == "done" and o["result"] is not None else None for o in outcomes]
    adjusted, reject = adjust(pvalues, fdr_method, q)
    entries = []
    for o, p, p_adj, rej in zip(outcomes, pvalues, adjusted, reject):
        r = o["result"] if o["status"] == "done" else None
        if r is not None:
            kwargs: dict[str, Any] = {}
            if o.get("min_samples") is not None:
                kwargs["min_samples"] = o["min_samples"]
            controls = o.get("controls") or []
            if o.get("sequential") is not None:  # a standing audit: its life-long rule at its own α decides
                v = verdict(r, alpha=o["alpha"], controls=controls, lifelong=o["sequential"].look, **kwargs)
            elif fdr_method == "none":
                v = verdict(r, alpha=o["alpha"], controls=controls, **kwargs)
            else:
                v = verdict(r, alpha=q, p_adjusted=1.0 if p_adj is None else p_adj, controls=controls, **kwargs)
            label, reason = v.label, v.reason
        else:
            label, reason = "inconclusive", f"The audit failed and was not tested: {o['error']}"
        unusable = o.get("unusable") or []
        controls = list(o.get("controls") or []) if r is not None else []
        entries.append({
            "audit_id": o["audit_id"],
            "model": o["model"],
            "model_fingerprint": o.get("model_fingerprint"),
            "feature_key": o.get("feature_key"),
            "status": o["status"],
            "verdict": label,
            "verdict_reason": reason,
            "p_value": p,
            "p_adjusted": p_adj,
            "fdr_reject": rej,
            "n_published": int(o.get("n_published") or 0),
            "n_unpublished": int(o.get("n_unpublished") or 0),
            "statistic": _num(r.statistic) if r is not None else None,
            "effect_size": _num(r.effect_size) if r is not None else None,
            "auc": _num(getattr(r, "auc", None)) if r is not None else None,
            "direction": r.direction if r is not None else None,
            "procedure": o.get("procedure"),
            "feature_calibration": o.get("feature_calibration", "none"),
            "calibrated": bool(r.calibrated) if r is not None else None,
            "alpha": float(o["alpha"]),
            "seed": int(o["seed"]),
            "error": o.get("error"),
            "controls_fired": ",".join(c.name for c in controls if c.fired),
            "controls": [c.to_dict(top=TOP_DESCRIPTORS) for c in controls],
            "n_unusable": len(unusable),
            "unusable_images": unusable,
            **({"sequential": o["sequential"].to_dict()} if o.get("sequential") is not None else {}),
        })
    fdr = {"method": fdr_method, "q": q, "n_tested": sum(p is not None for p in pvalues)}
    return entries, fdr


def audit_rows(manifest, plan, models, outcomes) -> list[dict]:
    """Per audit, in manifest order: what :func:`build_entries` turns into a results entry."""
    rows = []
    for a in manifest.audits:
        o, ap, info = outcomes.outcomes[a.id], plan.audits[a.id], models.infos.get(a.model)
        ref = manifest.controls_of(a).reference_model
        rows.append({
            "audit_id": a.id, "model": a.model, "model_fingerprint": info.fingerprint if info else None,
            "feature_key": ap.main.feature_key if ap.main else None,
            "status": o.status, "result": o.result, "error": o.error, "controls": o.controls,
            "sequential": o.sequential,
            "n_published": o.n_published, "n_unpublished": o.n_unpublished, "unusable": o.unusable,
            "alpha": a.test.alpha, "seed": a.seed, "procedure": a.test.procedure, "min_samples": a.test.min_samples,
            "feature_calibration": "reference:" + ref if a.calibration == "reference" else "none",
        })
    return rows


def collect_results(manifest, plan, models, features, descriptors: dict, outcomes, run: dict) -> BatchResult:
    """Stage 7: the batch's verdicts after FDR, and the ``run`` section (timings, what was listed,
    hashed and computed)."""
    entries, fdr = build_entries(audit_rows(manifest, plan, models, outcomes), fdr_method=manifest.fdr.method,
                                 q=manifest.fdr.q)
    run = {**run, "features": {"needed": plan.needed, "to_compute": plan.to_compute, **features.totals()},
           "descriptors": descriptors, "max_permutations": outcomes.max_permutations}
    return BatchResult(output=run["output"], audits=entries, summary=summarize(entries), fdr=fdr, run=run)


def provenance(manifest, audit, entry: dict, plan_audit, info, run: dict, software: dict) -> dict:
    """What a third party needs to re-run one audit: the manifest entry as validated, the model,
    the feature config, seed, the batch settings, software versions and the run's timings."""
    model = manifest.models[audit.model]
    info = info.to_dict() if info is not None else {}
    return {
        "manifest_hash": run["manifest_hash"],
        "manifest_entry": audit.model_dump(mode="json"),
        "model": {"name": audit.model, "uri": model.uri, "fingerprint": entry.get("model_fingerprint"),
                  "access": model.access, "dtype": model.dtype, "options": dict(model.options),
                  "family": info.get("family"), "image_size": info.get("image_size"),
                  "image_channels": info.get("image_channels")},
        "feature_key": entry.get("feature_key"),
        "feature_config": plan_audit.feature_config if plan_audit is not None else None,
        "seed": audit.seed,
        "conditioning": plan_audit.conditioning if plan_audit is not None else None,
        "controls": manifest.controls_of(audit).model_dump(mode="json"),
        "fdr": manifest.fdr.model_dump(mode="json"),
        "software": software,
        "run": {k: run.get(k) for k in ("run_id", "output", "feature_store", "started_at", "finished_at", "seconds",
                                        "timings", "max_permutations")},
    }


def write_outputs(batch: BatchResult, manifest, plan, models, outcomes) -> None:
    """``results.json`` & co., then the reports — a report that cannot be written never loses the results."""
    write_results(batch)
    try:
        software = software_versions()
        docs = [audit_document(e, fdr=batch.fdr, report=outcomes.outcomes[a.id].report,
                               provenance=provenance(manifest, a, e, plan.audits[a.id], models.infos.get(a.model),
                                                     batch.run, software))
                for a, e in zip(manifest.audits, batch.audits)]
        write_reports(batch.output, batch.to_dict(), docs)
    except Exception as exc:  # noqa: BLE001
        log.error("writing the HTML reports failed (results.json is complete): %s: %s", type(exc).__name__, exc)


def summarize(entries: list[dict]) -> dict:
    out = {"audits": len(entries), "done": 0, "failed": 0, "used": 0, "not_detected": 0, "inconclusive": 0}
    for e in entries:
        out[e["status"]] += 1
        out[e["verdict"]] += 1
    return out


def _parquet(rows: list[dict], schema: dict[str, pa.DataType]) -> bytes:
    table = pa.table({k: pa.array([r.get(k) for r in rows], t) for k, t in schema.items()})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_results(batch: BatchResult) -> None:
    """``results.json``, ``results.parquet`` and ``images.parquet`` under ``batch.output``, as one set.

    Every file is built in memory first (a value that cannot be stored fails here, before anything
    is written), then written with :func:`cdi_ray.storage.atomic_write_set` — temp names, renamed
    into place only when all are written, the JSON last: its presence marks a complete set, and a
    failure leaves the previous set as it was, never a mix of old and new files.
    """
    images = [{"audit_id": a["audit_id"], **img} for a in batch.audits for img in a["unusable_images"]]
    text = json.dumps(batch.to_dict(), indent=2, sort_keys=False, allow_nan=False)
    storage.atomic_write_set({storage.join(batch.output, RESULTS_PARQUET): _parquet(batch.audits, ENTRY_COLUMNS),
                              storage.join(batch.output, IMAGES_PARQUET): _parquet(images, IMAGE_COLUMNS),
                              storage.join(batch.output, RESULTS_JSON): text.encode()})


def read_results(output: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(output, RESULTS_JSON)))


# ----------------------------------------------------------------------------------------------
# per-audit documents and HTML reports
# ----------------------------------------------------------------------------------------------
#: Packages whose versions go into every audit document (a re-run should use the same ones).
SOFTWARE = ("cdi-ray", "numpy", "scipy", "scikit-learn", "torch", "diffusers", "ray", "pyarrow", "pydantic", "pillow")


def software_versions() -> dict:
    """``{package: version}`` of :data:`SOFTWARE` (``None`` if not installed), plus Python and platform."""
    import platform
    from importlib import metadata

    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for name in SOFTWARE:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def audit_document(entry: dict, *, fdr: dict, report: dict | None, provenance: dict) -> dict:
    """The JSON a per-audit report is rendered from (``audits/<audit_id>.json``).

    Args:
        entry (`dict`): the audit's ``results.json`` entry, unchanged.
        fdr (`dict`): the batch's ``fdr`` section (method, q, n_tested).
        report (`dict` or `None`): :func:`cdi_ray.pipeline.payload.report_payload` (None: failed audit).
        provenance (`dict`): manifest entry, model, feature config, seed, software, run timings.
    """
    return {"schema": AUDIT_SCHEMA, "audit": entry, "fdr": fdr, "report": report, "provenance": provenance}


def write_reports(output: str, results: dict, documents: list[dict], diff: dict | None = None) -> list[str]:
    """``audits/<id>.json``, ``audits/<id>.html`` per document and ``index.html`` under ``output``.

    Returns the URIs written. The HTML is rendered by :mod:`cdi_ray.report`.
    """
    from cdi_ray.report import render_audit_html

    written = []
    for doc in documents:
        aid = doc["audit"]["audit_id"]
        base = storage.join(output, AUDITS_DIR, aid)
        storage.atomic_write_bytes(base + ".json", json.dumps(doc, indent=1, allow_nan=False).encode())
        storage.atomic_write_bytes(base + ".html", render_audit_html(doc).encode())
        written += [base + ".json", base + ".html"]
    return written + [write_index(output, results, diff)]


def write_index(output: str, results: dict, diff: dict | None = None) -> str:
    """``index.html`` under ``output`` (with the nightly diff view when ``diff`` is given); returns its URI."""
    from cdi_ray.report import render_index_html

    index = storage.join(output, INDEX_HTML)
    storage.atomic_write_bytes(index, render_index_html(results, diff=diff).encode())
    return index


# ----------------------------------------------------------------------------------------------
# nightly diff
# ----------------------------------------------------------------------------------------------
_TRACKED = ("status", "verdict", "p_value", "p_adjusted", "n_published", "n_unpublished")


def diff_results(previous: dict | None, current: dict) -> dict:
    """What changed since the previous night: new / removed audits, changed verdicts, new ``used``.

    ``new_used`` lists audits whose verdict is ``used`` now and was not ``used`` before (or that
    did not exist before) — the ones a person should look at first.
    """
    prev = {a["audit_id"]: a for a in (previous or {}).get("audits", [])}
    cur = {a["audit_id"]: a for a in current["audits"]}
    changed = []
    for aid, a in cur.items():
        b = prev.get(aid)
        if b is None:
            continue
        delta = {k: {"before": b.get(k), "after": a.get(k)} for k in _TRACKED if b.get(k) != a.get(k)}
        if delta:
            changed.append({"audit_id": aid, **delta})
    new_used = [
        {"audit_id": aid, "model": a["model"], "p_value": a["p_value"], "p_adjusted": a["p_adjusted"],
         "before": prev[aid]["verdict"] if aid in prev else None}
        for aid, a in cur.items()
        if a["verdict"] == "used" and (aid not in prev or prev[aid].get("verdict") != "used")
    ]
    return {
        "previous": (previous or {}).get("run", {}).get("output"),
        "current": current.get("run", {}).get("output"),
        "new_audits": sorted(set(cur) - set(prev)),
        "removed_audits": sorted(set(prev) - set(cur)),
        "changed": changed,
        "new_used": new_used,
    }


def diff_markdown(diff: dict) -> str:
    lines = ["# cdi-ray nightly diff", ""]
    lines.append(f"previous: {diff['previous'] or '(none)'}  ")
    lines.append(f"current: {diff['current']}")
    lines.append("")
    if diff["new_used"]:
        lines.append(f"## ⚠ NEW `used` verdicts ({len(diff['new_used'])})")
        lines.append("")
        for u in diff["new_used"]:
            lines.append(f"- **{u['audit_id']}** on `{u['model']}` — p={u['p_value']}, p_adj={u['p_adjusted']} "
                         f"(before: {u['before'] or 'new audit'})")
        lines.append("")
    else:
        lines += ["No new `used` verdicts.", ""]
    for title, key in (("New audits", "new_audits"), ("Removed audits", "removed_audits")):
        if diff[key]:
            lines += [f"## {title} ({len(diff[key])})", ""] + [f"- {a}" for a in diff[key]] + [""]
    if diff["changed"]:
        lines += [f"## Changed ({len(diff['changed'])})", ""]
        for c in diff["changed"]:
            parts = [f"{k}: {v['before']} → {v['after']}" for k, v in c.items() if k != "audit_id"]
            lines.append(f"- {c['audit_id']}: " + "; ".join(parts))
        lines.append("")
    return "\n".join(lines)

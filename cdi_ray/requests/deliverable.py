"""A deliverable per owner: ``<out>/requests/<request_id>/``.

::

    index.html                  the request's report: a verdict per model, the family rule, how to verify
    results.json                per model: verdict (after the family correction), p-values raw and adjusted, n, controls
    audits/<audit_id>.json|html each model's audit report (plots, controls, unusable images, provenance)
    evidence.json               models, fingerprints, feature configs, seeds, test options, versions, commands
    evidence-images.parquet     every listed image in test order: URI, content hash, store key, reason
    features/                   this request's feature-store rows (features, descriptors)
    request.jsonl registry.yaml this request alone, to reproduce it from the images

Nothing in the folder depends on or names another owner's request: the batch-level figures
(batch-wide BH, timings, the batch manifest's hash) stay in the operator's ledger and index.

Ray-free.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone

import yaml

from cdi_ray import storage
from cdi_ray.requests import evidence as ev
from cdi_ray.requests.expand import audit_id
from cdi_ray.requests.family import decide
from cdi_ray.requests.intake import Registry, Request

log = logging.getLogger(__name__)

REQUESTS_DIR, AUDITS_DIR = "requests", "audits"
RESULTS_FILE, EVIDENCE_FILE, PAGE_FILE = "results.json", "evidence.json", "index.html"
REQUEST_FILE, REGISTRY_FILE = "request.jsonl", "registry.yaml"
REQUEST_SCHEMA, EVIDENCE_SCHEMA, AUDIT_SCHEMA = "cdi-ray/request/v1", "cdi-ray/request-evidence/v1", "cdi-ray/audit/v1"
#: Provenance of the pipeline's audit documents that describes the whole batch, not the owner's audit.
BATCH_PROVENANCE = ("manifest_hash", "fdr")
BATCH_RUN_KEYS = ("output", "feature_store", "seconds", "timings", "max_permutations")


def folder_of(out: str, request_id: str) -> str:
    return storage.join(out, REQUESTS_DIR, request_id)


def request_verdict(labels: list[str]) -> str:
    """The answer to "was any of these models trained on my pictures?": ``used`` if any model's
    verdict is; else ``inconclusive`` if any is; else ``not_detected``."""
    if "used" in labels:
        return "used"
    return "inconclusive" if "inconclusive" in labels or not labels else "not_detected"


@dataclass
class RequestOutcome:
    """One request after the family correction."""

    request: Request
    state: str  #: ``done`` (every audit tested) or ``failed`` (with ``reason``)
    reason: str | None
    family: dict
    entries: list[dict]  #: per model, in the request's order: the results entry, corrected
    documents: list[dict] = field(default_factory=list)  #: per model: the audit report document

    @property
    def verdict(self) -> str:
        return request_verdict([e["verdict"] for e in self.entries])

    @property
    def used_models(self) -> list[str]:
        return [e["model"] for e in self.entries if e["verdict"] == "used"]


def family_of(request: Request, alpha: float, method: str = "holm", *, q: float | None = None,
              n_tested: int | None = None) -> dict:
    if method == "holm":
        return {"method": "holm", "alpha": alpha, "k": len(request.models), "models": list(request.models)}
    return {"method": "bh", "alpha": q, "k": len(request.models), "models": list(request.models), "n_tested": n_tested,
            "note": "batch-wide Benjamini–Hochberg (--family batch): this verdict depends on the other requests"}


def family_label(family: dict) -> str:
    if family["method"] == "bh":
        return " after Benjamini–Hochberg adjustment across every request of the batch"
    k = family["k"]
    return (" after Holm's adjustment across the {} models audited for this request".format(k) if k > 1
            else " (one model audited for this request: no adjustment needed)")


def decide_request(request: Request, records: dict, *, alpha: float, min_samples: int | None, family: dict,
                   adjusted: list[float | None] | None = None) -> RequestOutcome:
    """Correct a request's audits within its family (``records``: audit id → engine record).

    ``adjusted``: per model, p-values adjusted across the batch (``--family batch``); default Holm.
    """
    results, fired, problems = [], [], {}
    for m in request.models:
        record = records[audit_id(request.request_id, m)]
        entry = record.entry
        test = (record.document.get("report") or {}).get("test") if entry["status"] == "done" else None
        if entry["status"] == "done" and not test:
            problems[m] = "the test ran but its result could not be recorded (report payload failed)"
        results.append(ev.test_result_from_dict(test) if test and m not in problems else None)
        fired.append([c.get("reason") or c.get("name") or "a control" for c in entry.get("controls") or []
                      if c.get("fired")])
    decisions = decide(results, alpha=alpha, controls=fired, min_samples=[min_samples] * len(results),
                       adjusted=adjusted, family_label=family_label(family))
    entries = []
    for m, r, d in zip(request.models, results, decisions):
        entry = dict(records[audit_id(request.request_id, m)].entry)
        if r is None:
            error = problems.get(m) or entry.get("error") or "not run"
            entry.update(status="failed", error=error, verdict="inconclusive", p_adjusted=None, fdr_reject=False,
                         verdict_reason=f"The audit failed and was not tested: {error}")
        else:
            entry.update(verdict=d.verdict, verdict_reason=d.reason, p_adjusted=d.p_adjusted,
                         fdr_reject=d.p_adjusted is not None and d.p_adjusted <= family_level(family))
        entry["alpha"] = alpha
        entries.append(entry)
    failed = {e["model"]: e["error"] for e in entries if e["status"] != "done"}
    reason = "; ".join(f"{m}: {err}" for m, err in failed.items()) or None
    out = RequestOutcome(request, "failed" if failed else "done", reason, family, entries)
    for m, entry in zip(request.models, entries):
        doc = records[audit_id(request.request_id, m)].document
        fdr = {"method": family["method"], "q": family_level(family),
               "n_tested": family["k"] if family["method"] == "holm" else family.get("n_tested")}
        out.documents.append({"schema": AUDIT_SCHEMA, "audit": entry, "fdr": fdr, "report": doc.get("report"),
                              "provenance": owner_provenance(doc.get("provenance") or {})})
    return out


def family_level(family: dict) -> float:
    return float(family["alpha"])


def owner_provenance(provenance: dict) -> dict:
    """The pipeline's provenance without what describes the whole batch (other owners' audits)."""
    out = {k: v for k, v in provenance.items() if k not in BATCH_PROVENANCE}
    if "run" in out:
        out["run"] = {k: v for k, v in (out["run"] or {}).items() if k not in BATCH_RUN_KEYS}
    return out


# ----------------------------------------------------------------------------------------------
# the evidence manifest
# ----------------------------------------------------------------------------------------------
def _config_hash(cfg: dict | None) -> str | None:
    if not cfg:
        return None
    try:
        from cdi_ray.features.config import FeatureConfig

        return FeatureConfig(**cfg).config_hash()
    except Exception as exc:  # noqa: BLE001 — the store key still identifies the partition
        log.warning("cannot recompute a feature-config hash: %s", exc)
        return None


def evidence_manifest(outcome: RequestOutcome, records: dict, tests: dict, registry: Registry, *, inputs_hash: str,
                      feature_store: str, software: dict) -> tuple[dict, list[dict]]:
    """``(evidence.json, evidence-images rows)`` of one request (``tests``: audit id → (its test, its
    reference run), :class:`~cdi_ray.requests.evidence.TestRecord` or None; ``software``: package versions)."""
    from cdi_ray import __version__

    r = outcome.request
    audits, images = [], []
    for m, entry in zip(r.models, outcome.entries):
        rec = records[audit_id(r.request_id, m)]
        own, reference = tests.get(rec.audit_id, (None, None))
        prov = rec.document.get("provenance") or {}
        item = {"model": m, "audit_id": rec.audit_id, "status": entry["status"], "model_uri": registry.models[m]["uri"],
                "model_fingerprint": entry.get("model_fingerprint"), "feature_key": entry.get("feature_key"),
                "feature_config": prov.get("feature_config"), "feature_config_hash": _config_hash(prov.get("feature_config")),
                "seed": entry.get("seed"), "min_samples": (registry.defaults.get("test") or {}).get("min_samples"),
                "controls": prov.get("controls"), "conditioning": prov.get("conditioning"),
                "collections": (rec.document.get("report") or {}).get("collections"),
                "test": ev.record_to_dict(own) if own else None,
                "reference": ev.record_to_dict(reference) if reference else None}
        audits.append(item)
        for t in (own, reference):
            if t is not None:
                images += ev.image_rows(t)
    command = (f"python jobs/requests.py {REQUEST_FILE} --models {REGISTRY_FILE} --out OUT"
               + (" --family batch" if outcome.family["method"] == "bh" else ""))
    doc = {"schema": EVIDENCE_SCHEMA, "request": {**r.as_row(), "contact": r.contact}, "family": outcome.family,
           "inputs_hash": inputs_hash, "cdi_ray_version": __version__, "software": software,
           "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "reproduce": {"verify": "cdi-ray verify .",
                         "from_images": f"{command}   (run in this folder; the same p-values and verdicts come back"
                                        f"{' only for the same batch' if outcome.family['method'] == 'bh' else ''})"},
           "source_feature_store": feature_store, "features": ev.FEATURES_DIR, "audits": audits}
    return doc, images


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def results_document(outcome: RequestOutcome, *, inputs_hash: str) -> dict:
    from cdi_ray import __version__

    r = outcome.request
    return {"schema": REQUEST_SCHEMA, "request_id": r.request_id, "owner": r.owner, "contact": r.contact,
            "state": outcome.state, "reason": outcome.reason, "verdict": outcome.verdict,
            "used_models": outcome.used_models, "family": outcome.family, "audits": outcome.entries,
            "inputs_hash": inputs_hash, "cdi_ray_version": __version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _put(uri: str, data: bytes) -> None:
    storage.atomic_write_bytes(uri, data)


def _json(obj) -> bytes:
    return json.dumps(obj, indent=1, allow_nan=False, default=str).encode()


def write_deliverable(out: str, outcome: RequestOutcome, records: dict, tests: dict, registry: Registry, *,
                      inputs_hash: str, feature_store: str, software: dict) -> str:
    """Everything of one request but its feature rows (:func:`cdi_ray.requests.evidence.copy_rows`);
    ``results.json`` goes last — its presence marks a complete deliverable. Returns the folder.

    ``software``: :func:`cdi_ray.pipeline.results.software_versions` (read once per run: it parses
    every package's metadata)."""
    from cdi_ray.report import render_audit_html
    from cdi_ray.requests.page import render_request_html

    folder = folder_of(out, outcome.request.request_id)
    evidence, images = evidence_manifest(outcome, records, tests, registry, inputs_hash=inputs_hash,
                                         feature_store=feature_store, software=software)
    table = ev.images_parquet(images)
    evidence["files"] = {ev.IMAGES_FILE: hashlib.sha256(table).hexdigest()}
    _put(storage.join(folder, ev.IMAGES_FILE), table)
    _put(storage.join(folder, EVIDENCE_FILE), _json(evidence))
    r = outcome.request
    _put(storage.join(folder, REQUEST_FILE), (json.dumps(r.as_row()) + "\n").encode())
    _put(storage.join(folder, REGISTRY_FILE), yaml.safe_dump(
        {"models": registry.models_for(r.models), "defaults": registry.defaults}, sort_keys=False).encode())
    for doc in outcome.documents:
        base = storage.join(folder, AUDITS_DIR, doc["audit"]["audit_id"])
        _put(base + ".json", _json(doc))
        try:
            _put(base + ".html", render_audit_html(doc).encode())
        except Exception as exc:  # noqa: BLE001 — a page that cannot be drawn never loses the results
            log.error("request %s: audit page failed: %s", r.request_id, exc)
    results = results_document(outcome, inputs_hash=inputs_hash)
    try:
        _put(storage.join(folder, PAGE_FILE), render_request_html(results, evidence).encode())
    except Exception as exc:  # noqa: BLE001
        log.error("request %s: request page failed: %s", r.request_id, exc)
    _put(storage.join(folder, RESULTS_FILE), _json(results))
    return folder


def read_json(folder: str, name: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(folder, name)))

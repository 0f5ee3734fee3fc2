"""``cdi-ray verify <request dir>``: re-run an owner's tests from the stored features and compare.

From the folder alone — ``evidence.json`` (models, feature partitions, test options, seeds),
``evidence-images.parquet`` (every image in the order the test saw it) and ``features/`` (the
request's feature-store rows) — each audit's test and controls are run again through the same
code the pipeline's aggregate stage runs (:class:`cdi_ray.pipeline.aggregate.AuditAggregator`),
the family correction is applied again, and every number that decides a verdict is compared with
``results.json``: status, n_P and n_U, the p-value, the direction, each control's decision and
p-value, the adjusted p-value, the verdict and its reason. Equality is exact: the test is
deterministic given its inputs. Anything that differs is named.

With ``--family batch`` the adjusted p-values depend on the whole batch, which the folder does
not hold: they are taken from ``results.json`` and everything else is recomputed.

``--feature-store URI`` re-runs against another store (e.g. the batch's) instead of the
folder's copy; ``--images`` also re-reads every image and compares its content hash.

Ray-free (BLAS limited to one thread, as in the pipeline's workers).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from cdi_ray import storage
from cdi_ray.requests import evidence as ev
from cdi_ray.requests.deliverable import EVIDENCE_FILE, RESULTS_FILE, family_label, read_json

#: Fields of a results entry that a verdict rests on, compared exactly.
COMPARED = ("status", "n_published", "n_unpublished", "p_value", "direction", "p_adjusted", "verdict", "verdict_reason")


@dataclass(frozen=True)
class Difference:
    """One value that the stored results and the recomputation disagree on."""

    where: str  #: an audit id, or a file of the folder
    field: str
    stored: Any
    recomputed: Any

    def __str__(self) -> str:
        return f"{self.where}: {self.field} — stored {self.stored!r}, recomputed {self.recomputed!r}"


@dataclass
class Verification:
    """The outcome of :func:`verify_request`."""

    folder: str
    request_id: str | None
    audits_checked: int = 0
    images_checked: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return not self.differences


def _limited_blas():
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def rerun(record, store_root: str):
    """One recorded test (:class:`~cdi_ray.requests.evidence.TestRecord`) through the aggregate
    stage's code, on ``store_root``; its outcome."""
    from cdi_ray.pipeline.aggregator import AuditAggregator

    with _limited_blas():
        return AuditAggregator().run_group(store_root, record.fingerprint, record.feature_key,
                                           list(record.columns), [record.job])[0]


def recompute(evidence: dict, images: list[dict], store_root: str) -> list[dict]:
    """Per audit of the evidence: ``{"outcome", "controls"}`` re-run from ``store_root``
    (``outcome`` None for an audit that was never tested)."""
    from cdi_ray.controls.reference import reference_control

    out = []
    for a in evidence["audits"]:
        if not a.get("test"):
            out.append({"outcome": None, "controls": []})
            continue
        mine = [r for r in images if r["audit_id"] == a["audit_id"]]
        outcome = rerun(ev.record_from_dict(a["test"], [r for r in mine if r["role"] == ev.MAIN]), store_root)
        controls = list(outcome.controls)
        if outcome.status == "done" and a.get("reference"):
            ctl = a.get("controls") or {}
            shadow = rerun(ev.record_from_dict(a["reference"], [r for r in mine if r["role"] == ev.REFERENCE]),
                           store_root)
            ok = shadow.status == "done"
            controls.append(reference_control(shadow.result if ok else None, reference=ctl.get("reference_model"),
                                              alpha=ctl.get("alpha", 0.05), error=None if ok else shadow.error))
        out.append({"outcome": outcome, "controls": controls})
    return out


def verify_request(folder: str, *, feature_store: str | None = None, check_images: bool = False) -> Verification:
    """Recompute a request's tests and verdicts from its folder and compare them with ``results.json``.

    Raises:
        FileNotFoundError: the folder holds no deliverable (no results.json / evidence.json).
    """
    from cdi_ray.requests.family import decide

    folder = folder if storage.is_remote(folder) else storage.normalize(folder)
    for name in (RESULTS_FILE, EVIDENCE_FILE):
        if not storage.exists(storage.join(folder, name)):
            raise FileNotFoundError(f"{folder} holds no request deliverable (no {name}) — give a "
                                    f"<out>/requests/<request_id> folder written by jobs/requests.py")
    results, evidence = read_json(folder, RESULTS_FILE), read_json(folder, EVIDENCE_FILE)
    v = Verification(folder, results.get("request_id"))
    diff = v.differences.append
    data = storage.read_bytes(storage.join(folder, ev.IMAGES_FILE))
    expected = (evidence.get("files") or {}).get(ev.IMAGES_FILE)
    if hashlib.sha256(data).hexdigest() != expected:
        diff(Difference(ev.IMAGES_FILE, "sha256", expected, hashlib.sha256(data).hexdigest()))
    for key in ("request_id", "owner"):
        if results.get(key) != evidence["request"].get(key):
            diff(Difference(EVIDENCE_FILE, key, results.get(key), evidence["request"].get(key)))
    if results.get("inputs_hash") != evidence.get("inputs_hash"):
        diff(Difference(EVIDENCE_FILE, "inputs_hash", results.get("inputs_hash"), evidence.get("inputs_hash")))
    images = ev.read_images(folder)
    store_root = feature_store or storage.join(folder, ev.FEATURES_DIR)
    redo = recompute(evidence, images, store_root)

    family = results.get("family") or evidence.get("family") or {}
    stored = {e["audit_id"]: e for e in results.get("audits") or []}
    entries = [stored.get(a["audit_id"], {}) for a in evidence["audits"]]
    tested = [r["outcome"].result if r["outcome"] is not None and r["outcome"].status == "done" else None for r in redo]
    fired = [[c.reason for c in r["controls"] if c.fired] for r in redo]
    adjusted = None if family.get("method") == "holm" else [e.get("p_adjusted") for e in entries]
    decisions = decide(tested, alpha=float(family.get("alpha", 0.01)), controls=fired,
                       min_samples=[a.get("min_samples") for a in evidence["audits"]], adjusted=adjusted,
                       family_label=family_label(family) if family.get("k") else "")
    for a, entry, r, res, d in zip(evidence["audits"], entries, redo, tested, decisions):
        aid = a["audit_id"]
        if not entry:
            diff(Difference(RESULTS_FILE, "audits", None, aid))
            continue
        v.audits_checked += 1
        o = r["outcome"]
        now = {"status": "done" if res is not None else "failed", "n_published": o.n_published if o else entry.get("n_published"),
               "n_unpublished": o.n_unpublished if o else entry.get("n_unpublished"),
               "p_value": float(res.pvalue) if res is not None else None,
               "direction": res.direction if res is not None else None,
               "p_adjusted": d.p_adjusted if res is not None else None, "verdict": d.verdict,
               "verdict_reason": d.reason if res is not None else entry.get("verdict_reason")}
        for k in COMPARED:
            if entry.get(k) != now[k]:
                diff(Difference(aid, k, entry.get(k), now[k]))
        was = {c["name"]: c for c in entry.get("controls") or []}
        for c in r["controls"]:
            s = was.pop(c.name, None)
            if s is None:
                diff(Difference(aid, f"control {c.name}", None, "run"))
            elif (s.get("fired"), s.get("pvalue")) != (c.fired, c.pvalue):
                diff(Difference(aid, f"control {c.name}", {"fired": s.get("fired"), "pvalue": s.get("pvalue")},
                                {"fired": c.fired, "pvalue": c.pvalue}))
        for name in was:
            diff(Difference(aid, f"control {name}", "run", None))
    if check_images:
        v.images_checked = _check_images(images, diff)
    return v


def _check_images(images: list[dict], diff) -> int:
    """Re-read each image of the evidence and compare its content hash (shard members included)."""
    from cdi_ray.images import content_hash
    from cdi_ray.sources import read_images

    rows = {r["uri"]: r for r in images if r["content_hash"] and r["role"] == ev.MAIN}
    uris = sorted(rows)
    plain = [u for u in uris if "#" not in u]
    got = dict(zip(plain, read_images(plain, [""] * len(plain)))) if plain else {}
    for u in uris:
        if u not in got:  # a shard member: its bytes are checked through the shard it came from
            continue
        data = got[u]
        now = f"unreadable: {data}" if isinstance(data, BaseException) else content_hash(data)
        if now != rows[u]["content_hash"]:
            diff(Difference(u, "content_hash", rows[u]["content_hash"], now))
    return len(got)

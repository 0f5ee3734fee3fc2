"""Standing audits: each night's look of the life-long rule, and its state stored with the night.

A nightly run (:func:`cdi_ray.pipeline.nightly.run_nightly`) decides a standing audit's ``used``
with :func:`cdi_ray.stats.sequential.next_look`, so that the chance an innocent audit *ever* says
``used`` stays ≤ its α however many nights it runs (docs/VERDICTS.md §5). The rule needs what was
tested on earlier nights; that state is one JSON file per audit next to the night's results::

    <root>/<YYYY-MM-DD>/sequential/<audit_id>.json

Each night reads the file of the latest *complete* earlier night (one with ``results.json``) that
has one, and writes tonight's — changed after a look, otherwise the same statistical state with
the night counted. A night that crashes before its ``results.json`` is not complete, so its states
are never read: re-running it starts again from the night before and takes the same look. An
audit that fails tonight has its state carried forward unchanged. A state that cannot be read
fails its audit with the reason — it never silently restarts the audit (that would spend its α
again).

The first look waits until both collections hold the audit's ``min_samples`` images (below that
the verdict is inconclusive anyway). The life-long level is the audit's ``test.alpha``; the
batch's FDR adjustment is still reported but does not decide a standing audit's verdict.
Ray-free: the aggregator calls :func:`take_look` where the feature matrices already are.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from cdi_ray import storage

log = logging.getLogger(__name__)

STATE_DIR = "sequential"
NIGHT_STATE_SCHEMA = "cdi-ray/nightly-state/1"


@dataclass(frozen=True)
class StandingAudit:
    """What the aggregator needs to take tonight's look for one audit.

    ``design`` is a :class:`cdi_ray.stats.SequentialDesign` built from the audit's test; it is
    checked against the stored one, so an audit keeps its design for life.
    """

    audit_id: str
    date: str
    state_uri: str
    previous_uri: str | None
    alpha: float
    seed: int
    design: object
    min_samples: int
    fingerprint: str | None = None
    feature_key: str | None = None


@dataclass(frozen=True)
class NightlyLook:
    """Tonight's life-long decision of one audit, as the results entry's ``sequential`` section shows it."""

    look: object  # cdi_ray.stats.sequential.LookResult, or None before the first look
    night: int
    date: str
    first_night: str
    state_uri: str
    first_look_on: str | None = None
    used_on: str | None = None
    waiting: str | None = None

    def to_dict(self) -> dict:
        lk = self.look
        alpha = lk.alpha if lk is not None else None
        spent = lk.alpha_spent if lk is not None else 0.0
        return {
            "night": self.night, "date": self.date, "first_night": self.first_night,
            "look": lk.look if lk is not None else 0, "took_look": bool(lk is not None and lk.took_look),
            "first_look_on": self.first_look_on,
            "alpha": alpha, "alpha_spent": spent, "alpha_remaining": None if alpha is None else alpha - spent,
            "level": lk.level if lk is not None and lk.look else None,
            "nominal_pvalue": lk.nominal_pvalue if lk is not None else None,
            "may_say_used": bool(lk is not None and lk.may_say_used),
            "used_on_look": lk.used_on_look if lk is not None else None, "used_on": self.used_on,
            "reason": self.waiting or (lk.reason if lk is not None else None),
            "state": self.state_uri,
        }


def state_uri(night_dir: str, audit_id: str) -> str:
    return storage.join(night_dir, STATE_DIR, f"{audit_id}.json")


def previous_states(root: str, date: str, audit_ids, complete) -> dict[str, str]:
    """``audit_id → state URI`` of the latest complete night before ``date`` holding the audit's state.

    ``complete(night_dir)`` says whether a night finished (its ``results.json`` exists). Nights are
    listed newest first and each night's state folder once, until every audit is found.
    """
    wanted, found = set(audit_ids), {}
    nights = sorted((n for n in storage.list_subdirs(root) if n < date), reverse=True)
    for name in nights:
        if not wanted:
            break
        night = storage.join(root, name)
        if not complete(night):
            continue
        try:
            names = {storage.basename(e.uri) for e in storage.iter_files(storage.join(night, STATE_DIR))}
        except FileNotFoundError:
            continue
        for aid in sorted(wanted):
            if f"{aid}.json" in names:
                found[aid] = state_uri(night, aid)
        wanted -= set(found)
    return found


def standing_audits(manifest, root: str, date: str, night_dir: str, complete) -> dict[str, StandingAudit]:
    """One :class:`StandingAudit` per audit with a calibrated procedure (an uncalibrated one can never
    say ``used``, so it needs no life-long rule)."""
    from cdi_ray.stats import MIN_SAMPLES, PROCEDURES
    from cdi_ray.stats.sequential import SequentialDesign

    audits = [a for a in manifest.audits if PROCEDURES[a.test.procedure].calibrated]
    previous = previous_states(root, date, [a.id for a in audits], complete)
    return {a.id: StandingAudit(a.id, date, state_uri(night_dir, a.id), previous.get(a.id), float(a.test.alpha),
                                int(a.seed), SequentialDesign(procedure=a.test.procedure, options=dict(a.test.options)),
                                int(a.test.min_samples or MIN_SAMPLES))
            for a in audits}


def _read(uri: str) -> dict:
    try:
        doc = json.loads(storage.read_bytes(uri))
    except Exception as exc:  # noqa: BLE001 — named, never a silent restart
        raise ValueError(f"cannot read the audit's life-long state {uri} ({type(exc).__name__}: {exc}); restore the "
                         f"file (a standing audit must not start over: its α would be spent again)") from None
    if doc.get("schema") != NIGHT_STATE_SCHEMA:
        raise ValueError(f"{uri} is not a nightly state (schema {doc.get('schema')!r}, expected {NIGHT_STATE_SCHEMA!r})")
    return doc


def _check_model(doc: dict, sa: StandingAudit, uri: str) -> None:
    for name, stored, now in (("model fingerprint", doc.get("model_fingerprint"), sa.fingerprint),
                              ("feature config", doc.get("feature_key"), sa.feature_key)):
        if stored != now:
            raise ValueError(f"the {name} changed since the audit's first night ({stored} → {now}, state {uri}); a "
                             f"standing audit tests one model with one feature config for life — give the audit a "
                             f"new id to start a new one")


def _label_of(state, look: int | None) -> str | None:
    return state.looks[look - 1].label if state is not None and look else None


def take_look(sa: StandingAudit, P, U, published_keys, unpublished_keys) -> NightlyLook:
    """Tonight's look for ``sa`` on the whole current collections (rows keyed by content hash);
    writes tonight's state file (atomically) and returns the decision."""
    from cdi_ray.stats.sequential import SequentialState, next_look

    doc = _read(sa.previous_uri) if sa.previous_uri else None
    if doc is not None:
        _check_model(doc, sa, sa.previous_uri)
    state = SequentialState.from_json(json.dumps(doc["state"])) if doc and doc.get("state") else None
    waiting = None
    if min(len(P), len(U)) >= sa.min_samples:
        look, state = next_look(state, P, U, alpha=sa.alpha, seed=sa.seed, design=sa.design,
                                published_keys=published_keys, unpublished_keys=unpublished_keys, label=sa.date)
    else:
        look = None
        if state is not None:  # collections shrank below the minimum: hold the decision, take no look
            look, state = next_look(state, P[:0], U[:0], alpha=sa.alpha, seed=sa.seed, design=sa.design,
                                    published_keys=[], unpublished_keys=[], label=sa.date)
        waiting = (f"No look tonight: {len(P)} published and {len(U)} unpublished images; a look needs "
                   f"{sa.min_samples} of each (the test's min_samples). Nothing of α was spent tonight.")
    first_night = doc["first_night"] if doc else sa.date
    night = (int(doc["nights"]) if doc else 0) + 1
    out = {"schema": NIGHT_STATE_SCHEMA, "audit_id": sa.audit_id, "model_fingerprint": sa.fingerprint,
           "feature_key": sa.feature_key, "first_night": first_night, "last_night": sa.date, "nights": night,
           "state": json.loads(state.to_json()) if state is not None else None}
    storage.atomic_write_bytes(sa.state_uri, json.dumps(out, sort_keys=True, allow_nan=False).encode())
    return NightlyLook(look, night, sa.date, first_night, sa.state_uri,
                       first_look_on=_label_of(state, 1 if look is not None and look.look else None),
                       used_on=_label_of(state, look.used_on_look if look is not None else None), waiting=waiting)


def carry_forward(standing: dict[str, StandingAudit], tested: set[str]) -> None:
    """Copy the previous state of every standing audit not tested tonight (it failed) into tonight's
    folder, unchanged, so the next night finds it in the night before."""
    for aid, sa in standing.items():
        if aid in tested or not sa.previous_uri:
            continue
        try:
            if not storage.exists(sa.state_uri):
                storage.atomic_write_bytes(sa.state_uri, storage.read_bytes(sa.previous_uri))
        except Exception as exc:  # noqa: BLE001 — the next night then reads it from the older night itself
            log.warning("audit %s: could not carry its state forward (%s); the next night reads %s", aid, exc,
                        sa.previous_uri)


"""Accepted requests → the audits they mean: one per (request, model), as a validated manifest.

Audit ids are ``<request_id>__<model>`` (request ids cannot contain ``__``, so the split is
unambiguous). Every audit runs at its owner's family level with the permutation cap the
family needs (:func:`cdi_ray.requests.family.family_test`), and the manifest uses
``fdr: none`` — the correction is per owner, after the run.

Ray-free.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cdi_ray.requests.family import family_test
from cdi_ray.requests.intake import SEPARATOR, Registry, Request


def audit_id(request_id: str, model: str) -> str:
    return f"{request_id}{SEPARATOR}{model}"


def split_audit_id(aid: str) -> tuple[str, str]:
    """``(request_id, model)`` of an audit id made by :func:`audit_id`."""
    rid, model = aid.split(SEPARATOR, 1)
    return rid, model


def inputs_hash(request: Request, registry: Registry, family: str) -> str:
    """What a request's results depend on: its row (not its contact), its models' registry entries,
    the audit defaults and the family rule. A re-run recomputes a done request only if this changes."""
    payload = {"request": {"request_id": request.request_id, "owner": request.owner, "published": request.published,
                           "unpublished": request.unpublished, "models": list(request.models)},
               "models": registry.models_for(request.models), "defaults": registry.defaults,
               "family": family}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Expansion:
    """The manifest of a set of requests, and per audit warnings about its family level."""

    manifest: object  # cdi_ray.spec.Manifest
    warnings: dict[str, str]


def expand(requests: list[Request], registry: Registry, *, output: str, feature_store: str,
           batch_cap: int | None = None) -> Expansion:
    """The manifest of ``requests`` (each request × each of its models).

    ``batch_cap``: the permutation cap of ``--family batch`` (BH over the whole batch needs a
    finer p-value floor than a request's own family); default: each request's own.
    """
    from cdi_ray.spec import parse_manifest

    alpha = registry.alpha
    audits, warnings = [], {}
    tests: dict[int, tuple[dict, str | None]] = {}  # k → (test spec, warning): the same for every request of k models
    for r in requests:
        k = len(r.models)
        if k not in tests:
            tests[k] = family_test(registry.defaults.get("test") or {}, k, alpha, cap=batch_cap)
        test, warning = tests[k]
        for m in r.models:
            aid = audit_id(r.request_id, m)
            audits.append({**registry.defaults, "id": aid, "model": m, "published": r.published,
                           "unpublished": r.unpublished, "test": {**test, "alpha": alpha}})
            if warning:
                warnings[aid] = warning
    used = sorted({m for r in requests for m in r.models})
    data = {"models": registry.models_for(used), "audits": audits, "output": output,
            "feature_store": feature_store, "fdr": {"method": "none"}}
    return Expansion(parse_manifest(data), warnings)

"""The owner is the family: each request's verdicts are corrected within the request, never across owners.

An owner asks "was any of these k models trained on my pictures?". The k tests of one request
form the family: Holm's step-down procedure keeps the chance of *any* false ``used`` among them
at or below α (family-wise error, valid under any dependence — the k tests share the same P and
U images, so their p-values are dependent). Nothing in an owner's decision depends on another
owner's request: the p-values are computed with a permutation cap that depends only on (k, α)
(:func:`family_max_permutations`), and the adjustment looks at this request's k p-values only.
So an owner's verdict is the same whether the batch holds 1 or 10,000 other requests.

Batch-wide Benjamini–Hochberg over every (request, model) test remains an operator's figure
(:func:`batch_bh`) and an option (``--family batch``), in which case verdicts do depend on the batch.

Why Holm and not Hochberg / Hommel: they are more powerful only under positive dependence
assumptions (PRDS) that two models' tests on the same images need not satisfy; Holm needs none
and is uniformly more powerful than Bonferroni. A failed or untested audit counts in k with
p = 1, so the family is the set of models the owner asked about, fixed before any result is seen.

Ray-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: Owner-family correction (default) or batch-wide BH (the operator's option).
FAMILIES = ("owner", "batch")
#: The permutation cap is never raised beyond this (as for a batch's FDR in the pipeline).
MAX_PERMUTATIONS = 200_000
#: A verdict reason the statistics layer words for a batch; in a request the family is its models.
BATCH_PHRASE = " after adjusting for the batch of audits"


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values; ``None`` (a test that produced no p-value) counts in the
    family as p = 1 and gets ``None`` back.

    The i-th smallest of k: max_{j ≤ i} min(1, (k − j + 1)·p_(j)); reject where adjusted ≤ α.
    Same values as R's ``p.adjust(method="holm")``.
    """
    p = np.array([1.0 if v is None else float(v) for v in pvalues], dtype=np.float64)
    if np.any((p < 0) | (p > 1) | ~np.isfinite(p)):
        raise ValueError(f"p-values must lie in [0, 1]; got {list(pvalues)}")
    k = len(p)
    adjusted = np.empty(k)
    if k:
        order = np.argsort(p, kind="stable")
        stepped = np.maximum.accumulate(np.minimum(1.0, (k - np.arange(k)) * p[order]))
        adjusted[order] = stepped
    return [None if v is None else float(a) for v, a in zip(pvalues, adjusted)]


def batch_bh(pvalues: Sequence[float | None], q: float) -> list[float | None]:
    """Benjamini–Hochberg adjusted p-values over the whole batch (``None``: not tested, excluded)."""
    from cdi_ray.stats import benjamini_hochberg

    res = benjamini_hochberg([float("nan") if p is None else p for p in pvalues], q)
    return [None if (v is None or not math.isfinite(a)) else float(a) for v, a in zip(pvalues, res.adjusted)]


def family_max_permutations(k: int, alpha: float) -> int:
    """The permutation cap that lets Holm reject at its smallest threshold α/k.

    A Monte Carlo permutation p-value never goes below 1/(B+1), so B + 1 must reach k/α; twice
    that leaves room for a few exceedances (the same rule as the pipeline's batch cap).
    """
    if k < 1 or not 0 < alpha < 1:
        raise ValueError(f"need k ≥ 1 and 0 < alpha < 1; got k={k}, alpha={alpha}")
    return int(min(MAX_PERMUTATIONS, 2 * math.ceil(k / alpha)))


def default_cap(procedure: str, options: dict) -> int | None:
    """The permutation cap ``procedure`` uses with ``options`` when none is given (None: it has no
    cap — an analytic procedure). Read from a tiny test run, so a change of the default scorer or
    cap in :mod:`cdi_ray.stats` is followed without a copy of its defaults here."""
    from cdi_ray.stats import PROCEDURES, run_test

    if "max_permutations" not in PROCEDURES[procedure].defaults:
        return None
    rng = np.random.default_rng(0)
    probe = run_test(rng.normal(size=(12, 2)), rng.normal(size=(12, 2)), procedure=procedure, **options)
    return int(probe.options["max_permutations"])


def family_test(test: dict, k: int, alpha: float, *, cap: int | None = None) -> tuple[dict, str | None]:
    """An audit's ``test`` spec with the permutation cap the family needs, and a warning if it
    cannot be met.

    The cap is raised only where the audit left ``max_permutations`` unset and the procedure's own
    default is too small for ``k`` tests at ``alpha`` (or to ``cap``, the batch-wide need in
    ``--family batch``). An explicit cap too small for the family is kept (it can only cost power:
    the smallest p-value cannot reach the threshold) and reported.
    """
    from cdi_ray.stats import DEFAULT_PROCEDURE

    test = dict(test or {})
    procedure = test.get("procedure", DEFAULT_PROCEDURE)
    options = dict(test.get("options") or {})
    need = cap or family_max_permutations(k, alpha)
    own = options.get("max_permutations") or default_cap(procedure, options)
    if own is None:
        return test, None
    if "max_permutations" in options:
        if (int(options["max_permutations"]) + 1) * alpha < k:
            return test, (f"max_permutations {options['max_permutations']} cannot resolve Holm's smallest threshold "
                          f"{alpha:g}/{k}; raise it to {need} or leave it unset")
        return test, None
    if own < need:
        options["max_permutations"] = need
        test["options"] = options
    return test, None


@dataclass(frozen=True)
class FamilyDecision:
    """One audit of a request after the family correction."""

    p_adjusted: float | None
    verdict: str
    reason: str


def decide(results: Sequence, *, alpha: float, controls: Sequence[Sequence[str]], min_samples: Sequence[int | None],
           adjusted: Sequence[float | None] | None = None, family_label: str = "") -> list[FamilyDecision]:
    """Verdicts of one request's audits (``results[i]``: a ``TestResult`` or None for a failed audit).

    Args:
        alpha: the family's level.
        controls: per audit, the reasons of the controls that fired.
        min_samples: per audit, the smallest |P| and |U| for a finding (None: the default).
        adjusted: p-values adjusted elsewhere (``--family batch``); default: Holm within this request.
        family_label: how the reason names the family (replaces the statistics layer's "batch").

    Every verdict comes from :func:`cdi_ray.stats.verdict` — the one place verdicts are decided.
    """
    from cdi_ray.stats import MIN_SAMPLES, verdict

    pvalues = [None if r is None else float(r.pvalue) for r in results]
    adjusted = holm(pvalues) if adjusted is None else list(adjusted)
    out = []
    for r, p_adj, fired, n_min in zip(results, adjusted, controls, min_samples):
        if r is None:
            out.append(FamilyDecision(None, "inconclusive", ""))
            continue
        v = verdict(r, alpha=alpha, p_adjusted=1.0 if p_adj is None else p_adj, controls=tuple(fired),
                    min_samples=MIN_SAMPLES if n_min is None else n_min)
        reason = v.reason.replace(BATCH_PHRASE, family_label) if family_label else v.reason
        out.append(FamilyDecision(p_adj, v.label, reason))
    return out

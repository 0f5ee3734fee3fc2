"""Many audits at once: false-discovery-rate and family-wise control over a batch of p-values.

Failed audits: pass ``NaN`` for an audit that produced no p-value. It is excluded — not
counted in m, never rejected, adjusted value NaN. (Counting it as p=1 would be the
conservative alternative; excluding it is what "that audit was not run" means, and the batch
report must list failed audits separately.)

Dependence: Benjamini–Hochberg controls the FDR for independent or positively dependent
(PRDS) p-values. Audits that share one unpublished set U are dependent; under the null their
one-sided p-values are typically positively dependent, but that is not guaranteed. Where that
matters, use :func:`benjamini_yekutieli` (valid under any dependence, costs a factor
Σ 1/i ≈ ln m + 0.58) or :func:`bonferroni` (family-wise error).
"""
from __future__ import annotations

import numpy as np

from .results import FDRResult

__all__ = ["benjamini_hochberg", "benjamini_yekutieli", "bonferroni"]


def _check(pvalues, level, level_name) -> np.ndarray:
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pvalues must be 1-D (one p-value per audit); got shape {p.shape}")
    ok = np.isnan(p) | ((p >= 0) & (p <= 1))
    if not ok.all():
        bad = np.flatnonzero(~ok)
        raise ValueError(f"pvalues must lie in [0, 1] or be NaN for a failed audit; entries {bad[:5].tolist()} "
                         f"are {p[bad[:5]].tolist()}")
    if not (0 < float(level) < 1):
        raise ValueError(f"{level_name} must be in (0, 1); got {level!r}")
    return p


def _step_up(p: np.ndarray, level: float, method: str, factor: float) -> FDRResult:
    valid = ~np.isnan(p)
    m = int(valid.sum())
    adjusted = np.full(p.shape, np.nan)
    if m:
        pv = p[valid]
        order = np.argsort(pv, kind="stable")
        ranked = pv[order] * m * factor / np.arange(1, m + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]  # step-up: min over j ≥ i
        adj = np.empty(m)
        adj[order] = np.minimum(ranked, 1.0)
        adjusted[valid] = adj
    reject = np.where(valid, np.nan_to_num(adjusted, nan=np.inf) <= level, False)
    return FDRResult(method=method, level=float(level), pvalues=p, adjusted=adjusted, reject=reject, n_tested=m)


def benjamini_hochberg(pvalues, q: float = 0.05) -> FDRResult:
    """Benjamini–Hochberg step-up at FDR level ``q``.

    Adjusted p-value of the i-th smallest of m: min_{j ≥ i} min(1, m·p_(j)/j)
    (same values as R's ``p.adjust(method="BH")`` and statsmodels' ``fdr_bh``).
    Reject where adjusted ≤ q.
    """
    p = _check(pvalues, q, "q")
    return _step_up(p, q, "benjamini-hochberg", 1.0)


def benjamini_yekutieli(pvalues, q: float = 0.05) -> FDRResult:
    """Benjamini–Yekutieli: BH with m replaced by m·Σ_{i≤m} 1/i — FDR ≤ q under any dependence."""
    p = _check(pvalues, q, "q")
    m = int((~np.isnan(p)).sum())
    c = float(np.sum(1.0 / np.arange(1, m + 1))) if m else 1.0
    return _step_up(p, q, "benjamini-yekutieli", c)


def bonferroni(pvalues, alpha: float = 0.05) -> FDRResult:
    """Bonferroni: adjusted = min(1, m·p); family-wise error ≤ α under any dependence."""
    p = _check(pvalues, alpha, "alpha")
    valid = ~np.isnan(p)
    m = int(valid.sum())
    adjusted = np.where(valid, np.minimum(p * m, 1.0), np.nan)
    reject = np.where(valid, np.nan_to_num(adjusted, nan=np.inf) <= alpha, False)
    return FDRResult(method="bonferroni", level=float(alpha), pvalues=p, adjusted=adjusted, reject=reject, n_tested=m)

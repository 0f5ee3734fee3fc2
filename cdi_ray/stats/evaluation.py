"""Evaluation tools, following METHOD.md "Evaluation conventions", plus synthetic audits.

* :data:`N_GRID` and :func:`mean_pvalue_curve` / :func:`minimum_samples` — mean p over random
  subsets of size n and the smallest n with mean p < 0.01 ("minimum |P|");
  ``mix_r`` gives partial-P mixtures P = (1−r)·n members + r·n non-members
  (:data:`MIX_GRID`), ``ratio_u`` gives |U| = ratio·|P| (:data:`U_RATIO_GRID`).
* :func:`mia_table` — single-feature MIA, TPR at FPR = 1 % and AUC, "lower raw feature = member".
* :func:`synthetic_audit`, :func:`simulate_pvalues`, :func:`rejection_rates` — null and
  planted-shift simulations used by the calibration job and the test suite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as st
from sklearn.metrics import roc_auc_score, roc_curve

from .procedures import DEFAULT_PROCEDURE, run_test, validate_features
from .results import json_safe

__all__ = ["N_GRID", "MIX_GRID", "U_RATIO_GRID", "PValueCurve", "mean_pvalue_curve", "minimum_samples",
           "MIARow", "MIATable", "mia_table", "SHIFT_MODES", "synthetic_audit", "simulate_pvalues", "rejection_rates",
           "hotelling_pvalue"]

# Sample sizes of the paper's "minimum |P|" search (METHOD.md).
N_GRID: tuple[int, ...] = (tuple(range(5, 11)) + tuple(range(20, 101, 10)) + tuple(range(200, 1001, 100))
                           + tuple(range(2000, 10001, 1000)) + (20000,))
# Partial use: share r of non-members in P.
MIX_GRID: tuple[float, ...] = (0.0, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0)
# |U| smaller than |P|.
U_RATIO_GRID: tuple[float, ...] = (0.5, 0.25, 0.1)


# --------------------------------------------------------------------------------------
# Mean p-value curves and minimum |P|
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PValueCurve:
    """p-values of repeated random audits at each n.

    Attributes:
        ns (`ndarray` of int, shape (m,)): |P| per grid point.
        n_unpublished (`ndarray` of int, shape (m,)): |U| used at each grid point.
        pvalues (`ndarray` of shape (m, repeats)): NaN where the procedure could not run.
        procedure, ratio_u, mix_r, repeats, seed, options: echoed inputs.
        errors (`dict[int, str]`): first error message per n that produced NaNs.
    """

    ns: np.ndarray
    n_unpublished: np.ndarray
    pvalues: np.ndarray
    procedure: str
    ratio_u: float
    mix_r: float
    repeats: int
    seed: int
    options: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)

    @property
    def mean_p(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in self.pvalues])

    def minimum_samples(self, alpha: float = 0.01) -> int | None:
        return minimum_samples(self, alpha=alpha)

    def to_dict(self) -> dict:
        return json_safe({"procedure": self.procedure, "ratio_u": self.ratio_u, "mix_r": self.mix_r,
                          "repeats": self.repeats, "seed": self.seed, "options": self.options,
                          "ns": self.ns, "n_unpublished": self.n_unpublished, "mean_p": self.mean_p,
                          "pvalues": self.pvalues, "errors": self.errors})


def mean_pvalue_curve(members, nonmembers, unpublished=None, ns=None, repeats: int = 10,
                      procedure: str = DEFAULT_PROCEDURE, ratio_u: float = 1.0, mix_r: float = 0.0, seed: int = 0,
                      alpha: float = 0.01, **options) -> PValueCurve:
    """Mean p-value over ``repeats`` random audits at each n (METHOD.md evaluation).

    For each n: P = round((1−r)·n) random members + round(r·n) random non-members
    (r = ``mix_r``), U = round(ratio_u·n) random rows of ``unpublished``; all draws without
    replacement. If ``unpublished`` is None, U is drawn from ``nonmembers`` disjoint from the
    non-members placed in P (pass a separate array when the pools must be fixed in advance).

    Args:
        members (`ndarray` of shape (n_m, k)): features of training images of M.
        nonmembers (`ndarray` of shape (n_nm, k)): features of images M never saw.
        unpublished (`ndarray` of shape (n_un, k), *optional*): the U pool.
        ns (`sequence of int`, *optional*): sizes; default = every n of :data:`N_GRID` the pools can supply.
        repeats (`int`): audits per n.
        procedure, alpha, **options: passed to :func:`run_test`.
        ratio_u (`float`): |U| / |P|.
        mix_r (`float` in [0, 1]): share of non-members in P.
        seed (`int`): root seed; audit (n, j) uses an independent child seed.
    """
    # pools are validated once here, so errors caught per audit below can only be size limits
    members, nonmembers = validate_features(members, nonmembers, min_per_group=1, names=("members", "nonmembers"))
    pool_u = (None if unpublished is None else
              validate_features(members, unpublished, min_per_group=1, names=("members", "unpublished"))[1])
    if not 0.0 <= mix_r <= 1.0:
        raise ValueError(f"mix_r must be in [0, 1]; got {mix_r!r}")
    if not ratio_u > 0:
        raise ValueError(f"ratio_u must be > 0; got {ratio_u!r}")

    def sizes(n):
        n_nm = int(round(mix_r * n))
        return n - n_nm, n_nm, max(1, int(round(ratio_u * n)))

    def feasible(n):
        n_m, n_nm, n_u = sizes(n)
        if pool_u is None:
            return n_m <= len(members) and n_nm + n_u <= len(nonmembers)
        return n_m <= len(members) and n_nm <= len(nonmembers) and n_u <= len(pool_u)

    if ns is None:
        ns = [n for n in N_GRID if feasible(n)]
    ns = [int(n) for n in ns]
    for n in ns:
        if not feasible(n):
            n_m, n_nm, n_u = sizes(n)
            raise ValueError(f"n={n} needs {n_m} members, {n_nm} non-members in P and {n_u} unpublished rows; "
                             f"pools have {len(members)} members, {len(nonmembers)} non-members"
                             + ("" if pool_u is None else f", {len(pool_u)} unpublished"))
    pvals = np.full((len(ns), repeats), np.nan)
    errors: dict[int, str] = {}
    children = np.random.SeedSequence(seed).spawn(len(ns))
    for i, n in enumerate(ns):
        n_m, n_nm, n_u = sizes(n)
        seeds = children[i].spawn(repeats)
        for j in range(repeats):
            rng = np.random.default_rng(seeds[j])
            P = members[rng.choice(len(members), n_m, replace=False)]
            if pool_u is None:
                idx = rng.choice(len(nonmembers), n_nm + n_u, replace=False)
                P = np.vstack([P, nonmembers[idx[:n_nm]]])
                U = nonmembers[idx[n_nm:]]
            else:
                P = np.vstack([P, nonmembers[rng.choice(len(nonmembers), n_nm, replace=False)]])
                U = pool_u[rng.choice(len(pool_u), n_u, replace=False)]
            audit_seed = int(rng.integers(2**31 - 1))
            try:
                pvals[i, j] = run_test(P, U, procedure=procedure, alpha=alpha, seed=audit_seed, **options).pvalue
            except ValueError as e:  # e.g. n too small for the procedure: recorded, not fatal
                errors.setdefault(n, str(e))
    return PValueCurve(ns=np.array(ns), n_unpublished=np.array([sizes(n)[2] for n in ns]), pvalues=pvals,
                       procedure=procedure, ratio_u=float(ratio_u), mix_r=float(mix_r), repeats=int(repeats),
                       seed=int(seed), options=dict(options), errors=errors)


def minimum_samples(curve: PValueCurve, alpha: float = 0.01) -> int | None:
    """Smallest n of the curve with mean p < ``alpha`` (METHOD.md "minimum |P|"); None if none.

    This is the paper's definition (first crossing). It is not required that every larger n
    also stays below ``alpha``; with enough repeats the curve is monotone in practice.
    """
    mean = curve.mean_p
    hit = np.flatnonzero(np.nan_to_num(mean, nan=np.inf) < alpha)
    return int(curve.ns[hit[0]]) if hit.size else None


# --------------------------------------------------------------------------------------
# Single-feature membership inference
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MIARow:
    name: str
    tpr_at_1pct_fpr: float
    auc: float


@dataclass(frozen=True)
class MIATable:
    """TPR at FPR = 1 % and AUC of each raw feature used alone as a membership score."""

    rows: tuple[MIARow, ...]
    n_members: int
    n_nonmembers: int
    fpr: float = 0.01

    def to_dict(self) -> dict:
        return json_safe({"n_members": self.n_members, "n_nonmembers": self.n_nonmembers, "fpr": self.fpr,
                          "rows": [{"name": r.name, "tpr_at_fpr": r.tpr_at_1pct_fpr, "auc": r.auc} for r in self.rows]})


def mia_table(features_members, features_nonmembers, names=None, *, fpr: float = 0.01) -> MIATable:
    """Single-feature MIA: each raw feature as a score, **lower raw feature = member**.

    TPR at FPR = ``fpr``: the largest TPR over ROC thresholds whose FPR ≤ ``fpr`` (the score
    is −feature, member = positive class). AUC > 0.5 means members have lower values.
    Non-finite entries are dropped feature by feature (a failed extraction of one feature
    should not remove the image from the other features' rows).

    Args:
        features_members (`ndarray` of shape (n_m, k) or (n_m,)): features of members.
        features_nonmembers (`ndarray` of shape (n_nm, k) or (n_nm,)): features of non-members.
        names (`sequence of str`, *optional*): k column names (default ``f0, f1, …``).
    """
    A = np.asarray(features_members, dtype=np.float64)
    B = np.asarray(features_nonmembers, dtype=np.float64)
    A = A.reshape(-1, 1) if A.ndim == 1 else A
    B = B.reshape(-1, 1) if B.ndim == 1 else B
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"features_members has {A.shape[1]} columns, features_nonmembers {B.shape[1]}; they must match")
    names = [f"f{j}" for j in range(A.shape[1])] if names is None else list(names)
    if len(names) != A.shape[1]:
        raise ValueError(f"names has {len(names)} entries for {A.shape[1]} feature columns")
    y = np.r_[np.ones(len(A)), np.zeros(len(B))]
    rows = []
    for j, name in enumerate(names):
        x = np.r_[A[:, j], B[:, j]]
        ok = np.isfinite(x)
        score = -x[ok]
        f, t, _ = roc_curve(y[ok], score, drop_intermediate=False)
        rows.append(MIARow(name=name, tpr_at_1pct_fpr=float(t[f <= fpr].max()), auc=float(roc_auc_score(y[ok], score))))
    return MIATable(rows=tuple(rows), n_members=len(A), n_nonmembers=len(B), fpr=float(fpr))


# --------------------------------------------------------------------------------------
# Synthetic audits (calibration and power simulations)
# --------------------------------------------------------------------------------------
SHIFT_MODES = ("known", "random", "opposite")


def synthetic_audit(n_published: int, n_unpublished: int, k: int, rng: np.random.Generator, *, shift: float = 0.0,
                    informative: int | None = None, rho: float = 0.0, mode: str = "known",
                    tail_df: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic features: unit variance, equicorrelation ``rho``; ``shift=0`` is the null.

    P's first ``informative`` features (default all) are shifted by ``shift`` in the direction given
    by ``mode``: ``"known"`` — lowered, the direction every CDI feature has (lower = member);
    ``"random"`` — each feature up or down at random, so a prior direction is right for half of
    them; ``"opposite"`` — raised. ``tail_df`` draws Student-t noise with that many degrees of
    freedom (scaled to unit variance) instead of Gaussian noise, for heavy-tailed features.
    """
    if mode not in SHIFT_MODES:
        raise ValueError(f"mode must be one of {SHIFT_MODES}; got {mode!r}")

    def noise(shape):
        if tail_df is None:
            return rng.standard_normal(shape)
        return rng.standard_t(tail_df, size=shape) * math.sqrt((tail_df - 2) / tail_df)

    def draw(n):
        z = noise((n, k))
        if rho:
            z = math.sqrt(1 - rho) * z + math.sqrt(rho) * noise((n, 1))
        return z
    P, U = draw(n_published), draw(n_unpublished)
    m = k if informative is None else informative
    sign = {"known": -np.ones(m), "opposite": np.ones(m)}.get(mode)
    if sign is None:
        sign = rng.choice([-1.0, 1.0], size=m)
    P[:, :m] += shift * sign
    return P, U


def simulate_pvalues(procedure: str, n: int, k: int, audits: int, *, seed: int = 0, n_unpublished: int | None = None,
                     shift: float = 0.0, informative: int | None = None, rho: float = 0.0, mode: str = "known",
                     tail_df: float | None = None, **options) -> np.ndarray:
    """p-values of ``audits`` independent synthetic audits with |P| = n, |U| = n_unpublished (default n).

    ``procedure="hotelling"`` gives Hotelling's T² test on the raw features (a baseline, see
    :func:`hotelling_pvalue`)."""
    out = np.empty(audits)
    for a, child in enumerate(np.random.SeedSequence(seed).spawn(audits)):
        rng = np.random.default_rng(child)
        P, U = synthetic_audit(n, n if n_unpublished is None else n_unpublished, k, rng, shift=shift,
                               informative=informative, rho=rho, mode=mode, tail_df=tail_df)
        if procedure == "hotelling":
            out[a] = hotelling_pvalue(P, U)
        else:
            out[a] = run_test(P, U, procedure=procedure, seed=int(rng.integers(2**31 - 1)), **options).pvalue
    return out


def hotelling_pvalue(published, unpublished) -> float:
    """Two-sample Hotelling T² test of equal means (pooled covariance, F distribution), two-sided.

    A textbook baseline for power comparisons, exact only for Gaussian features with equal
    covariances; not a registered procedure (cdi-ray's tests must hold without those assumptions).
    """
    P, U = validate_features(published, unpublished, min_per_group=2)
    n1, n2, k = len(P), len(U), P.shape[1]
    if n1 + n2 - k - 1 < 1:
        raise ValueError(f"Hotelling's T² needs n_P + n_U > k + 1; got {n1} + {n2} with k = {k}")
    d = P.mean(axis=0) - U.mean(axis=0)
    S = ((n1 - 1) * np.cov(P, rowvar=False).reshape(k, k) + (n2 - 1) * np.cov(U, rowvar=False).reshape(k, k)) / (n1 + n2 - 2)
    t2 = n1 * n2 / (n1 + n2) * float(d @ np.linalg.lstsq(S, d, rcond=None)[0])
    f = t2 * (n1 + n2 - k - 1) / (k * (n1 + n2 - 2))
    return float(st.f.sf(f, k, n1 + n2 - k - 1))


def rejection_rates(pvalues: np.ndarray, alphas=(0.01, 0.05), confidence_level: float = 0.95) -> list[dict]:
    """Rejection rate at each α with its Clopper–Pearson interval; ``calibrated`` = interval's low end ≤ α."""
    p = np.asarray(pvalues, dtype=np.float64)
    p = p[np.isfinite(p)]
    rows = []
    for a in alphas:
        r = int((p <= a).sum())
        ci = st.binomtest(r, len(p)).proportion_ci(confidence_level=confidence_level, method="exact")
        rows.append({"alpha": a, "rejections": r, "audits": len(p), "rate": r / len(p),
                     "ci_low": float(ci.low), "ci_high": float(ci.high), "calibrated": bool(ci.low <= a)})
    return rows

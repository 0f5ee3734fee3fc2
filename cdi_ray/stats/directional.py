"""The default scorer: a sign-constrained, decorrelated combination of features whose member
direction is known — and its statistic for many permutations at once.

Every CDI feature is a loss or a distance: a training image scores *lower* than an image the
model never saw. The ridge scorer ignored that and learned a direction from the data alone, which
at a few hundred images is mostly noise (docs/STATISTICS.md §2.4). This one uses it.

Notation: X (N × k) the pooled features of P ∪ U, s_j the member direction of feature j (−1:
lower = member, +1: higher, 0: unknown), N = n_P + n_U.

1. Label-free preparation (the same for every permutation): standardise each feature with the
   pooled mean and SD and orient it so that "member-like" is positive, o_ij = s_j·(x_ij − μ_j)/σ_j
   (s_j = 1 for an unknown direction); R = pooled correlation matrix; A = (R + ρI)⁻¹.
2. Per label vector: the oriented standardised mean differences
       z_j = (mean_P(o_j) − mean_U(o_j)) / sqrt(1/n_P + 1/n_U)          (≈ N(0, 1) each under H0)
3. Sign-constrained weights, shrunk toward equal weights by the prior strength c:
       w_j = max(z_j + c, 0) for a feature with a known direction,  w_j = z_j for an unknown one
   (a known-direction feature that points the wrong way gets weight 0, never a negative one).
4. Decorrelated direction v = A·w (ridge-regularised LDA direction of the constrained mean shift:
   it may give a feature a negative weight when that feature mostly measures what a stronger
   one already does — how image difficulty is calibrated out of the loss).
5. Statistic: the standardised mean difference of the scores o_i·v,
       T = vᵀz / sqrt(vᵀRv)     (0 when w = 0).
   The reverse statistic T_rev is the same with the directions flipped (z → −z on the known
   features): "P looks *less* like training data than U", which feeds the anomaly rule.

Everything label-dependent is z, a linear function of the per-unit sums of o, so B permutations
cost one (B × units) @ (units × k) product plus O(B·k²). There are no folds: the permutation test
calibrates the in-sample statistic exactly (its selection bias is the same under every
permutation), so the p-value does not depend on a fold assignment at all — only on the
Monte Carlo draw of permutations. Held-out scores for display (effect size, AUC, histograms) are
cross-fitted separately and never enter the p-value.
"""
from __future__ import annotations

import math

import numpy as np

from .permutation import _CrossFitBase

__all__ = ["DirectionalEngine", "resolve_directions", "DEFAULT_PRIOR", "DEFAULT_RIDGE", "DISPLAY_REPEATS"]

#: Prior strength c and ridge ρ of the default, chosen on the tuning half of the demo ``hard``
#: model (docs/STATISTICS.md §2.4, jobs/scorer_choice.py).
DEFAULT_PRIOR = 0.0
DEFAULT_RIDGE = 0.1
#: Fold assignments the display scores are averaged over (display only; not the p-value).
DISPLAY_REPEATS = 10
_CONSTANT = 1e3 * np.finfo(float).eps


def resolve_directions(directions, k: int) -> np.ndarray:
    """Member direction per feature as an int array of −1 (lower = member), +1 (higher) or 0 (unknown).

    ``"lower"`` (every CDI feature), ``"higher"``, ``"unknown"``, or a sequence of k values
    among −1/+1/0 or "lower"/"higher"/"unknown".
    """
    names = {"lower": -1, "higher": 1, "unknown": 0}
    if isinstance(directions, str):
        if directions not in names:
            raise ValueError(f"directions must be 'lower', 'higher', 'unknown' or one value per feature; got {directions!r}")
        return np.full(k, names[directions], dtype=np.int64)
    try:
        vals = [names[d] if isinstance(d, str) else d for d in directions]
        arr = np.asarray(vals, dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"directions must be 'lower', 'higher', 'unknown' or a sequence of {k} values among "
                         f"-1, 1, 0, 'lower', 'higher', 'unknown'; got {directions!r}") from None
    if arr.shape != (k,) or not np.isin(arr, (-1, 0, 1)).all():
        raise ValueError(f"directions needs one value per feature ({k}) among -1 (lower = member), 1 (higher = "
                         f"member), 0 (unknown); got {list(directions)!r}")
    return arr.astype(np.int64)


class DirectionalEngine(_CrossFitBase):
    """Statistic of the directional scorer for many label vectors at once (see the module docstring).

    Args:
        published, unpublished (`ndarray`): (n_P, k) and (n_U, k) features.
        directions (`ndarray` of int): per-feature member direction (:func:`resolve_directions`).
        prior (`float`): c ≥ 0, shrinkage of the weights toward equal weights.
        ridge (`float`): ρ ≥ 0 added to the correlation matrix's diagonal.
        block_size (`int`): rows per permutation unit (see ``permutation.auto_block_size``).
        n_splits (`int`): folds of the display scores only.
        rng (`Generator`): permutations and display folds.
    """

    def __init__(self, published: np.ndarray, unpublished: np.ndarray, *, directions: np.ndarray, prior: float,
                 ridge: float, block_size: int, n_splits: int, rng: np.random.Generator):
        n_p, n_u = len(published), len(unpublished)
        super().__init__(n_p, n_u, n_splits=n_splits, block_size=block_size, rng=rng)
        X = np.vstack([published, unpublished]).astype(np.float64)
        mu, sd = X.mean(axis=0), X.std(axis=0)
        scale = np.abs(X).max(axis=0) + 1e-300
        keep = sd > _CONSTANT * scale  # a constant feature carries no information: left out
        # "member-like" is positive: a lower-is-member feature is negated (unknown: kept as is)
        self.sign = np.where(directions[keep] == 0, 1.0, directions[keep].astype(np.float64))
        self.O = self.sign * (X[:, keep] - mu[keep]) / sd[keep]
        self.known = directions[keep] != 0
        self.k = int(keep.sum())
        self.kept = keep
        self.prior, self.ridge = float(prior), float(ridge)
        self.display_rng = np.random.default_rng(rng.integers(2**63))  # display folds never move the permutations
        self.R = (self.O.T @ self.O) / self.N
        self.A = _ridge_inverse(self.R, self.ridge) if self.k else np.zeros((0, 0))
        self.z_scale = math.sqrt(self.N / (n_p * n_u))
        counts = np.bincount(self.row_unit, minlength=self.n_units)
        by_unit = np.argsort(self.row_unit, kind="stable")
        starts = np.r_[0, np.cumsum(counts[:-1])].astype(np.int64)
        self.unit_sum = (np.add.reduceat(self.O[by_unit], starts, axis=0) if self.k
                         else np.zeros((self.n_units, 0)))

    # ------------------------------------------------------------------ statistic
    def _direction(self, z: np.ndarray) -> np.ndarray:
        """v = A·w for each row of ``z``: sign-constrained weights (shrunk by the prior), decorrelated."""
        return np.where(self.known, np.maximum(z + self.prior, 0.0), z) @ self.A

    def _t(self, z: np.ndarray) -> np.ndarray:
        v = self._direction(z)
        num = (v * z).sum(axis=1)
        q = ((v @ self.R) * v).sum(axis=1)
        return np.where(q > 0, num / np.sqrt(np.where(q > 0, q, 1.0)), 0.0)

    def z(self, Y: np.ndarray) -> np.ndarray:
        """Oriented standardised mean differences (B, k) for label vectors ``Y`` (B, n_units)."""
        return (Y @ self.unit_sum) * self.z_scale

    def statistics(self, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T, T_rev) for each row of ``Y`` (B, n_units), 1 = P."""
        if self.k == 0:
            zero = np.zeros(len(Y))
            return zero, zero
        z = self.z(Y)
        return self._t(z), self._t(np.where(self.known, -z, z))

    def statistic(self, Y: np.ndarray) -> np.ndarray:
        return self.statistics(Y)[0]

    # ------------------------------------------------------------------ display
    def weights(self) -> np.ndarray:
        """The observed direction v in units of the standardised raw features (k_all,; 0 for left-out ones),
        normalised to unit score variance; positive = a higher raw value looks like a member."""
        out = np.zeros(len(self.kept))
        if self.k:
            v = self._direction(self.z(self.observed_labels()))[0]
            q = v @ self.R @ v
            out[self.kept] = v * self.sign / math.sqrt(q) if q > 0 else 0.0
        return out

    def observed_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Held-out scores for display: the same weight rule fitted on K−1 folds scores the held-out
        fold; averaged over :data:`DISPLAY_REPEATS` random fold assignments (fixed by the seed)."""
        y = np.r_[np.ones(self.n_p), np.zeros(self.n_u)]
        s = np.zeros(self.N)
        if self.k == 0:
            return s[: self.n_p], s[self.n_p:]
        for _ in range(DISPLAY_REPEATS):
            fold = self.display_rng.permutation(self.N) % self.n_splits
            for f in range(self.n_splits):
                te = fold == f
                tr = ~te
                n_tp, n_tu = int(y[tr].sum()), int((1 - y[tr]).sum())
                if n_tp == 0 or n_tu == 0:
                    continue
                d = self.O[tr][y[tr] == 1].mean(0) - self.O[tr][y[tr] == 0].mean(0)
                v = self._direction((d / math.sqrt(1 / n_tp + 1 / n_tu))[None, :])[0]
                q = v @ self.R @ v
                if q > 0:
                    s[te] += self.O[te] @ v / math.sqrt(q)
        s /= DISPLAY_REPEATS
        return s[: self.n_p], s[self.n_p:]


def _ridge_inverse(R: np.ndarray, ridge: float) -> np.ndarray:
    """(R + ρI)⁻¹; a clear error when ρ = 0 and the features are collinear."""
    k = len(R)
    try:
        A = np.linalg.solve(R + ridge * np.eye(k), np.eye(k))
    except np.linalg.LinAlgError:
        A = None
    if A is None or not np.isfinite(A).all() or np.linalg.cond(R + ridge * np.eye(k)) > 1e12:
        raise ValueError(f"ridge={ridge:g} leaves the feature correlation matrix singular (some features are exact "
                         f"linear combinations of others); use ridge > 0 (e.g. the default) or drop the redundant "
                         f"features")
    return (A + A.T) / 2

"""Typed, frozen result objects of the statistics layer (scipy.stats style).

Every object echoes its inputs (procedure, n_P, n_U, α, seed, options) so a stored
result can be re-run and checked, and serialises with ``to_dict()`` to JSON-safe
Python (NaN/inf become ``None``; arrays become lists only when asked for).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats as _st

__all__ = ["TestResult", "Verdict", "FDRResult", "json_safe"]

DIRECTIONS = ("P>U", "P<U", "none")
LABELS = ("used", "not_detected", "inconclusive")


def json_safe(value: Any) -> Any:
    """Convert NumPy scalars/arrays and non-finite floats into JSON-safe Python."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_safe(v) for v in value.tolist()]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


@dataclass(frozen=True, eq=False)
class TestResult:
    """Outcome of one dataset-inference test "P scores higher than U".

    Attributes:
        procedure (`str`): registered name, e.g. ``"crossfit-permutation"``, ``"paper-two-sided"``.
        pvalue (`float`): p-value for H1 "P scores higher than U" (one-sided), except for
            ``paper-two-sided`` where it is the two-sided p-value the authors' code reports.
        statistic (`float`): the test statistic on the observed labels (see ``statistic_name``). Its
            scale differs between procedures and scorers and is not N(0, 1) under H0; compare
            ``statistic_standardized`` across audits instead.
        statistic_name (`str`): ``"directional_smd"`` (default scorer: standardized mean difference of
            the in-sample scores of the sign-constrained direction), ``"standardized_mean_difference"``
            (ridge scorer, held-out scores) or ``"welch_t"``.
        effect_size (`float`): Cohen's d of the held-out scores, (mean_P − mean_U) / pooled SD.
        auc (`float`): P(score of a random P image > score of a random U image) on held-out scores.
        direction (`str`): ``"P>U"``, ``"P<U"`` or ``"none"``: which way P differs from U — the sign of
            ``statistic``, or for the directional scorer whether the statistic of "P looks like
            training data" exceeds that of the reverse ("P looks *less* like it").
        pvalue_reverse (`float`): one-sided p-value for the reverse, "P scores LOWER than U",
            from the same procedure. Used by :func:`verdict` to flag anomalies.
        n_published, n_unpublished (`int`): |P| and |U|.
        alpha (`float`): the level the test was run for (echoed; the p-value does not depend on it).
        seed (`int`): root seed of every random choice (folds, splits, permutations).
        calibrated (`bool`): whether the procedure's false-positive rate is ≤ α by
            construction (``False`` for the authors' ``paper-*`` procedures).
        n_permutations (`int` or `None`): permutations the p-value rests on (``None`` if analytic).
        n_exceedances (`int` or `None`): permutations with statistic ≥ observed among them.
        p_at_floor (`bool`): no permutation reached the observed statistic; the true p-value is
            below ``pvalue`` = 1/(n_permutations+1), which is a valid (conservative) bound.
        p_tail_estimate (`float` or `None`): APPROXIMATE p-value from a Gaussian fitted to the
            permutation null (mean/sd). Informational only — never used for a decision.
        statistic_standardized (`float` or `None`): (statistic − mean) / SD of the permutation
            statistics drawn: how many null SDs the observed statistic lies above the null mean
            (comparable across scorers and sizes; ``None`` without permutations).
        scores_published, scores_unpublished (`ndarray`): held-out scores of P and U (for plots).
        feature_weights (`ndarray`): the directional scorer's direction on the observed data, per feature in
            units of the standardised raw feature (positive: a higher raw value scores as a member; 0 for a
            constant feature), scaled to unit score variance; empty for other scorers. For reports.
        options (`dict`): procedure options actually used (defaults filled in).
    """

    __test__ = False  # not a pytest test class, despite the name

    procedure: str
    pvalue: float
    statistic: float
    statistic_name: str
    effect_size: float
    auc: float
    direction: str
    pvalue_reverse: float
    n_published: int
    n_unpublished: int
    alpha: float
    seed: int
    calibrated: bool
    n_permutations: int | None = None
    n_exceedances: int | None = None
    p_at_floor: bool = False
    p_tail_estimate: float | None = None
    statistic_standardized: float | None = None
    scores_published: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    scores_unpublished: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    feature_weights: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")

    @property
    def pvalue_two_sided(self) -> float:
        """Two-sided p-value, ``min(1, 2·min(pvalue, pvalue_reverse))`` (the authors' value for paper-two-sided)."""
        if self.procedure == "paper-two-sided":
            return self.pvalue
        return float(min(1.0, 2.0 * min(self.pvalue, self.pvalue_reverse)))

    def pvalue_interval(self, confidence_level: float = 0.95) -> tuple[float, float]:
        """Monte Carlo uncertainty of a permutation p-value.

        The permutation p-value is exact (valid) as it stands; this Clopper–Pearson interval
        says where the p-value of the *complete* permutation distribution (infinitely many
        permutations) lies, given ``n_exceedances`` out of ``n_permutations``. For analytic
        procedures it is ``(pvalue, pvalue)``.

        No confidence interval is offered for ``effect_size``: the held-out scores of
        different cross-fitting folds are not independent, so the textbook interval for
        Cohen's d would be too narrow (the same defect that miscalibrates the paper's test).
        """
        if self.n_permutations is None or self.n_exceedances is None:
            return (self.pvalue, self.pvalue)
        c, n = int(self.n_exceedances), int(self.n_permutations)
        ci = _st.binomtest(c, n).proportion_ci(confidence_level=confidence_level, method="exact")
        return (float(ci.low), float(ci.high))

    def to_dict(self, include_scores: bool = False) -> dict:
        """JSON-safe dict of every attribute (scores only if ``include_scores``)."""
        out = {
            "procedure": self.procedure,
            "pvalue": self.pvalue,
            "pvalue_reverse": self.pvalue_reverse,
            "pvalue_two_sided": self.pvalue_two_sided,
            "statistic": self.statistic,
            "statistic_name": self.statistic_name,
            "effect_size": self.effect_size,
            "auc": self.auc,
            "direction": self.direction,
            "n_published": self.n_published,
            "n_unpublished": self.n_unpublished,
            "alpha": self.alpha,
            "seed": self.seed,
            "calibrated": self.calibrated,
            "n_permutations": self.n_permutations,
            "n_exceedances": self.n_exceedances,
            "p_at_floor": self.p_at_floor,
            "p_tail_estimate": self.p_tail_estimate,
            "statistic_standardized": self.statistic_standardized,
            "feature_weights": self.feature_weights,
            "options": dict(self.options),
        }
        if include_scores:
            out["scores_published"] = self.scores_published
            out["scores_unpublished"] = self.scores_unpublished
        return json_safe(out)


@dataclass(frozen=True)
class Verdict:
    """Plain-language outcome of one audit.

    Attributes:
        label (`str`): ``"used"``, ``"not_detected"`` or ``"inconclusive"``.
        reason (`str`): one sentence a non-statistician can read.
        pvalue (`float` or `None`): the p-value the decision used (adjusted if one was given).
        alpha (`float`): the level.
        controls (`tuple[str, ...]`): reasons of controls that fired (empty if none).
    """

    label: str
    reason: str
    pvalue: float | None
    alpha: float
    controls: tuple[str, ...] = ()

    def __post_init__(self):
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")

    def to_dict(self) -> dict:
        return json_safe({"label": self.label, "reason": self.reason, "pvalue": self.pvalue,
                          "alpha": self.alpha, "controls": list(self.controls)})


@dataclass(frozen=True, eq=False)
class FDRResult:
    """Multiple-testing adjustment of a batch of audit p-values.

    Attributes:
        method (`str`): ``"benjamini-hochberg"``, ``"benjamini-yekutieli"`` or ``"bonferroni"``.
        level (`float`): q (FDR) or α (family-wise).
        pvalues (`ndarray` of shape (m,)): raw p-values as given; NaN marks a failed audit.
        adjusted (`ndarray` of shape (m,)): adjusted p-values; NaN where the raw one is NaN.
        reject (`ndarray` of bool, shape (m,)): adjusted ≤ level; always False for failed audits.
        n_tested (`int`): number of non-NaN p-values (the m used by the adjustment).
    """

    method: str
    level: float
    pvalues: np.ndarray
    adjusted: np.ndarray
    reject: np.ndarray
    n_tested: int

    @property
    def raw_reject(self) -> np.ndarray:
        """Per-audit decisions at ``level`` without adjustment (for comparison only)."""
        with np.errstate(invalid="ignore"):
            return np.where(np.isnan(self.pvalues), False, self.pvalues <= self.level)

    def to_dict(self) -> dict:
        return json_safe({"method": self.method, "level": self.level, "n_tested": self.n_tested,
                          "pvalues": self.pvalues, "adjusted": self.adjusted,
                          "reject": self.reject, "raw_reject": self.raw_reject})

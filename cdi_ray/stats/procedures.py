"""Dataset-inference test procedures, registered by name, behind one entry point ``run_test``.

=====================  ==========  ==========================================================
name                   calibrated  what it does
=====================  ==========  ==========================================================
crossfit-permutation   yes         default. 5-fold cross-fitted scorer (closed-form ridge
                                   discriminant, or the authors' LR with scorer="logistic");
                                   exact permutation p-value over the whole pipeline with
                                   Besag–Clifford sequential stopping.
split                  yes         fit LR on a fraction of P and U, one-sided Welch t-test on
                                   the held-out rest (the simple calibrated baseline).
paper-one-sided        NO          the authors' procedure as the paper states it: 5-fold
                                   cross-fit (same KFold on P and on U), pooled held-out scores,
                                   Welch t-test, alternative "greater".
paper-two-sided        NO          the same, two-sided — what the authors' code actually ran.
=====================  ==========  ==========================================================

The ``paper-*`` procedures treat the pooled scores of five different scorers as independent,
which inflates the variance of t (METHOD.md "Known defect"); they exist to reproduce the
published numbers, and :func:`cdi_ray.stats.verdict` never returns "used" for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import stats as st
from threadpoolctl import ThreadpoolController  # installed with scikit-learn

from .directional import DEFAULT_PRIOR, DEFAULT_RIDGE, DirectionalEngine, resolve_directions
from .permutation import LogisticCrossFit, RidgeCrossFit, auto_block_size, sequential_permutation_pvalue
from .results import TestResult
from .scorer import crossfit_scores, logistic_pipeline

__all__ = ["run_test", "PROCEDURES", "Procedure", "register_procedure", "validate_features", "DEFAULT_PROCEDURE",
           "SCORERS", "closed_form_permutations", "PVALUE_FLOOR"]

DEFAULT_PROCEDURE = "crossfit-permutation"

_CONTROLLER: list = []


def _blas_controller() -> ThreadpoolController:
    """One cached controller (building one scans the loaded libraries, ~5 ms)."""
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0]


@dataclass(frozen=True)
class Procedure:
    """A registered test procedure.

    ``func(published, unpublished, *, alpha, seed, **options) -> TestResult``; ``defaults``
    lists every option it accepts; ``min_per_group`` is the smallest |P| and |U| it can run on
    (a computational limit — the evidential minimum lives in :func:`verdict`).
    """

    name: str
    func: Callable[..., TestResult]
    defaults: dict = field(default_factory=dict)
    calibrated: bool = True
    min_per_group: int = 2
    summary: str = ""


PROCEDURES: dict[str, Procedure] = {}


def register_procedure(name: str, *, defaults: dict, calibrated: bool, min_per_group: int, summary: str):
    """Decorator: register ``func`` under ``name`` (names are unique)."""

    def deco(func):
        if name in PROCEDURES:
            raise ValueError(f"procedure {name!r} is already registered")
        PROCEDURES[name] = Procedure(name, func, dict(defaults), calibrated, min_per_group, summary)
        return func

    return deco


# --------------------------------------------------------------------------------------
# Input validation (once, up front)
# --------------------------------------------------------------------------------------
def _as_features(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a numeric array of shape (n_samples, n_features); "
                        f"could not convert it to float64 ({e})") from None
    if arr.ndim != 2:
        hint = " For a single feature pass x.reshape(-1, 1)." if arr.ndim == 1 else ""
        raise ValueError(f"{name} must be 2-D, shape (n_samples, n_features); got shape {arr.shape}.{hint}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has 0 feature columns; pass at least one feature per sample")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name} has {rows.size} row(s) containing NaN or inf (first rows: {rows[:5].tolist()}); "
                         f"drop them, e.g. x = x[np.isfinite(x).all(axis=1)], or re-extract the features of "
                         f"those images — a non-finite feature usually means a failed extraction")
    return arr


def validate_features(published, unpublished, *, min_per_group: int = 2,
                      names: tuple[str, str] = ("published", "unpublished")) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert the two feature matrices; raise with the input's name and the fix."""
    P = _as_features(published, names[0])
    U = _as_features(unpublished, names[1])
    if P.shape[1] != U.shape[1]:
        raise ValueError(f"{names[0]} has {P.shape[1]} features per sample but {names[1]} has {U.shape[1]}; "
                         f"both must come from the same feature configuration (same columns, same order)")
    for name, arr in zip(names, (P, U)):
        if len(arr) < min_per_group:
            raise ValueError(f"{name} has {len(arr)} samples; this procedure needs at least {min_per_group} "
                             f"per collection — add samples or pick another procedure")
    return P, U


def _check_int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f"≥ {lo}"
        raise ValueError(f"{name} must be an integer {rng}; got {value!r}")
    return int(value)


def _check_float(name, value, lo, hi, *, lo_open=True, hi_open=True):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number; got {value!r}") from None
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok or not math.isfinite(v):
        a, b = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {a}{lo}, {hi}{b}; got {value!r}")
    return v


# --------------------------------------------------------------------------------------
# Shared summaries
# --------------------------------------------------------------------------------------
def _cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return float("nan")
    sp2 = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)
    return float((a.mean() - b.mean()) / math.sqrt(sp2)) if sp2 > 0 else 0.0


def _auc(a: np.ndarray, b: np.ndarray) -> float:
    """P(a > b) + ½P(a = b) via ranks (Mann–Whitney)."""
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    r = st.rankdata(np.r_[a, b])
    return float((r[: len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def _direction(t: float) -> str:
    return "P>U" if t > 0 else "P<U" if t < 0 else "none"


#: Smallest p-value an analytic procedure reports. Welch's t p-value underflows to exactly 0 for
#: overwhelming evidence; a p-value of 0 claims certainty, so it is floored here and flagged
#: ``p_at_floor`` (the verdict then says "p ≤ 1e-300").
PVALUE_FLOOR = 1e-300


def _welch(sp: np.ndarray, su: np.ndarray, alternative: str) -> tuple[float, float, float, bool]:
    """(t, p, p of the reverse "less" alternative, p floored) of Welch's t-test, p never below
    :data:`PVALUE_FLOOR`; an undefined test (constant scores) gives t = 0, p = 1."""
    t = st.ttest_ind(sp, su, equal_var=False, alternative=alternative)
    if not (np.isfinite(t.statistic) and np.isfinite(t.pvalue)):
        return 0.0, 1.0, 1.0, False
    p_rev = float(st.ttest_ind(sp, su, equal_var=False, alternative="less").pvalue)
    p = float(t.pvalue)
    return float(t.statistic), max(p, PVALUE_FLOOR), max(p_rev, PVALUE_FLOOR), p < PVALUE_FLOOR


# --------------------------------------------------------------------------------------
# Procedures
# --------------------------------------------------------------------------------------
SCORERS = ("directional", "ridge", "logistic")
#: Options each scorer accepts besides the shared ones; passing another scorer's option is an error.
_SCORER_OPTIONS = {
    "directional": {"directions": "lower", "prior": DEFAULT_PRIOR, "ridge": DEFAULT_RIDGE, "block_size": "auto"},
    "ridge": {"ridge": 1.0, "block_size": "auto", "fold_repeats": 10},
    "logistic": {},
}
#: Besag–Clifford h of the default: Monte Carlo noise of p is ≈ 1/sqrt(h) relative (SD of log10 p
#: ≈ 0.43/sqrt(h)), so 25 keeps the seed-to-seed spread of an audit's p small (docs/STATISTICS.md §2.2).
DEFAULT_STOP_EXCEEDANCES = 25


def closed_form_permutations(procedure: str, options: dict | None = None) -> bool:
    """Whether ``procedure`` with ``options`` computes every permutation in closed form, so a batch may
    raise its permutation cap (``max_permutations``) cheaply. False for the logistic scorer (refits per
    permutation) and for procedures without permutations. The pipeline asks this instead of naming scorers."""
    if procedure != "crossfit-permutation":
        return False
    return (options or {}).get("scorer", PROCEDURES[procedure].defaults["scorer"]) in ("directional", "ridge")


def _scorer_options(scorer: str, given: dict) -> dict:
    """The scorer's own options with defaults filled in; an option of another scorer is an error."""
    own = _SCORER_OPTIONS[scorer]
    wrong = sorted(k for k, v in given.items() if v is not None and k not in own)
    if wrong:
        valid = ", ".join(sorted(own)) or "none besides the shared ones"
        raise ValueError(f"scorer={scorer!r} does not use option(s) {wrong} (they belong to another scorer); "
                         f"remove them — {scorer!r} accepts: {valid}")
    return {k: (given.get(k) if given.get(k) is not None else v) for k, v in own.items()}


@register_procedure(
    "crossfit-permutation",
    defaults=dict(scorer="directional", directions=None, prior=None, ridge=None, n_splits=5, fold_repeats=None,
                  block_size=None, stop_exceedances=DEFAULT_STOP_EXCEEDANCES, max_permutations=None,
                  max_permutations_reverse=None, blas_threads=1),
    calibrated=True, min_per_group=2,
    summary="scorer + exact sequential permutation p-value over the whole pipeline (default)",
)
def _crossfit_permutation(P, U, *, alpha, seed, scorer, directions, prior, ridge, n_splits, fold_repeats, block_size,
                          stop_exceedances, max_permutations, max_permutations_reverse, blas_threads) -> TestResult:
    """Default procedure. Options:

    scorer (`str`, defaults to ``"directional"``):
        ``"directional"`` — sign-constrained, decorrelated combination of features whose member
        direction is known (every CDI feature: lower = member); no folds, all permutations in a
        few matrix products (:mod:`cdi_ray.stats.directional`).
        ``"ridge"`` — cross-fitted ridge discriminant that learns the direction from the data,
        averaged over ``fold_repeats`` fold assignments; closed form too.
        ``"logistic"`` — the authors' StandardScaler+LR, cross-fitted and refit per permutation
        (exact, ~1000× slower).
    directions (directional only; defaults to ``"lower"``): member direction per feature —
        ``"lower"``, ``"higher"``, ``"unknown"`` or one value per feature (−1/+1/0 or those words).
    prior (directional only; `float` ≥ 0, defaults to 0): shrinkage of the sign-constrained
        weights toward equal weights (larger = closer to a plain sum of the oriented features).
    ridge (`float` ≥ 0; defaults to 0.1 directional, 1.0 ridge): ρ added to the diagonal of the
        feature correlation matrix before inverting it.
    n_splits (`int`, defaults to 5): K cross-fitting folds (ridge, logistic); for directional only
        the folds of the displayed held-out scores.
    fold_repeats (ridge only; `int`, defaults to 10): fold assignments the statistic is averaged over.
    block_size (directional, ridge; `int` or ``"auto"``): rows per permutation unit; "auto" = 1 up
        to 4096 rows in total, else ceil(N/4096).
    stop_exceedances (`int`, defaults to 25): Besag–Clifford h.
    max_permutations (`int`, defaults to 9,999; 999 logistic): cap of the upper tail; the smallest
        reportable p-value is 1/(max_permutations+1).
    max_permutations_reverse (`int`, defaults to 999; 199 logistic): cap of the reverse tail, which
        only serves the "P scores lower than U" anomaly flag.
    blas_threads (`int` or None, defaults to 1): BLAS threads while permuting. The products are
        small and the cost is dominated by drawing permutations (single-threaded), while
        multi-threaded OpenBLAS on a busy machine was measured 10× slower in wall time
        (docs/STATISTICS.md); ``None`` leaves the process setting alone.
    """
    if blas_threads is not None:
        blas_threads = _check_int("blas_threads", blas_threads, 1)
        with _blas_controller().limit(limits=blas_threads, user_api="blas"):
            return _crossfit_permutation(P, U, alpha=alpha, seed=seed, scorer=scorer, directions=directions,
                                         prior=prior, ridge=ridge, n_splits=n_splits, fold_repeats=fold_repeats,
                                         block_size=block_size, stop_exceedances=stop_exceedances,
                                         max_permutations=max_permutations,
                                         max_permutations_reverse=max_permutations_reverse, blas_threads=None)
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(map(repr, SCORERS))}; got {scorer!r}")
    opts = _scorer_options(scorer, dict(directions=directions, prior=prior, ridge=ridge, fold_repeats=fold_repeats,
                                        block_size=block_size))
    n_splits = _check_int("n_splits", n_splits, 2)
    if len(P) + len(U) < 2 * n_splits:
        raise ValueError(f"|P|+|U| = {len(P) + len(U)} is too small for n_splits={n_splits} "
                         f"(need at least 2 samples per fold); lower n_splits or add samples")
    h = _check_int("stop_exceedances", stop_exceedances, 1)
    closed_form = scorer != "logistic"
    if max_permutations is None:
        max_permutations = 9_999 if closed_form else 999
    if max_permutations_reverse is None:
        max_permutations_reverse = 999 if closed_form else 199
    max_permutations = _check_int("max_permutations", max_permutations, h)
    max_permutations_reverse = _check_int("max_permutations_reverse", max_permutations_reverse, 1)
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    if closed_form:
        opts["ridge"] = _check_float("ridge", opts["ridge"], 0.0, math.inf, lo_open=False)
        bs = opts["block_size"]
        opts["block_size"] = auto_block_size(len(P) + len(U)) if bs == "auto" else _check_int("block_size", bs, 1)
    if scorer == "directional":
        opts["prior"] = _check_float("prior", opts["prior"], 0.0, math.inf, lo_open=False)
        dirs = resolve_directions(opts["directions"], P.shape[1])
        engine = DirectionalEngine(P, U, directions=dirs, prior=opts["prior"], ridge=opts["ridge"],
                                   block_size=opts["block_size"], n_splits=n_splits, rng=rng)
        opts["directions"] = opts["directions"] if isinstance(opts["directions"], str) else dirs.tolist()
        statistic_name, first_chunk = "directional_smd", 4 * h
    elif scorer == "ridge":
        opts["fold_repeats"] = _check_int("fold_repeats", opts["fold_repeats"], 1)
        engine = RidgeCrossFit(P, U, n_splits=n_splits, ridge=opts["ridge"], block_size=opts["block_size"],
                               fold_repeats=opts["fold_repeats"], rng=rng)
        statistic_name, first_chunk = "standardized_mean_difference", 4 * h
    else:
        engine = LogisticCrossFit(P, U, n_splits=n_splits, rng=rng)
        statistic_name, first_chunk = "welch_t", h
    # 1. observed statistic(s), through the same code path as the permutations
    if scorer == "directional":
        t_obs, t_rev = (float(a[0]) for a in engine.statistics(engine.observed_labels()))
        draw = lambda size: engine.statistics(engine.draw_labels(size))  # noqa: E731
    else:
        t_obs = float(engine.statistic(engine.observed_labels())[0])
        t_rev = -t_obs
        draw = lambda size: engine.statistic(engine.draw_labels(size))  # noqa: E731
    # 2. sequential permutation p-values for both tails
    seq = sequential_permutation_pvalue(
        draw, t_obs, t_obs_reverse=t_rev, h=h, max_permutations=max_permutations,
        max_permutations_reverse=max_permutations_reverse, first_chunk=first_chunk, max_chunk=engine.max_chunk())
    # 3. the statistic standardised by its permutation distribution, and an informational Gaussian
    #    tail of that distribution (never used for decisions)
    z = (t_obs - seq.null_mean) / seq.null_sd if seq.n_drawn > 1 and seq.null_sd > 0 else None
    tail = float(st.norm.sf(z)) if z is not None else None
    sp, su = engine.observed_scores()
    direction = ("P>U" if t_obs > t_rev else "P<U" if t_rev > t_obs else "none") if scorer == "directional" \
        else _direction(t_obs)
    return TestResult(
        procedure="crossfit-permutation", pvalue=seq.pvalue, statistic=t_obs, statistic_name=statistic_name,
        effect_size=_cohens_d(sp, su), auc=_auc(sp, su), direction=direction,
        pvalue_reverse=seq.pvalue_reverse, n_published=len(P), n_unpublished=len(U), alpha=alpha, seed=seed,
        calibrated=True, n_permutations=seq.n_permutations, n_exceedances=seq.n_exceedances,
        p_at_floor=seq.p_at_floor, p_tail_estimate=tail, statistic_standardized=z,
        scores_published=sp, scores_unpublished=su,
        feature_weights=engine.weights() if scorer == "directional" else np.empty(0),
        options=dict(scorer=scorer, n_splits=n_splits, **opts, stop_exceedances=h, max_permutations=max_permutations,
                     max_permutations_reverse=max_permutations_reverse, n_drawn=seq.n_drawn,
                     **({"statistic_reverse": t_rev} if scorer == "directional" else {})),
    )


def _paper(P, U, *, alpha, seed, n_splits, alternative, name) -> TestResult:
    n_splits = _check_int("n_splits", n_splits, 2)
    for nm, arr in (("published", P), ("unpublished", U)):
        if len(arr) < n_splits:
            raise ValueError(f"{nm} has {len(arr)} samples; the paper procedure splits each collection into "
                             f"n_splits={n_splits} folds, so it needs at least {n_splits}")
    cf = crossfit_scores(P, U, n_splits=n_splits, random_state=seed, folds="separate")
    sp, su = cf.scores_published, cf.scores_unpublished
    stat, p, p_rev, at_floor = _welch(sp, su, alternative)
    return TestResult(
        procedure=name, pvalue=p, statistic=stat, statistic_name="welch_t", effect_size=_cohens_d(sp, su),
        auc=_auc(sp, su), direction=_direction(stat), pvalue_reverse=p_rev, n_published=len(P),
        n_unpublished=len(U), alpha=alpha, seed=seed, calibrated=False, p_at_floor=at_floor, scores_published=sp,
        scores_unpublished=su, options=dict(n_splits=n_splits, folds="separate", alternative=alternative),
    )


@register_procedure("paper-one-sided", defaults=dict(n_splits=5), calibrated=False, min_per_group=2,
                    summary="authors' procedure, Welch t on pooled cross-fitted scores, one-sided (NOT calibrated)")
def _paper_one_sided(P, U, *, alpha, seed, n_splits) -> TestResult:
    return _paper(P, U, alpha=alpha, seed=seed, n_splits=n_splits, alternative="greater", name="paper-one-sided")


@register_procedure("paper-two-sided", defaults=dict(n_splits=5), calibrated=False, min_per_group=2,
                    summary="authors' code: Welch t on pooled cross-fitted scores, two-sided (NOT calibrated)")
def _paper_two_sided(P, U, *, alpha, seed, n_splits) -> TestResult:
    return _paper(P, U, alpha=alpha, seed=seed, n_splits=n_splits, alternative="two-sided", name="paper-two-sided")


@register_procedure("split", defaults=dict(fit_fraction=0.5), calibrated=True, min_per_group=4,
                    summary="fit LR on a fraction, one-sided Welch t on the held-out rest")
def _split(P, U, *, alpha, seed, fit_fraction) -> TestResult:
    """fit_fraction (`float`, defaults to 0.5): share of P and of U used to fit the scorer."""
    frac = _check_float("fit_fraction", fit_fraction, 0.0, 1.0)
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    parts = []
    for nm, arr in (("published", P), ("unpublished", U)):
        n_fit = int(round(frac * len(arr)))
        if n_fit < 1 or len(arr) - n_fit < 2:
            raise ValueError(f"fit_fraction={frac} leaves {nm} with {n_fit} fit / {len(arr) - n_fit} test samples; "
                             f"need ≥1 to fit and ≥2 to test — change fit_fraction or add samples")
        perm = rng.permutation(len(arr))
        parts.append((arr[perm[:n_fit]], arr[perm[n_fit:]]))
    (p_fit, p_test), (u_fit, u_test) = parts
    model = logistic_pipeline().fit(np.vstack([p_fit, u_fit]), np.r_[np.ones(len(p_fit)), np.zeros(len(u_fit))])
    sp, su = model.predict_proba(p_test)[:, 1], model.predict_proba(u_test)[:, 1]
    stat, p, p_rev, at_floor = _welch(sp, su, "greater")
    return TestResult(
        procedure="split", pvalue=p, statistic=stat, statistic_name="welch_t", effect_size=_cohens_d(sp, su),
        auc=_auc(sp, su), direction=_direction(stat), pvalue_reverse=p_rev, n_published=len(P),
        n_unpublished=len(U), alpha=alpha, seed=seed, calibrated=True, p_at_floor=at_floor, scores_published=sp,
        scores_unpublished=su, options=dict(fit_fraction=frac, n_test_published=len(sp), n_test_unpublished=len(su)),
    )


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------
def run_test(published, unpublished, procedure: str = DEFAULT_PROCEDURE, alpha: float = 0.01, seed: int = 0,
             **options) -> TestResult:
    """Test "P scores higher than U" (model M was trained on (part of) P).

    Args:
        published (`array-like` of shape (n_P, k)): features of the suspected collection P.
        unpublished (`array-like` of shape (n_U, k)): features of the held-out collection U;
            n_U may differ from n_P.
        procedure (`str`, *optional*, defaults to ``"crossfit-permutation"``): a name in
            ``PROCEDURES`` (``crossfit-permutation``, ``split``, ``paper-one-sided``, ``paper-two-sided``).
        alpha (`float`, *optional*, defaults to 0.01): level, echoed in the result (the
            p-value does not depend on it).
        seed (`int`, *optional*, defaults to 0): root seed of folds, splits and permutations.
        **options: procedure options (see each procedure's docstring); unknown ones raise.

    Returns:
        :class:`TestResult`.
    """
    if procedure not in PROCEDURES:
        raise ValueError(f"unknown procedure {procedure!r}; valid procedures: {sorted(PROCEDURES)}")
    proc = PROCEDURES[procedure]
    alpha = _check_float("alpha", alpha, 0.0, 1.0)
    seed = _check_int("seed", seed, 0)
    unknown = sorted(set(options) - set(proc.defaults))
    if unknown:
        raise TypeError(f"procedure {procedure!r} got unknown option(s) {unknown}; "
                        f"valid options: {sorted(proc.defaults) or 'none'}")
    P, U = validate_features(published, unpublished, min_per_group=proc.min_per_group)
    return proc.func(P, U, alpha=alpha, seed=seed, **{**proc.defaults, **options})

"""The directional scorer (default): against a plain re-implementation, its sign constraint, its
options and errors, seed stability; and the fixes of issue 17's defects in the other procedures."""
import math

import numpy as np
import pytest

from cdi_ray.stats import closed_form_permutations, run_test, verdict
from cdi_ray.stats.directional import DirectionalEngine, resolve_directions
from cdi_ray.stats.evaluation import hotelling_pvalue, rejection_rates, simulate_pvalues, synthetic_audit
from cdi_ray.stats.procedures import PVALUE_FLOOR

FAST = dict(max_permutations=199, max_permutations_reverse=199)


def _plain_statistic(X, y, directions, prior, ridge):
    """The directional statistic written out for one label vector, straight from the docstring."""
    mu, sd = X.mean(0), X.std(0)
    keep = sd > 0
    sign = np.where(directions[keep] == 0, 1.0, directions[keep])
    O = sign * (X[:, keep] - mu[keep]) / sd[keep]
    R = O.T @ O / len(X)
    n_p, n_u = int(y.sum()), int((1 - y).sum())
    z = (O[y == 1].mean(0) - O[y == 0].mean(0)) / math.sqrt(1 / n_p + 1 / n_u)
    known = directions[keep] != 0

    def t(zz):
        w = np.where(known, np.maximum(zz + prior, 0), zz)
        v = np.linalg.solve(R + ridge * np.eye(len(R)), w)
        q = v @ R @ v
        return v @ zz / math.sqrt(q) if q > 0 else 0.0
    return t(z), t(np.where(known, -z, z))


@pytest.mark.parametrize("directions,prior,ridge", [("lower", 0.0, 0.1), ([-1, 1, 0, -1, 0, -1], 0.7, 0.0)])
def test_engine_matches_a_plain_implementation(directions, prior, ridge):
    rng = np.random.default_rng(3)
    P, U = synthetic_audit(40, 55, 6, rng, shift=0.4, informative=3, rho=0.3)
    d = resolve_directions(directions, 6)
    eng = DirectionalEngine(P, U, directions=d, prior=prior, ridge=ridge, block_size=1, n_splits=5,
                            rng=np.random.default_rng(0))
    X = np.vstack([P, U])
    Y = np.vstack([eng.observed_labels(), eng.draw_labels(3)])
    T, T_rev = eng.statistics(Y)
    for b in range(len(Y)):
        y = Y[b][eng.row_unit]
        ref = _plain_statistic(X, y, d, prior, ridge)
        assert T[b] == pytest.approx(ref[0], rel=1e-9, abs=1e-12)
        assert T_rev[b] == pytest.approx(ref[1], rel=1e-9, abs=1e-12)


def test_a_feature_pointing_the_wrong_way_gets_no_weight():
    rng = np.random.default_rng(1)
    P, U = synthetic_audit(300, 300, 4, rng)
    P[:, 0] -= 0.5  # member-like: lower
    P[:, 1] += 0.5  # the wrong way for a loss
    eng = DirectionalEngine(P, U, directions=resolve_directions("lower", 4), prior=0.0, ridge=0.1, block_size=1,
                            n_splits=5, rng=np.random.default_rng(0))
    w = eng.weights()
    assert w[0] < 0  # lower raw value = member
    res_known = run_test(P[:, 1:], U[:, 1:], **FAST)  # only the wrong-way feature is informative
    assert res_known.direction == "P<U" and res_known.pvalue > 0.2 and res_known.pvalue_reverse <= 0.01
    assert verdict(res_known, alpha=0.01).label == "inconclusive"  # anomaly rule, not "used"
    # declaring the direction unknown makes the feature count both ways
    res_free = run_test(P[:, 1:], U[:, 1:], directions=["unknown", "lower", "lower"], **FAST)
    assert res_free.pvalue <= 0.01


def test_detects_planted_membership_and_says_which_way():
    rng = np.random.default_rng(2)
    P, U = synthetic_audit(200, 200, 26, rng, shift=0.4, informative=3)
    res = run_test(P, U, **FAST)
    assert res.pvalue == pytest.approx(1 / 200) and res.p_at_floor and res.direction == "P>U"
    assert res.statistic_name == "directional_smd" and res.statistic_standardized > 3
    assert res.effect_size > 0.2 and res.auc > 0.55  # held-out display scores
    assert verdict(res).label == "used"


def test_p_value_barely_depends_on_the_seed():
    """No folds: the seed only moves the Monte Carlo draw of permutations (h = 25 → SD(log10 p) ≈ 0.09)."""
    rng = np.random.default_rng(4)
    P, U = synthetic_audit(200, 200, 26, rng, shift=0.18, informative=3)
    logp = np.log10([run_test(P, U, seed=s).pvalue for s in range(12)])
    assert logp.std(ddof=1) < 0.15, logp
    ridge1 = np.log10([run_test(P, U, scorer="ridge", fold_repeats=1, seed=s, stop_exceedances=10).pvalue
                       for s in range(12)])
    assert ridge1.std(ddof=1) > logp.std(ddof=1)  # the old default moved with its folds


def test_options_of_another_scorer_are_errors():
    P, U = synthetic_audit(30, 30, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"scorer='logistic' does not use option\(s\) \['block_size', 'ridge'\]"):
        run_test(P, U, scorer="logistic", ridge=0.5, block_size=2)
    with pytest.raises(ValueError, match=r"scorer='directional' does not use option\(s\) \['fold_repeats'\]"):
        run_test(P, U, fold_repeats=3)
    with pytest.raises(ValueError, match=r"scorer='ridge' does not use option\(s\) \['prior'\]"):
        run_test(P, U, scorer="ridge", prior=1.0)
    with pytest.raises(ValueError, match="one value per feature"):
        run_test(P, U, directions=[-1, 1])
    with pytest.raises(ValueError, match="prior must be in"):
        run_test(P, U, prior=-1)
    with pytest.raises(ValueError, match="scorer must be one of"):
        run_test(P, U, scorer="svm")


@pytest.mark.parametrize("scorer", ["directional", "ridge"])
def test_ridge_zero_with_a_constant_feature_works_and_collinear_features_say_why(scorer):
    P, U = synthetic_audit(40, 40, 3, np.random.default_rng(5), shift=0.5)
    P[:, 1] = U[:, 1] = 3.0
    res = run_test(P, U, scorer=scorer, ridge=0, **FAST)
    assert 0 < res.pvalue <= 1 and np.isfinite(res.statistic)
    P[:, 1], U[:, 1] = 2 * P[:, 0], 2 * U[:, 0]
    with pytest.raises(ValueError, match="ridge=0 .*linear combinations of others.*ridge > 0"):
        run_test(P, U, scorer=scorer, ridge=0, **FAST)


@pytest.mark.parametrize("procedure", ["split", "paper-one-sided", "paper-two-sided"])
def test_analytic_p_values_never_underflow_to_zero(procedure):
    rng = np.random.default_rng(6)
    P, U = synthetic_audit(400, 400, 4, rng, shift=6.0)
    res = run_test(P, U, procedure=procedure)
    assert res.pvalue == PVALUE_FLOOR and res.p_at_floor and res.pvalue > 0
    v = verdict(res)
    assert "0.0e+00" not in v.reason and "1e-300" in v.reason.replace("1.0e-300", "1e-300")


def test_closed_form_permutations_tells_the_pipeline_when_a_batch_cap_is_cheap():
    assert closed_form_permutations("crossfit-permutation", {})
    assert closed_form_permutations("crossfit-permutation", {"scorer": "ridge"})
    assert not closed_form_permutations("crossfit-permutation", {"scorer": "logistic"})
    assert not closed_form_permutations("split", {})


def test_calibrated_on_heavy_tailed_correlated_features_with_unequal_sizes():
    """Fast subset of jobs/calibration.py: t(3) noise, equicorrelation .5, |U| = 2.5·|P|, blocked units."""
    p1 = simulate_pvalues("crossfit-permutation", 60, 26, 250, seed=21, n_unpublished=150, rho=0.5, tail_df=3, **FAST)
    p2 = simulate_pvalues("crossfit-permutation", 301, 8, 250, seed=22, n_unpublished=97, rho=0.5, tail_df=3,
                          block_size=4, **FAST)
    for p in (p1, p2):
        for row in rejection_rates(p, (0.01, 0.05), confidence_level=1 - 0.05 / 4):
            assert row["ci_low"] <= row["alpha"], row


def test_hotelling_baseline_is_calibrated_and_checks_its_size():
    p = simulate_pvalues("hotelling", 60, 5, 400, seed=23)
    for row in rejection_rates(p, (0.05,)):
        assert row["ci_low"] <= 0.05 <= row["ci_high"] + 0.02
    with pytest.raises(ValueError, match="n_P \\+ n_U > k \\+ 1"):
        hotelling_pvalue(np.zeros((3, 6)), np.ones((3, 6)))

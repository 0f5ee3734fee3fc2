"""Power sanity: with a small planted shift the default detects at least as often as `split`."""
import numpy as np
import pytest

from cdi_ray.stats import run_test, verdict
from cdi_ray.stats.evaluation import simulate_pvalues, synthetic_audit

# (n, k, shift): small shifts where neither procedure is near 0 % or 100 % power
SCENARIOS = [(50, 4, 0.3), (200, 26, 0.06)]


@pytest.mark.parametrize("n,k,shift", SCENARIOS)
def test_default_at_least_as_powerful_as_split(n, k, shift):
    audits = 120
    p_default = simulate_pvalues("crossfit-permutation", n, k, audits, seed=11, shift=shift,
                                 max_permutations=999, max_permutations_reverse=99)
    p_split = simulate_pvalues("split", n, k, audits, seed=11, shift=shift)
    for alpha in (0.01, 0.05):
        r_default, r_split = np.mean(p_default <= alpha), np.mean(p_split <= alpha)
        assert r_default >= r_split, (alpha, r_default, r_split)
        assert r_default > alpha  # it does detect something
    assert np.mean(p_default) < np.mean(p_split)


def test_overwhelming_evidence_reaches_the_floor_and_says_so():
    rng = np.random.default_rng(5)
    P, U = synthetic_audit(300, 300, 26, rng, shift=0.3)
    res = run_test(P, U, max_permutations=1999)
    assert res.p_at_floor and res.n_exceedances == 0
    assert res.pvalue == pytest.approx(1 / 2000)  # a valid bound, not an estimate
    assert res.p_tail_estimate is not None and res.p_tail_estimate < res.pvalue  # informational only
    assert res.direction == "P>U" and res.effect_size > 1 and res.auc > 0.8
    lo, hi = res.pvalue_interval()
    assert lo == 0.0 and hi < 0.002
    v = verdict(res)
    assert v.label == "used" and "p ≤" in v.reason


def test_logistic_scorer_option_detects_a_shift():
    rng = np.random.default_rng(6)
    P, U = synthetic_audit(80, 80, 4, rng, shift=0.8)
    res = run_test(P, U, scorer="logistic", max_permutations=99, max_permutations_reverse=19)
    assert res.statistic_name == "welch_t"
    assert res.pvalue == pytest.approx(0.01) and res.p_at_floor  # 1/(99+1)

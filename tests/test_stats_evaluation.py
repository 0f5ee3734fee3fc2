"""Evaluation tools: n-grid, mean-p curves, minimum |P|, mixtures, |U| ratios, single-feature MIA."""
import json

import numpy as np
import pytest

from cdi_ray.stats import MIX_GRID, N_GRID, U_RATIO_GRID, mean_pvalue_curve, mia_table, minimum_samples


def test_n_grid_is_the_spec_grid():
    expected = ([5, 6, 7, 8, 9, 10] + list(range(20, 101, 10)) + list(range(200, 1001, 100))
                + list(range(2000, 10001, 1000)) + [20000])
    assert list(N_GRID) == expected
    assert MIX_GRID == (0.0, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0) and U_RATIO_GRID == (0.5, 0.25, 0.1)


@pytest.fixture(scope="module")
def pools():
    rng = np.random.default_rng(0)
    k = 4
    members = rng.standard_normal((700, k)) - 0.35  # lower raw feature = member
    nonmembers = rng.standard_normal((1400, k))
    return members, nonmembers


def test_mean_p_curve_and_minimum_samples(pools):
    members, nonmembers = pools
    curve = mean_pvalue_curve(members, nonmembers, ns=[10, 30, 100, 300], repeats=6, seed=1,
                              max_permutations=999)
    assert curve.pvalues.shape == (4, 6) and list(curve.n_unpublished) == [10, 30, 100, 300]
    mp = curve.mean_p
    assert mp[-1] < 0.01 and mp[0] > mp[-1]
    n_min = minimum_samples(curve, alpha=0.01)
    assert n_min in (100, 300) and curve.minimum_samples() == n_min
    json.dumps(curve.to_dict(), allow_nan=False)


def test_mixture_of_only_nonmembers_is_null(pools):
    members, nonmembers = pools
    curve = mean_pvalue_curve(members, nonmembers, ns=[200], repeats=20, mix_r=1.0, seed=2, max_permutations=199)
    assert 0.3 < curve.mean_p[0] < 0.7 and minimum_samples(curve) is None


def test_partial_mixture_and_small_u(pools):
    members, nonmembers = pools
    full = mean_pvalue_curve(members, nonmembers, ns=[200], repeats=8, seed=3, max_permutations=999)
    half = mean_pvalue_curve(members, nonmembers, ns=[200], repeats=8, seed=3, mix_r=0.5, max_permutations=999)
    small_u = mean_pvalue_curve(members, nonmembers, ns=[200], repeats=8, seed=3, ratio_u=0.25, max_permutations=999)
    assert small_u.n_unpublished[0] == 50
    assert full.mean_p[0] <= half.mean_p[0] and full.mean_p[0] <= small_u.mean_p[0]


def test_default_grid_and_errors(pools):
    members, nonmembers = pools
    curve = mean_pvalue_curve(members[:12], nonmembers[:30], ns=None, repeats=1, procedure="split", seed=0,
                              ratio_u=0.5)
    assert list(curve.ns) == [5, 6, 7, 8, 9, 10]  # what the pools can supply
    # |U| = round(2.5) = 2 < 4, the minimum of `split`: recorded as NaN with the reason, not fatal
    assert np.isnan(curve.pvalues[0, 0]) and "unpublished has 2 samples" in curve.errors[5]
    assert np.isfinite(curve.pvalues[-1, 0])
    with pytest.raises(ValueError, match="n=1000 needs 1000 members"):
        mean_pvalue_curve(members, nonmembers, ns=[1000], repeats=1)
    bad = members.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"members has 1 row\(s\) containing NaN"):
        mean_pvalue_curve(bad, nonmembers, ns=[10], repeats=1)


def test_mia_table_direction_and_values():
    rng = np.random.default_rng(1)
    nonmem = rng.standard_normal((1000, 3))
    mem = rng.standard_normal((1000, 3))
    mem[:, 0] -= 10  # perfectly separated, members lower
    mem[:, 2] += 10  # perfectly separated in the WRONG direction
    t = mia_table(mem, nonmem, names=["DL", "SecMI", "PIA"])
    rows = {r.name: r for r in t.rows}
    assert rows["DL"].auc == 1.0 and rows["DL"].tpr_at_1pct_fpr == 1.0
    assert abs(rows["SecMI"].auc - 0.5) < 0.05 and rows["SecMI"].tpr_at_1pct_fpr < 0.05
    assert rows["PIA"].auc == 0.0 and rows["PIA"].tpr_at_1pct_fpr == 0.0
    json.dumps(t.to_dict(), allow_nan=False)


def test_mia_tpr_at_fpr_by_hand():
    # 100 non-members 1..100 ; members: 5 at 0.5 (below every non-member), 95 at 1000.
    nonmem = np.arange(1, 101, dtype=float)
    mem = np.r_[np.full(5, 0.5), np.full(95, 1000.0)]
    t = mia_table(mem, nonmem)
    # threshold "x ≤ 1": TPR 5 %, FPR 1 % (one non-member) -> allowed at FPR = 1 %
    assert t.rows[0].tpr_at_1pct_fpr == pytest.approx(0.05)
    assert t.rows[0].auc == pytest.approx(0.05)

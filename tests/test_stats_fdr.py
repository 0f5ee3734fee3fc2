"""Benjamini–Hochberg, Benjamini–Yekutieli and Bonferroni over a batch of audit p-values."""
import json

import numpy as np
import pytest

from cdi_ray.stats import benjamini_hochberg, benjamini_yekutieli, bonferroni

# Benjamini & Hochberg (1995), section 4: 15 p-values; at q = 0.05 BH rejects 4, Bonferroni 3.
BH95 = np.array([0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459,
                 0.3240, 0.4262, 0.5719, 0.6528, 0.7590, 1.0000])
# Adjusted values by hand from the definition min_{j≥i} m·p_(j)/j (m = 15); these are the
# values R's p.adjust(p, "BH") and statsmodels' multipletests(p, method="fdr_bh") return.
BH95_ADJ = np.array([0.0015, 0.003, 0.0095, 0.035625, 0.0603, 0.063857142857142857, 0.063857142857142857,
                     0.0645, 0.0765, 0.486, 0.58118181818181818, 0.714875, 0.75323076923076923,
                     0.81321428571428571, 1.0])


def test_bh_matches_the_1995_example():
    res = benjamini_hochberg(BH95, q=0.05)
    np.testing.assert_allclose(res.adjusted, BH95_ADJ, rtol=1e-12)
    assert res.reject.sum() == 4 and res.reject[:4].all()
    assert res.n_tested == 15
    assert res.raw_reject.sum() == 9  # unadjusted α = 0.05 would "find" 9


def test_bh_small_hand_example_and_order_invariance():
    p = np.array([0.04, 0.01, 0.03, 0.02])  # m·p/rank = 0.04 for all four
    res = benjamini_hochberg(p, q=0.05)
    np.testing.assert_allclose(res.adjusted, [0.04] * 4)
    assert res.reject.all()
    perm = np.random.default_rng(0).permutation(len(BH95))
    np.testing.assert_allclose(benjamini_hochberg(BH95[perm]).adjusted, BH95_ADJ[perm])


def test_bonferroni_and_by():
    bon = bonferroni(BH95, alpha=0.05)
    np.testing.assert_allclose(bon.adjusted, np.minimum(BH95 * 15, 1))
    assert bon.reject.sum() == 3
    by = benjamini_yekutieli(BH95, q=0.05)
    c15 = sum(1 / i for i in range(1, 16))
    np.testing.assert_allclose(by.adjusted, np.minimum(BH95_ADJ * c15, 1.0))
    assert by.reject.sum() == 3  # 0.0095·15·c15/4 ≈ 0.118 > 0.05


def test_failed_audits_are_excluded_not_rejected():
    p = np.array([0.001, np.nan, 0.02, 0.5, np.nan])
    res = benjamini_hochberg(p, q=0.05)
    assert res.n_tested == 3
    assert np.isnan(res.adjusted[[1, 4]]).all() and not res.reject[[1, 4]].any()
    np.testing.assert_allclose(res.adjusted[[0, 2, 3]], [0.003, 0.03, 0.5])
    assert bonferroni(p).n_tested == 3
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["adjusted"][1] is None
    empty = benjamini_hochberg([np.nan, np.nan])
    assert empty.n_tested == 0 and not empty.reject.any()


@pytest.mark.parametrize("bad", [[0.1, 1.2], [-0.1], [[0.1, 0.2]]])
def test_invalid_pvalues_raise(bad):
    with pytest.raises(ValueError, match="pvalues"):
        benjamini_hochberg(bad)


def test_invalid_level_raises():
    with pytest.raises(ValueError, match="q must be in"):
        benjamini_hochberg([0.1], q=1.5)

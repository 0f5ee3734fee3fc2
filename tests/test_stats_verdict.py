"""Verdict policy: 'used' only with a calibrated small p in the P>U direction on enough samples."""
import dataclasses
import re

import numpy as np
import pytest

from cdi_ray.stats import MIN_SAMPLES, Verdict, benjamini_hochberg, run_test, verdict
from cdi_ray.stats.evaluation import synthetic_audit
from cdi_ray.stats.results import TestResult as _Result


def _one_sentence(text):
    return text.endswith(".") and re.search(r"[.;!?]\s+[A-Z]", text) is None


def _result(**kw):
    base = dict(procedure="crossfit-permutation", pvalue=0.001, statistic=3.5, statistic_name="standardized_mean_difference",
                effect_size=0.3, auc=0.58, direction="P>U", pvalue_reverse=1.0, n_published=500, n_unpublished=500,
                alpha=0.01, seed=0, calibrated=True, n_permutations=9999, n_exceedances=9)
    base.update(kw)
    return _Result(**base)


def test_used():
    v = verdict(_result())
    assert v.label == "used" and isinstance(v, Verdict)
    assert "p = 0.001" in v.reason and "trained on at least part" in v.reason
    assert _one_sentence(v.reason)


def test_not_detected_is_not_exoneration():
    v = verdict(_result(pvalue=0.2, statistic=0.8, n_exceedances=None))
    assert v.label == "not_detected" and "does not show that it was not" in v.reason


def test_too_few_samples_is_inconclusive():
    v = verdict(_result(n_published=MIN_SAMPLES - 1))
    assert v.label == "inconclusive" and f"at least {MIN_SAMPLES}" in v.reason
    assert verdict(_result(n_unpublished=20), min_samples=10).label == "used"


def test_wrong_direction_is_inconclusive():
    v = verdict(_result(pvalue=0.9995, statistic=-4.0, direction="P<U", pvalue_reverse=0.001))
    assert v.label == "inconclusive" and "LESS like training data" in v.reason
    # weak reverse evidence is just "not detected"
    assert verdict(_result(pvalue=0.8, statistic=-0.8, direction="P<U", pvalue_reverse=0.2)).label == "not_detected"


def test_uncalibrated_procedure_never_says_used():
    r = _result(procedure="paper-two-sided", calibrated=False, statistic_name="welch_t")
    v = verdict(r)
    assert v.label == "inconclusive" and "too many false positives" in v.reason
    assert verdict(dataclasses.replace(r, pvalue=0.3)).label == "not_detected"


def test_controls_override():
    v = verdict(_result(), controls=["reference model also separates P from U"])
    assert v.label == "inconclusive" and "reference model" in v.reason
    assert v.controls == ("reference model also separates P from U",)


def test_adjusted_pvalue_is_used_for_the_decision():
    assert verdict(_result(), p_adjusted=0.04).label == "not_detected"
    v = verdict(_result(), p_adjusted=0.004)
    assert v.label == "used" and "adjusting for the batch" in v.reason and v.pvalue == 0.004
    assert verdict(_result(), p_adjusted=float("nan")).label == "inconclusive"


def test_floor_is_reported_as_a_bound():
    v = verdict(_result(pvalue=1e-4, p_at_floor=True, n_exceedances=0))
    assert v.label == "used" and "p ≤ 1.0e-04" in v.reason


def test_alpha_override_and_validation():
    assert verdict(_result(pvalue=0.03), alpha=0.05).label == "used"
    assert verdict(_result(pvalue=0.03)).label == "not_detected"
    with pytest.raises(ValueError, match="alpha"):
        verdict(_result(), alpha=0)


def test_end_to_end_batch():
    """A batch of audits: BH-adjusted p-values feed the verdicts; null audits are not accused."""
    rng = np.random.default_rng(0)
    results = []
    for i in range(12):
        P, U = synthetic_audit(120, 120, 4, rng, shift=0.5 if i < 3 else 0.0)
        results.append(run_test(P, U, seed=i, max_permutations=1999))
    fdr = benjamini_hochberg([r.pvalue for r in results], q=0.05)
    labels = [verdict(r, alpha=0.05, p_adjusted=a).label for r, a in zip(results, fdr.adjusted)]
    assert labels[:3] == ["used"] * 3
    assert "used" not in labels[3:]
    assert verdict(results[0]).to_dict()["label"] == "used"


def test_every_reason_is_one_sentence():
    cases = [verdict(_result()), verdict(_result(pvalue=0.5)), verdict(_result(n_published=3)),
             verdict(_result(direction="P<U", statistic=-3, pvalue=0.99, pvalue_reverse=0.001)),
             verdict(_result(calibrated=False, procedure="paper-one-sided")), verdict(_result(), controls=["x"]),
             verdict(_result(pvalue=float("nan")))]
    assert {v.label for v in cases} == {"used", "not_detected", "inconclusive"}
    for v in cases:
        assert _one_sentence(v.reason), v.reason

"""Statistics of CDI: scorer, calibrated dataset-inference tests, verdicts, FDR, evaluation.

NumPy / SciPy / scikit-learn only (no Ray, no torch). Entry points:

    run_test(published, unpublished, procedure="crossfit-permutation", alpha=0.01, seed=0, **options) -> TestResult
    closed_form_permutations(procedure, options) -> bool   (may a batch raise the permutation cap cheaply?)
    verdict(result, *, alpha=None, p_adjusted=None, min_samples=50, controls=()) -> Verdict
    benjamini_hochberg(pvalues, q=0.05) / benjamini_yekutieli(...) / bonferroni(pvalues, alpha=0.05) -> FDRResult
    next_look(state, published, unpublished, *, alpha, seed, design=None) -> (LookResult, SequentialState)
        (a standing audit re-tested every night, ``used`` controlled over its whole life)

See docs/STATISTICS.md.
"""
from .evaluation import (MIX_GRID, N_GRID, U_RATIO_GRID, MIATable, PValueCurve, mean_pvalue_curve, mia_table,
                         minimum_samples)
from .fdr import benjamini_hochberg, benjamini_yekutieli, bonferroni
from .procedures import (DEFAULT_PROCEDURE, PROCEDURES, SCORERS, closed_form_permutations, register_procedure, run_test,
                         validate_features)
from .results import FDRResult, TestResult, Verdict
from .scorer import CrossFitScores, crossfit_scores, logistic_pipeline
from .sequential import LookResult, SequentialDesign, SequentialState, next_look
from .verdict import MIN_SAMPLES, verdict

__all__ = [
    "run_test", "TestResult", "PROCEDURES", "DEFAULT_PROCEDURE", "SCORERS", "register_procedure", "validate_features",
    "closed_form_permutations",
    "verdict", "Verdict", "MIN_SAMPLES",
    "benjamini_hochberg", "benjamini_yekutieli", "bonferroni", "FDRResult",
    "crossfit_scores", "CrossFitScores", "logistic_pipeline",
    "next_look", "LookResult", "SequentialState", "SequentialDesign",
    "N_GRID", "MIX_GRID", "U_RATIO_GRID", "PValueCurve", "mean_pvalue_curve", "minimum_samples", "MIATable", "mia_table",
]

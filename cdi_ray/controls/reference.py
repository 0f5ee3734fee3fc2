"""The reference-model control: does a model that cannot have seen P also "detect" P?

The audit's main test is re-run, on the same images with the same features and procedure,
against a **reference model** named by the manifest — one that cannot have been trained on P
(trained before P was published, or on data known not to include it). Training cannot explain a
detection on such a model, so if the reference also finds P scoring above U, the collections
differ in something besides membership and the verdict is ``inconclusive``. Unlike the
model-free control it sees what the model family sees (style, subtle content), so it covers
shifts that image descriptors miss; it is only as good as the claim that the reference never saw P.

Same conventions as the model-free control (:mod:`cdi_ray.controls.model_free`): upper-tail
p-value (the cross-fitted scorer learns the direction of any shift), level
``CONTROL_ALPHA`` = 0.05 per audit, uncorrected (firing more is the safe side), and a control
that cannot run (the reference model failed to load, features missing) fires.
"""
from __future__ import annotations

from .model_free import CONTROL_ALPHA, ControlResult

__all__ = ["REFERENCE_MODEL", "reference_control"]

REFERENCE_MODEL = "reference-model"


def reference_control(result, *, reference: str, alpha: float = CONTROL_ALPHA, error: str | None = None) -> ControlResult:
    """Turn the audit's test re-run on the reference model into a :class:`ControlResult`.

    Args:
        result (`cdi_ray.stats.TestResult` or `None`): the main procedure run on the reference
            model's features of the same P and U images; ``None`` when it could not run.
        reference (`str`): the reference model's name (quoted in the reason).
        alpha (`float`, *optional*, defaults to 0.05): the control fires when p ≤ alpha.
        error (`str`, *optional*): why the re-run failed (when ``result`` is None).
    """
    if result is None:
        return ControlResult(REFERENCE_MODEL, True, None, alpha,
                             f"the reference-model control on {reference!r} could not be run ({error or 'no result'}), "
                             f"so a difference between the published and unpublished images that has nothing to do "
                             f"with training cannot be ruled out")
    p = float(result.pvalue)
    fired = p <= alpha
    if fired:
        reason = (f"the reference model {reference!r}, which cannot have been trained on the published images, also "
                  f"separates them from the unpublished ones (reference p = {p:.2g} ≤ {alpha:g})")
    else:
        reason = (f"the reference model {reference!r} does not separate the published from the unpublished images "
                  f"at level {alpha:g} (reference p = {p:.2g})")
    return ControlResult(REFERENCE_MODEL, fired, p, alpha, reason, [], int(result.n_published),
                         int(result.n_unpublished), float(result.statistic), float(result.auc))

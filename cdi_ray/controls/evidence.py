"""One audit with and without its guards, in process: what the guard evidence is measured with.

:func:`guarded_audit` runs the main test on feature matrices, the model-free control on the
same images' descriptors, and (if given) the same test on reference-calibrated features (target
minus reference), and returns the verdict each combination gives — so a benchmark can show, on
one P/U pair, what the unguarded test would have said and what the guarded audit says. The
pipeline decides verdicts the same way (:mod:`cdi_ray.pipeline.results`, after the batch's FDR
control); this single-audit form has no batch, so the level applies to the raw p-value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .model_free import CONTROL_ALPHA, MODEL_FREE, control_seed, model_free_control


@dataclass(frozen=True)
class GuardedAudit:
    """Verdicts of one P/U pair: unguarded, guarded (the default), and with reference calibration."""

    n_published: int
    n_unpublished: int
    pvalue: float                    # main test, the audited model's features
    control_pvalue: float | None     # model-free control
    control_fired: bool
    unguarded: str                   # verdict of the main test alone
    guarded: str                     # verdict with the model-free control (the default audit)
    reason: str                      # the guarded verdict's reason
    calibrated_pvalue: float | None = None   # main test on target − reference features
    calibrated_guarded: str | None = None    # its verdict with the model-free control
    top_descriptor: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def guarded_audit(P: np.ndarray, U: np.ndarray, desc_P: np.ndarray, desc_U: np.ndarray, *,
                  ref_P: np.ndarray | None = None, ref_U: np.ndarray | None = None, alpha: float = 0.01,
                  control_alpha: float = CONTROL_ALPHA, seed: int = 0, **options) -> GuardedAudit:
    """Run one audit's main test, its model-free control and (optionally) its calibrated test.

    Args:
        P, U (`ndarray` of shape (n, k)): the audited model's features of the published / unpublished images.
        desc_P, desc_U (`ndarray` of shape (n, d)): model-free descriptors of the same images, same order.
        ref_P, ref_U (`ndarray`, *optional*): a reference model's features of the same images.
        alpha (`float`): level of the main test (no batch here, so no FDR adjustment).
        control_alpha (`float`): level of the model-free control.
        seed (`int`): the audit seed; the control uses its own stream derived from it, like the pipeline.
        **options: options of the default procedure (e.g. ``max_permutations``).
    """
    from cdi_ray.stats import run_test, verdict

    result = run_test(P, U, alpha=alpha, seed=seed, **options)
    control = model_free_control(desc_P, desc_U, alpha=control_alpha, seed=control_seed(seed, MODEL_FREE), **options)
    guarded = verdict(result, alpha=alpha, controls=[control])
    out = dict(n_published=len(P), n_unpublished=len(U), pvalue=float(result.pvalue), control_pvalue=control.pvalue,
               control_fired=control.fired, unguarded=verdict(result, alpha=alpha).label, guarded=guarded.label,
               reason=guarded.reason, top_descriptor=control.separating[0][0] if control.separating else None)
    if ref_P is not None and ref_U is not None:
        calibrated = run_test(P - ref_P, U - ref_U, alpha=alpha, seed=seed, **options)
        out.update(calibrated_pvalue=float(calibrated.pvalue),
                   calibrated_guarded=verdict(calibrated, alpha=alpha, controls=[control]).label)
    return GuardedAudit(**out)

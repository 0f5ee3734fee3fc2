"""The model-free distribution-shift control: can image descriptors alone separate P from U?

CDI's scorer learns whatever separates P from U. If P and U differ in anything besides
membership (date, source, curation, compression, resolution, subject), the main test finds
"evidence" on any model. This control runs the **same calibrated test** as the main audit —
``cdi_ray.stats.run_test(..., procedure="crossfit-permutation")`` with the cross-fitted ridge
scorer (:data:`CONTROL_TEST_OPTIONS`) and an exact permutation p-value — on model-independent
descriptors of the same images
(:mod:`cdi_ray.controls.descriptors`). If the descriptors separate P from U at the control's
level, the audit's verdict is ``inconclusive`` (never ``used``), and the result names the
descriptors that separate them best.

Which tail. A shift in *either* direction of any descriptor (P brighter or darker, larger or
smaller files…) matters, and a descriptor has no "member" direction (so the main test's default
directional scorer does not apply). The cross-fitted ridge scorer learns the direction of the
shift on the training folds, so separability in any direction shows up as held-out P scores
*above* held-out U scores — the upper tail of the statistic (``TestResult.pvalue``). The lower
tail ("P scores below U") is not a shift signal (it is what a scorer does by chance, or with
pairing across P and U) and spending half of α on it would only cost power; the control therefore
uses the one-sided upper p-value, whose false-fire rate under exchangeable P and U is ≤ α exactly
(shown by simulation in ``tests/test_controls.py``).

Which level. ``alpha`` = :data:`CONTROL_ALPHA` (0.05), per audit, **not** corrected for the batch.
The control protects against a false accusation, so its errors are asymmetric: a control that
fires when there is no shift turns a would-be verdict into ``inconclusive`` (a lost finding, at a
known rate of ≤ 5 % of exchangeable audits), while a control that misses a shift may let a shift
pass as ``used``. Erring towards firing is the safe side, which is also why the level is not
divided among the audits of a batch.

A control that cannot run (descriptors missing, too few images) counts as *fired*: the shift
could not be ruled out, so the verdict cannot be ``used``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .descriptors import DESCRIPTOR_NAMES, group_of

__all__ = ["ControlResult", "model_free_control", "separating_descriptors", "control_seed", "CONTROL_ALPHA",
           "MODEL_FREE", "CONTROL_TEST_OPTIONS"]

#: The test the control runs, whatever the main test's default: the ridge scorer with one fold
#: assignment and h = 10 — the statistic its false-fire rate and guard evidence were measured with
#: (docs/VERDICTS.md). Options given to :func:`model_free_control` override these.
CONTROL_TEST_OPTIONS = {"scorer": "ridge", "fold_repeats": 1, "stop_exceedances": 10}

MODEL_FREE = "model-free"
#: Default level of the control, uncorrected (module docstring: liberal is the safe side).
CONTROL_ALPHA = 0.05
#: Descriptors named in a fired control's reason.
TOP_IN_REASON = 3


@dataclass(frozen=True)
class ControlResult:
    """Outcome of one control of one audit.

    Attributes:
        name (`str`): ``"model-free"`` (later: ``"reference-model"``).
        fired (`bool`): the control found P and U distinguishable without membership (or could
            not rule it out); any fired control makes the verdict ``inconclusive``.
        pvalue (`float` or `None`): the control test's p-value (None if it could not run).
        alpha (`float`): the control's level.
        reason (`str`): one sentence; for a fired control it is what the verdict quotes.
        separating (`list[tuple[str, float]]`): ``(descriptor, AUC)`` of each descriptor alone,
            best-separating first (AUC = P(P value > U value); 0.5 = no separation, both 0 and 1
            separate perfectly). Informational: computed on all images, not cross-fitted.
        n_published, n_unpublished (`int`): images the control compared.
        statistic (`float` or `None`), auc (`float` or `None`): of the control's held-out scores.
    """

    name: str
    fired: bool
    pvalue: float | None
    alpha: float
    reason: str
    separating: list[tuple[str, float]] = field(default_factory=list)
    n_published: int = 0
    n_unpublished: int = 0
    statistic: float | None = None
    auc: float | None = None

    def to_dict(self, top: int = 10) -> dict:
        from cdi_ray.stats.results import json_safe

        return json_safe({
            "name": self.name, "fired": self.fired, "pvalue": self.pvalue, "alpha": self.alpha, "reason": self.reason,
            "n_published": self.n_published, "n_unpublished": self.n_unpublished,
            "statistic": self.statistic, "auc": self.auc,
            "separating": [{"descriptor": d, "group": group_of(d) if d in DESCRIPTOR_NAMES else None, "auc": a}
                           for d, a in self.separating[:top]],
        })


def control_seed(seed: int, name: str = MODEL_FREE) -> int:
    """The seed a control uses for an audit with root ``seed``: derived, so the control's folds and
    permutations are independent of the main test's (which uses ``seed`` itself)."""
    tag = int.from_bytes(name.encode(), "little") % (1 << 32)
    return int(np.random.SeedSequence([int(seed), tag]).generate_state(1, dtype=np.uint32)[0])


def _auc(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import rankdata

    r = rankdata(np.r_[a, b])
    return float((r[: len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def separating_descriptors(desc_P: np.ndarray, desc_U: np.ndarray,
                           names: tuple[str, ...] = DESCRIPTOR_NAMES) -> list[tuple[str, float]]:
    """``(name, AUC)`` per descriptor, sorted by |AUC − 0.5| (best-separating first); constant ones dropped."""
    out = []
    for j, name in enumerate(names):
        a, b = desc_P[:, j], desc_U[:, j]
        if np.ptp(np.r_[a, b]) == 0:
            continue
        out.append((name, _auc(a, b)))
    out.sort(key=lambda t: (-abs(t[1] - 0.5), t[0]))
    return out


def _describe_top(separating: list[tuple[str, float]]) -> str:
    parts = [f"{d} (AUC {a:.2f}, {'higher' if a > 0.5 else 'lower'} in the published set)"
             for d, a in separating[:TOP_IN_REASON]]
    return ", ".join(parts) if parts else "no single descriptor"


def model_free_control(desc_P, desc_U, *, alpha: float = CONTROL_ALPHA, seed: int = 0,
                       names: tuple[str, ...] = DESCRIPTOR_NAMES, **options) -> ControlResult:
    """Run the calibrated default test on model-free descriptors of P and U.

    Args:
        desc_P (`array-like` of shape (n_P, d)): descriptors of the published images
            (:func:`cdi_ray.controls.descriptors.descriptor_matrix`).
        desc_U (`array-like` of shape (n_U, d)): descriptors of the unpublished images.
        alpha (`float`, *optional*, defaults to 0.05): the control fires when p ≤ alpha.
        seed (`int`, *optional*, defaults to 0): seed of the test's folds and permutations.
        names (`tuple[str, ...]`): column names (defaults to :data:`DESCRIPTOR_NAMES`).
        **options: options of the ``crossfit-permutation`` procedure (over :data:`CONTROL_TEST_OPTIONS`).

    Returns:
        :class:`ControlResult`. A control that cannot run returns ``fired=True`` with the reason.
    """
    from cdi_ray.stats import run_test

    P = np.asarray(desc_P, dtype=np.float64)
    U = np.asarray(desc_U, dtype=np.float64)
    options = {**CONTROL_TEST_OPTIONS, **options}
    try:
        res = run_test(P, U, procedure="crossfit-permutation", alpha=alpha, seed=seed, **options)
    except (ValueError, TypeError) as exc:
        return ControlResult(MODEL_FREE, True, None, alpha,
                             f"the model-free control could not be run ({exc}), so a distribution shift between the "
                             f"published and unpublished images cannot be ruled out",
                             n_published=len(P), n_unpublished=len(U))
    separating = separating_descriptors(P, U, names)
    p = float(res.pvalue)
    fired = p <= alpha
    if fired:
        reason = (f"image statistics alone, without the model, separate the published from the unpublished images "
                  f"(model-free control p = {p:.2g} ≤ {alpha:g}); most separating: {_describe_top(separating)}")
    else:
        reason = (f"image statistics alone do not separate the published from the unpublished images at level "
                  f"{alpha:g} (model-free control p = {p:.2g})")
    return ControlResult(MODEL_FREE, fired, p, alpha, reason, separating, len(P), len(U),
                         float(res.statistic), float(res.auc))

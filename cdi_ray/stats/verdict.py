"""From a test result to a plain-language verdict: ``used`` / ``not_detected`` / ``inconclusive``.

THE verdict policy of cdi-ray: this function is the only place verdicts are decided; the
pipeline (results.json / results.parquet), the CLI and the reports all call it. Explained for
readers in docs/VERDICTS.md.

A verdict may end up in an accusation, so "used" needs every condition below; anything odd
yields "inconclusive", which is a legitimate, calibrated answer rather than a failure. In short:
**used** only when the main test is significant after the batch's FDR control (``p_adjusted``),
the direction is P>U, the procedure is calibrated, both collections hold ≥ ``min_samples``
images, and no control fired (the distribution-shift guards, ``cdi_ray.controls``: the model-free
control runs by default in every audit — a manifest turns it off with
``controls: {model_free: false}`` — and the reference-model control runs when the manifest names
``controls: {reference_model: …}``).

Policy, in order (the first rule that applies decides):
  1. a control fired (a distribution-shift guard: P and U are separable without the model, or
     the guard could not be run) → inconclusive;
  2. no p-value (failed audit) → inconclusive;
  3. |P| or |U| below ``min_samples`` → inconclusive;
  4. P scores significantly LOWER than U (two-sided p ≤ α, unadjusted) → inconclusive:
     training on P does not make P look *less* like training data, so P and U differ in
     something else (or pair up, e.g. near-duplicates across P and U);
  5. the procedure is not calibrated (``paper-*``) and p ≤ α → inconclusive;
  6. p (adjusted, if given) ≤ α and direction P>U → used; for a standing audit re-tested every
     night (``lifelong``, :func:`cdi_ray.stats.sequential.next_look`) instead: its life-long rule
     may say ``used`` (its accumulated evidence crossed the boundary that keeps the chance of a
     ``used`` on ANY night ≤ α; docs/VERDICTS.md §5);
  7. otherwise → not_detected ("no evidence at this level", never "proof of non-use").

Minimum n (``MIN_SAMPLES`` = 50 per collection). The permutation p-value is exact at any
n, so this is not a calibration guard; it is an evidence-quality guard:
  * below 50 images one image is ≥ 2 % of a collection, so a single mislabelled,
    duplicated or corrupted image can carry the result;
  * the full feature set has k = 26 dimensions; with fewer than ~2k samples per collection the
    cross-fitted scorer is mostly noise and a small p-value more likely reflects a few
    outlying images than a consistent membership signal;
  * the smallest |P| at which the published method detects anything is 70 (METHOD.md), and the
    calibration simulations in this repository start at n = 50; a "used" below that would
    claim more than the method has been shown to support.
"""
from __future__ import annotations

import math
from typing import Iterable

from .results import TestResult, Verdict

__all__ = ["verdict", "MIN_SAMPLES"]

MIN_SAMPLES = 50


def _fmt(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _fired_reasons(controls) -> tuple[str, ...]:
    """Reasons of the controls that fired: strings are taken as fired; objects with ``fired`` and
    ``reason`` (e.g. ``cdi_ray.controls.ControlResult``) count only when ``fired``."""
    out = []
    for c in controls:
        if isinstance(c, str):
            out.append(c)
        elif getattr(c, "fired", False):
            out.append(str(getattr(c, "reason", None) or getattr(c, "name", "a control")))
    return tuple(out)


def verdict(result: TestResult, *, alpha: float | None = None, p_adjusted: float | None = None,
            min_samples: int = MIN_SAMPLES, controls: Iterable[str] = (), lifelong=None) -> Verdict:
    """Map a :class:`TestResult` to a :class:`Verdict` with a one-sentence reason.

    Args:
        result (`TestResult`): output of :func:`run_test`.
        alpha (`float`, *optional*): level; defaults to ``result.alpha``.
        p_adjusted (`float`, *optional*): this audit's p-value adjusted for a batch (e.g.
            ``benjamini_hochberg(...).adjusted[i]``); replaces ``result.pvalue`` in rule 6.
        min_samples (`int`, *optional*, defaults to 50): smallest |P| and |U| for a finding.
        controls (`iterable`, *optional*): controls of the audit — reasons (``str``) of controls
            that fired, or control results with ``fired``/``reason`` (e.g.
            :class:`cdi_ray.controls.ControlResult`, of which only fired ones count); any fired
            control → inconclusive.
        lifelong (`LookResult`, *optional*): tonight's decision of a standing audit's life-long rule
            (:func:`cdi_ray.stats.sequential.next_look`); replaces rule 6's ``p ≤ α`` (``alpha`` is
            then the audit's life-long level and ``p_adjusted`` is ignored).
    """
    alpha = float(result.alpha if alpha is None else alpha)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")
    controls = _fired_reasons(controls)
    adjusted = p_adjusted is not None
    p = float(result.pvalue if p_adjusted is None else p_adjusted)
    n_p, n_u = result.n_published, result.n_unpublished

    def out(label, reason):
        return Verdict(label=label, reason=reason, pvalue=None if math.isnan(p) else p, alpha=alpha, controls=controls)

    if controls:
        return out("inconclusive", f"A control fired ({'; '.join(controls)}), so a difference between the published "
                                   f"and unpublished images cannot be attributed to training on the published ones.")
    if math.isnan(p):
        return out("inconclusive", "The audit produced no p-value, so it says nothing either way.")
    if min(n_p, n_u) < min_samples:
        return out("inconclusive", f"Only {n_p} published and {n_u} unpublished images were compared; at least "
                                   f"{min_samples} of each are needed before the result can count as evidence.")
    p2 = result.pvalue_two_sided
    if result.direction == "P<U" and p2 <= alpha:
        return out("inconclusive", f"The published images look significantly LESS like training data than the "
                                   f"unpublished ones (two-sided p = {_fmt(p2)}), which training on them cannot "
                                   f"explain, so the two collections differ in some other way.")
    if not result.calibrated and p <= alpha:
        return out("inconclusive", f"The '{result.procedure}' procedure is known to report too many false "
                                   f"positives, so its p = {_fmt(p)} cannot support a finding; rerun with "
                                   f"'crossfit-permutation'.")
    if lifelong is not None:
        return _lifelong(out, lifelong, alpha)
    p_txt = f"p ≤ {_fmt(p)}" if result.p_at_floor and not adjusted else f"p = {_fmt(p)}"
    batch = " after adjusting for the batch of audits" if adjusted else ""
    if p <= alpha and result.direction == "P>U":
        return out("used", f"The published images score as more familiar to the model than comparable unpublished "
                           f"images ({p_txt}{batch}, at level {alpha:g}), which is evidence that the model was "
                           f"trained on at least part of them.")
    return out("not_detected", f"There is no evidence at level {alpha:g} that the model was trained on the published "
                               f"images ({p_txt}{batch}); this does not show that it was not.")


def _lifelong(out, look, alpha: float) -> Verdict:
    """Rule 6 for a standing audit: the life-long rule decides, and the sentence says how much α it has spent."""
    spent = f"α spent so far {look.alpha_spent:.3g} of {alpha:g}"
    if look.may_say_used:
        on = f"look {look.used_on_look}"
        return out("used", f"Over the audit's nightly looks the published images score as more familiar to the model "
                           f"than comparable unpublished images: the accumulated evidence crossed, on {on}, the "
                           f"boundary that keeps the chance of a false finding on any night at most {alpha:g} ({spent}), "
                           f"which is evidence that the model was trained on at least part of them.")
    if not look.look:
        return out("not_detected", f"The audit's life-long rule has not looked yet ({spent}); there is no evidence "
                                   f"either way so far.")
    return out("not_detected", f"After {look.look} nightly look(s) the accumulated evidence (nominal p = "
                               f"{_fmt(look.nominal_pvalue)}) does not reach the latest look's level {_fmt(look.level)} "
                               f"of the audit's life-long rule at {alpha:g} ({spent}); there is no evidence that the "
                               f"model was trained on the published images, which does not show that it was not.")

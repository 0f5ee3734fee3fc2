"""Nightly re-audits whose ``used`` is controlled over the audit's whole life, not per night.

A standing audit whose collections grow is tested again every night. Testing the whole
collection at α each night lets the chance that *some* night says ``used`` grow with the
number of nights (measured: 11–12 % within 30 nights at α = 0.01, ~40 % at α = 0.05). This
module keeps that chance ≤ α however many nights the audit runs (docs/VERDICTS.md, "Nightly
re-audits: controlled over the audit's life", which also records how the design was chosen).

Design ("first look + increment walk", chosen by measured power):

1. **First look** — the first night with enough images on both sides runs the ordinary test
   (``run_test``, any calibrated procedure) on the whole collection at the level α·g(E₁).
2. **Every later look** tests only the images that are new since the last look: a scorer
   fitted on every image already tested (the default scorer's sign-constrained direction when
   the first look uses it, else a ridge discriminant) scores the new ones, and an exact
   permutation test over the new images' labels gives a randomised p-value pₛ, which under H0
   is exactly Uniform(0, 1) and independent of the past (the scorer never saw the new labels).
   ζₛ = Φ⁻¹(1 − pₛ) is then exactly N(0, 1), so Sₜ = Σ wₛ·ζₛ is a Gaussian random walk with
   variance Iₜ = Σ wₛ². The weight wₛ = √nₛ · mₛ/(mₛ + m₀) (nₛ the look's effective sample
   size, mₛ the size of the past its scorer was fitted on) depends on sizes only, never on
   outcomes, and gives less say to increments scored by a scorer fitted on few images.
3. ``used`` when Sₜ crosses a group-sequential boundary bₜ computed by numerical recursion so
   that the walk's crossing probability up to look t is exactly α·(g(Eₜ) − g(E₁)).

The spending function g(E) = E / (E + τ), E the effective images tested so far (Σ over looks of
n_P·n_U/(n_P+n_U)), never reaches 1, so an audit can run for ever; half of α is spent once τ
effective images were tested. The first look and the walk split α (a union bound), so the probability that the audit
EVER says ``used`` under H0 is ≤ α·sup g < α — exactly, for any number of nights, increment
sizes and feature distribution, given that each night's new published and unpublished images
are exchangeable under H0. A ``used`` is final: later nights keep it and take no more looks.
A night with no new images (or fewer than ``min_new_per_side`` on a side: they wait) changes
nothing.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from scipy import stats as st

from .boundary import walk_boundary
from .directional import DEFAULT_PRIOR, resolve_directions
from .procedures import PROCEDURES, closed_form_permutations, run_test, validate_features

__all__ = ["SequentialDesign", "SequentialState", "Look", "LookResult", "next_look", "increment_pvalue",
           "spending", "STATE_SCHEMA"]

STATE_SCHEMA = "cdi-ray/sequential-state/1"
# Bound on the (chunk × new images) label matrix of the increment permutation test, in elements.
MAX_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class SequentialDesign:
    """Parameters of the nightly rule; stored in the state, so an audit keeps its design for life.

    Attributes:
        tau (`float`, defaults to 500): spending scale τ in effective images — α·I/(I+τ) is spent
            once I effective images were tested (+50 per side per night adds 25 a night).
            Chosen on tuning seeds (docs/VERDICTS.md, "Nightly re-audits").
        weight_half (`float`, defaults to 500): m₀, the past size (images per side) at which an
            increment's weight is halved; 0 weighs every effective image alike. Tuned likewise.
        min_new_per_side (`int`, defaults to 10): a look needs at least this many untested
            images on each side; fewer wait for a later night.
        procedure (`str`, defaults to ``"crossfit-permutation"``): the first look's test.
        options (`dict`): its options (``run_test(**options)``).
        ridge (`float`, defaults to 1.0): ρ of the increment scorer, (R + ρI)⁻¹·(mean_P − mean_U)
            on standardised features, R their correlation — or, when the first look uses the
            directional scorer (the default), (R + ρI)⁻¹·max(z + prior, 0) on member-oriented
            features with the audit's directions and prior. Chosen on tuning seeds.
        n_permutations (`int`, defaults to 1,999): permutations of each increment's labels.
    """

    tau: float = 500.0
    weight_half: float = 500.0
    min_new_per_side: int = 10
    procedure: str = "crossfit-permutation"
    options: dict = field(default_factory=dict)
    ridge: float = 1.0
    n_permutations: int = 1_999

    def __post_init__(self):
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be a positive number of effective images; got {self.tau!r}")
        if not (math.isfinite(self.weight_half) and self.weight_half >= 0):
            raise ValueError(f"weight_half must be ≥ 0 images; got {self.weight_half!r}")
        if int(self.min_new_per_side) < 2:
            raise ValueError(f"min_new_per_side must be ≥ 2; got {self.min_new_per_side!r}")
        if self.procedure not in PROCEDURES or not PROCEDURES[self.procedure].calibrated:
            calibrated = sorted(n for n, p in PROCEDURES.items() if p.calibrated)
            raise ValueError(f"procedure must be a calibrated procedure {calibrated}; got {self.procedure!r}")
        if not self.ridge >= 0 or int(self.n_permutations) < 99:
            raise ValueError(f"need ridge ≥ 0 and n_permutations ≥ 99; got {self.ridge!r}, {self.n_permutations!r}")


def spending(effective_images: float, tau: float) -> float:
    """g(E) = E / (E + τ): the share of α spent once ``effective_images`` were tested."""
    return float(effective_images) / (float(effective_images) + float(tau)) if effective_images > 0 else 0.0


def _effective_n(n_p: int, n_u: int) -> float:
    return n_p * n_u / (n_p + n_u)


@dataclass(frozen=True)
class Look:
    """One look of an audit (a night that tested new images), as stored in the state."""

    look: int
    label: str | None           # the caller's name for the night, e.g. its date
    n_new_published: int
    n_new_unpublished: int
    pvalue: float               # first look: run_test's p; later: the increment's randomised p
    effective_images: float     # Σ n_P·n_U/(n_P+n_U) of every look so far (drives α spending)
    information: float          # walk variance Σ w² after this look (0 for the first look)
    statistic: float            # walk sum S after this look (0 for the first look)
    boundary: float             # walk boundary b (first look: +inf, stored as None in JSON)
    level: float                # nominal level of tonight's decision
    nominal_pvalue: float       # p compared with ``level``: first look p; walk Φ̄(S/√I)
    alpha_spent: float          # α·g(effective_images) after this look
    used: bool


@dataclass(frozen=True)
class SequentialState:
    """Everything the next night needs; store it next to the nightly results (``to_json``)."""

    alpha: float
    seed: int
    design: SequentialDesign
    n_features: int
    looks: tuple[Look, ...] = ()
    tested_published: frozenset = frozenset()
    tested_unpublished: frozenset = frozenset()

    @property
    def used_on_look(self) -> int | None:
        return next((lk.look for lk in self.looks if lk.used), None)

    @property
    def alpha_spent(self) -> float:
        return self.looks[-1].alpha_spent if self.looks else 0.0

    def to_json(self) -> str:
        d = {"schema": STATE_SCHEMA, "alpha": self.alpha, "seed": self.seed, "design": asdict(self.design),
             "n_features": self.n_features,
             "looks": [{**asdict(lk), "boundary": lk.boundary if math.isfinite(lk.boundary) else None}
                       for lk in self.looks],
             "tested_published": sorted(self.tested_published), "tested_unpublished": sorted(self.tested_unpublished)}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SequentialState:
        d = json.loads(text)
        if d.get("schema") != STATE_SCHEMA:
            raise ValueError(f"not a sequential-audit state (schema {d.get('schema')!r}, expected {STATE_SCHEMA!r})")
        looks = tuple(Look(**{**lk, "boundary": math.inf if lk["boundary"] is None else lk["boundary"]})
                      for lk in d["looks"])
        return cls(alpha=d["alpha"], seed=d["seed"], design=SequentialDesign(**d["design"]),
                   n_features=d["n_features"], looks=looks, tested_published=frozenset(d["tested_published"]),
                   tested_unpublished=frozenset(d["tested_unpublished"]))


@dataclass(frozen=True)
class LookResult:
    """Tonight's answer.

    Attributes:
        may_say_used (`bool`): the audit may say ``used`` (tonight or on an earlier look; final).
        took_look (`bool`): tonight tested new images (False: nothing changed).
        look (`int`): looks taken so far (0 before the first).
        level (`float`): nominal level of the latest look; ``used`` ⇔ ``nominal_pvalue ≤ level``
            on that look (or on an earlier one).
        nominal_pvalue (`float` or `None`): the accumulated evidence as a nominal p-value.
        alpha (`float`): the audit's life-long level.
        alpha_spent (`float`): the part of α spent so far (never more than α).
        used_on_look (`int` or `None`): the look that crossed the boundary.
        reason (`str`): one sentence for the report.
        look_record (`Look` or `None`): the latest look in full.
    """

    may_say_used: bool
    took_look: bool
    look: int
    level: float
    nominal_pvalue: float | None
    alpha: float
    alpha_spent: float
    used_on_look: int | None
    reason: str
    look_record: Look | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.look_record is not None and not math.isfinite(self.look_record.boundary):
            d["look_record"]["boundary"] = None
        return d


# --------------------------------------------------------------------------------------
# The increment test: scorer fitted on the tested past, exact randomised permutation p-value
# --------------------------------------------------------------------------------------
def increment_pvalue(past_published, past_unpublished, new_published, new_unpublished, *, ridge: float = 1.0,
                     n_permutations: int = 1_999, seed=0, directions=None, prior: float = 0.0) -> float:
    """Randomised permutation p-value for "the new published images score higher".

    A scorer is fitted on the past images (any function of the past is allowed): with
    ``directions`` None, the ridge discriminant (R + ρI)⁻¹·(mean_P − mean_U) on standardised
    features; with ``directions`` (per feature −1 lower = member, +1 higher, 0 unknown: as the
    default scorer's, :mod:`cdi_ray.stats.directional`), the default scorer's sign-constrained
    direction (R + ρI)⁻¹·max(z + prior, 0) on member-oriented features, so a feature that moved
    against its member direction in the past gets no weight. The statistic is the sum of the new
    published images' scores; ``n_permutations`` uniform relabellings of the new images give
    p = (#{T_b > T} + U·(1 + #{T_b = T}))/(B + 1) with U ~ Uniform(0, 1], which is exactly
    Uniform(0, 1) under exchangeability of the new images (and never 0 or 1, so Φ⁻¹(1 − p) is
    finite).
    """
    rng = np.random.default_rng(seed)
    X_past = np.vstack([past_published, past_unpublished])
    mu, sd = X_past.mean(axis=0), X_past.std(axis=0)
    sd = np.where(sd > 1e-12 * (np.abs(mu) + 1.0), sd, 1.0)
    sign = np.ones(X_past.shape[1]) if directions is None else np.where(np.asarray(directions) == 0, 1.0, directions)
    Zp, Zu = sign * (past_published - mu) / sd, sign * (past_unpublished - mu) / sd
    Z = sign * (X_past - mu) / sd
    R = Z.T @ Z / len(Z)
    shift = Zp.mean(axis=0) - Zu.mean(axis=0)
    if directions is not None:  # the default scorer's weights: z-scores, sign-constrained where the direction is known
        z = shift / math.sqrt(1 / len(Zp) + 1 / len(Zu))
        shift = np.where(np.asarray(directions) != 0, np.maximum(z + prior, 0.0), z)
    w = np.linalg.solve(R + ridge * np.eye(len(R)), shift)
    s = sign * (np.vstack([new_published, new_unpublished]) - mu) / sd @ w
    labels = np.r_[np.ones(len(new_published)), np.zeros(len(new_unpublished))]
    t_obs = float(labels @ s)
    tol = 1e-9 * max(1.0, float(np.abs(s).sum()))
    above = ties = 0
    chunk = max(1, MAX_CHUNK_ELEMENTS // len(s))
    for start in range(0, n_permutations, chunk):
        size = min(chunk, n_permutations - start)
        t = rng.permuted(np.broadcast_to(labels, (size, len(s))), axis=1) @ s
        above += int((t > t_obs + tol).sum())
        ties += int((np.abs(t - t_obs) <= tol).sum())
    u = 1.0 - rng.random()  # (0, 1]
    return (above + u * (1 + ties)) / (n_permutations + 1)


# --------------------------------------------------------------------------------------
# The nightly entry point
# --------------------------------------------------------------------------------------
def _row_keys(X: np.ndarray) -> list[str]:
    """Content keys of feature rows (an image's features are fixed by its content and the model)."""
    X = np.ascontiguousarray(X, dtype=np.float64)
    return [hashlib.sha1(row.tobytes()).hexdigest()[:20] for row in X]


def _check_keys(keys, X, name):
    keys = _row_keys(X) if keys is None else [str(k) for k in keys]
    if len(keys) != len(X):
        raise ValueError(f"{name}_keys has {len(keys)} entries for {len(X)} rows of {name} features; "
                         f"pass one key (e.g. the image's content hash) per row")
    return keys


def _look_seed(seed: int, look: int) -> int:
    return int(np.random.SeedSequence([seed, look, 0x5E9]).generate_state(1)[0])


def _result(state: SequentialState, took_look: bool, reason: str) -> LookResult:
    last = state.looks[-1] if state.looks else None
    return LookResult(may_say_used=state.used_on_look is not None, took_look=took_look, look=len(state.looks),
                      level=last.level if last else 0.0, nominal_pvalue=last.nominal_pvalue if last else None,
                      alpha=state.alpha, alpha_spent=state.alpha_spent, used_on_look=state.used_on_look,
                      reason=reason, look_record=last)


def _first_look_options(design: SequentialDesign, level: float) -> dict:
    """Enough permutations for a closed-form test (the default's directional or ridge scorer) to resolve
    p ≤ level (its floor is 1/(B+1)); the logistic scorer refits per permutation, so its cap stays the user's."""
    opts = dict(design.options)
    if closed_form_permutations(design.procedure, opts) and "max_permutations" not in opts:
        h = int(opts.get("stop_exceedances", PROCEDURES[design.procedure].defaults["stop_exceedances"]))
        opts["max_permutations"] = max(9_999, int(math.ceil(2 * h / level)))
    return opts


def _increment_scorer(design: SequentialDesign, k: int) -> dict:
    """The increment scorer follows the first look's: the default scorer's sign-constrained direction
    (with the audit's directions and prior) when the first look uses the directional scorer, else the
    ridge discriminant; either with the increments' own ρ, ``design.ridge``."""
    opts = design.options
    if design.procedure == "crossfit-permutation" \
            and opts.get("scorer", PROCEDURES[design.procedure].defaults["scorer"]) == "directional":
        return {"directions": resolve_directions(opts.get("directions") or "lower", k), "ridge": design.ridge,
                "prior": float(opts["prior"]) if opts.get("prior") is not None else DEFAULT_PRIOR}
    return {"ridge": design.ridge}


def next_look(state: SequentialState | None, published_features, unpublished_features, *, alpha: float, seed: int,
              design: SequentialDesign | None = None, published_keys=None, unpublished_keys=None,
              label: str | None = None) -> tuple[LookResult, SequentialState]:
    """Tonight's life-long-controlled decision for one standing audit, and the state for tomorrow.

    Args:
        state (`SequentialState` or `None`): yesterday's state (``SequentialState.from_json``);
            ``None`` starts the audit.
        published_features, unpublished_features (`array-like` of shape (n, k)): the WHOLE
            current collections (old and new images); rows already tested are recognised by key.
        alpha (`float`): the audit's life-long level; must equal the state's.
        seed (`int`): the audit's root seed; must equal the state's (tonight's seed derives from it).
        design (`SequentialDesign`, *optional*): only for a new audit (default: ``SequentialDesign()``).
        published_keys, unpublished_keys (`sequence of str`, *optional*): one key per row, e.g.
            image content hashes; default: a hash of the row's features.
        label (`str`, *optional*): the night's name (e.g. its date), stored with the look.

    Returns:
        (:class:`LookResult`, :class:`SequentialState`). When nothing new can be tested the
        state is returned unchanged (the same object) with the previous decision.
    """
    P, U = validate_features(published_features, unpublished_features, min_per_group=0)
    kp, ku = _check_keys(published_keys, P, "published"), _check_keys(unpublished_keys, U, "unpublished")
    if state is None:
        if not 0 < alpha < 1 or isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"need 0 < alpha < 1 and an integer seed ≥ 0; got alpha={alpha!r}, seed={seed!r}")
        state = SequentialState(alpha=float(alpha), seed=int(seed), design=design or SequentialDesign(),
                                n_features=P.shape[1])
    else:
        for name, given, stored in (("alpha", alpha, state.alpha), ("seed", seed, state.seed),
                                    ("design", design if design is not None else state.design, state.design),
                                    ("number of features", P.shape[1], state.n_features)):
            if given != stored:
                raise ValueError(f"{name} {given!r} differs from the audit's state ({stored!r}); a standing audit "
                                 f"keeps its level, seed, design and features for life — start a new audit instead")
    d = state.design
    if state.used_on_look is not None:
        return _result(state, False, f"The audit crossed its life-long boundary on look {state.used_on_look}; "
                                     f"the finding stands."), state
    new_p = np.array([k not in state.tested_published for k in kp], dtype=bool)
    new_u = np.array([k not in state.tested_unpublished for k in ku], dtype=bool)
    if min(new_p.sum(), new_u.sum()) < d.min_new_per_side:
        why = ("no new images" if not (new_p.any() or new_u.any()) else
               f"only {new_p.sum()} new published and {new_u.sum()} new unpublished images (a look needs "
               f"{d.min_new_per_side} of each; they wait for a later night)")
        return _result(state, False, f"Nothing was tested tonight ({why}); the decision is unchanged."), state

    t = len(state.looks) + 1
    looks_seed = _look_seed(state.seed, t)
    n_new_p, n_new_u = int(new_p.sum()), int(new_u.sum())
    n_eff = _effective_n(n_new_p, n_new_u)
    if t == 1:  # the first look: the ordinary test on the whole collection at level α·g(E₁)
        level = state.alpha * spending(n_eff, d.tau)
        res = run_test(P[new_p], U[new_u], procedure=d.procedure, alpha=level, seed=looks_seed,
                       **_first_look_options(d, level))
        p = nominal = float(res.pvalue)
        used = p <= level and res.direction == "P>U"
        info_walk, S, b, effective = 0.0, 0.0, math.inf, n_eff
    else:  # a later look: the new images' evidence joins the walk
        first, walk = state.looks[0], state.looks[1:]
        if min((~new_p).sum(), (~new_u).sum()) < 2:
            raise ValueError("the images tested on earlier nights are missing from tonight's collections (fewer than "
                             "2 per side remain); a standing audit's collections may grow, not be replaced — "
                             "start a new audit for new collections")
        p = increment_pvalue(P[~new_p], U[~new_u], P[new_p], U[new_u], n_permutations=d.n_permutations,
                             seed=looks_seed, **_increment_scorer(d, P.shape[1]))
        past = 2 * _effective_n(int((~new_p).sum()), int((~new_u).sum()))  # = images per side when balanced
        w = math.sqrt(n_eff) * (past / (past + d.weight_half) if d.weight_half > 0 else 1.0)
        info_walk = (walk[-1].information if walk else 0.0) + w * w
        S = (walk[-1].statistic if walk else 0.0) + w * float(st.norm.isf(p))
        effective = state.looks[-1].effective_images + n_eff
        target = state.alpha * (spending(effective, d.tau) - spending(first.effective_images, d.tau))
        b, _ = walk_boundary([lk.information for lk in walk] + [info_walk], [lk.boundary for lk in walk], target)
        level = float(st.norm.sf(b / math.sqrt(info_walk)))
        nominal = float(st.norm.sf(S / math.sqrt(info_walk)))
        used = S >= b
    look = Look(look=t, label=label, n_new_published=n_new_p, n_new_unpublished=n_new_u, pvalue=float(p),
                effective_images=effective, information=info_walk, statistic=S, boundary=b, level=level,
                nominal_pvalue=nominal, alpha_spent=state.alpha * spending(effective, d.tau), used=bool(used))
    new_state = replace(state, looks=state.looks + (look,),
                        tested_published=state.tested_published | {k for k, n in zip(kp, new_p) if n},
                        tested_unpublished=state.tested_unpublished | {k for k, n in zip(ku, new_u) if n})
    verb = "may say used" if used else "may not say used"
    reason = (f"Look {t}: {n_new_p} new published and {n_new_u} new unpublished images tested; the accumulated "
              f"evidence (nominal p = {nominal:.2g}) {'reaches' if used else 'does not reach'} tonight's level "
              f"{level:.2g}, so the audit {verb}; α spent so far {look.alpha_spent:.3g} of {state.alpha:g}.")
    return _result(new_state, True, reason), new_state

"""Nightly re-audits controlled over the audit's life (cdi_ray/stats/sequential.py).

Properties: the any-night false-``used`` rate of whole histories is ≤ α; each increment's
p-value is exactly uniform under H0 and the walk's boundaries spend exactly what they claim;
determinism given the seed; nights with nothing new change nothing; the state survives JSON;
α spent is monotone and never exceeds α. The 1,000-history measurement is jobs/nightly_simulation.py.
"""
import math

import numpy as np
import pytest
from scipy import stats as st

from cdi_ray.stats import boundary
from cdi_ray.stats import sequential as sq
from cdi_ray.stats.boundary import walk_boundary
from cdi_ray.stats.sequential import SequentialDesign, SequentialState, increment_pvalue, next_look

K = 4
# cheap histories: +20 images per side per night, 4 features, few permutations (exact for any count)
CHEAP = SequentialDesign(tau=50.0, n_permutations=199, options={"max_permutations_reverse": 9})


def _history(rng, nights, per_night=20, k=K, delta=0.0):
    P, U = np.empty((0, k)), np.empty((0, k))
    for _ in range(nights):
        new_p = rng.standard_normal((per_night, k))
        new_p[:, 0] -= delta
        P, U = np.vstack([P, new_p]), np.vstack([U, rng.standard_normal((per_night, k))])
        yield P, U


def _run(seed, nights, alpha, design=CHEAP, delta=0.0):
    rng = np.random.default_rng([seed, 99])
    state, results = None, []
    for night, (P, U) in enumerate(_history(rng, nights, delta=delta), 1):
        res, state = next_look(state, P, U, alpha=alpha, seed=seed, design=design, label=str(night))
        results.append(res)
    return results, state


def test_any_night_false_used_rate_is_at_most_alpha():
    alpha, n_hist, nights = 0.05, 300, 8
    used, spent = 0, None
    for h in range(n_hist):
        results, state = _run(h, nights, alpha)
        used += results[-1].may_say_used
        spent = state.alpha_spent
    # the design spends α·g(I) < α; the rate must not exceed even that, within a 99 % interval
    assert spent < alpha
    ci = st.binomtest(used, n_hist).proportion_ci(confidence_level=0.99, method="exact")
    assert ci.low <= spent, (used, n_hist, spent)


@pytest.mark.slow
def test_per_night_testing_exceeds_alpha_where_the_rule_does_not():
    """The problem the rule solves, on the same cheap histories: testing the whole collection at α
    every night says `used` on some night far more often than α."""
    from cdi_ray.stats import run_test

    alpha, n_hist, nights = 0.05, 300, 8
    per_night = sequential = 0
    for h in range(n_hist):
        rng = np.random.default_rng([h, 99])
        per_night += any(run_test(P, U, alpha=alpha, seed=h, max_permutations=199).pvalue <= alpha
                         for P, U in _history(rng, nights))
        sequential += _run(h, nights, alpha)[0][-1].may_say_used
    assert st.binomtest(per_night, n_hist, alpha, alternative="greater").pvalue < 1e-6
    assert st.binomtest(sequential, n_hist, alpha, alternative="greater").pvalue > 0.05


@pytest.mark.parametrize("scorer", [{}, {"directions": np.array([-1, -1, 0, 1]), "ridge": 0.1}],
                         ids=["ridge", "directional"])
def test_increment_pvalue_is_uniform_under_h0(scorer):
    rng = np.random.default_rng(5)
    p = np.array([increment_pvalue(rng.standard_normal((30, K)), rng.standard_normal((25, K)),
                                   rng.standard_normal((12, K)), rng.standard_normal((9, K)),
                                   n_permutations=99, seed=i, **scorer) for i in range(1500)])
    assert 0 < p.min() and p.max() < 1
    assert st.kstest(p, "uniform").pvalue > 1e-3
    for a in (0.01, 0.05, 0.2):  # exact, not only valid: the rate at a is a within a 99.9 % interval
        ci = st.binomtest(int((p <= a).sum()), len(p)).proportion_ci(confidence_level=0.999)
        assert ci.low <= a <= ci.high


def test_increment_pvalue_detects_a_shift_in_the_scored_direction():
    rng = np.random.default_rng(6)
    P, U = rng.standard_normal((200, K)), rng.standard_normal((200, K))
    P[:, 0] += 1.0
    new_p, new_u = rng.standard_normal((50, K)), rng.standard_normal((50, K))
    assert increment_pvalue(P, U, new_p + [1.5, 0, 0, 0], new_u, seed=0) < 0.001
    assert increment_pvalue(P, U, new_p - [1.5, 0, 0, 0], new_u, seed=0) > 0.999


def test_directional_increments_give_no_weight_to_a_shift_against_the_member_direction():
    """The default scorer's increments (lower = member) read a past shift the wrong way as no evidence:
    the learned ridge would carry it into the walk; the sign-constrained direction does not."""
    rng = np.random.default_rng(7)
    P, U = rng.standard_normal((200, K)), rng.standard_normal((200, K))
    P[:, 0] += 1.0  # P's loss HIGHER: training cannot explain it
    new_p, new_u = rng.standard_normal((50, K)) + [1.0, 0, 0, 0], rng.standard_normal((50, K))
    lower = np.full(K, -1)
    assert increment_pvalue(P, U, new_p, new_u, seed=0) < 0.001
    assert increment_pvalue(P, U, new_p, new_u, seed=0, directions=lower, ridge=0.1) > 0.01
    # and a shift in the member direction is found as by the ridge
    assert increment_pvalue(P - [2.0, 0, 0, 0], U, new_p - [2.0, 0, 0, 0], new_u, seed=0, directions=lower,
                            ridge=0.1) < 0.001


def test_the_increment_scorer_follows_the_first_looks():
    assert "directions" in sq._increment_scorer(SequentialDesign(), K)  # the default: directional
    assert sq._increment_scorer(SequentialDesign(options={"scorer": "ridge"}, ridge=2.0), K) == {"ridge": 2.0}
    d = sq._increment_scorer(SequentialDesign(options={"directions": "higher", "ridge": 0.5}, ridge=3.0), K)
    assert d["ridge"] == 3.0 and (d["directions"] == 1).all()


def test_walk_boundaries_spend_what_they_claim():
    info = np.cumsum([25.0, 25.0, 100.0, 5.0, 25.0, 400.0, 25.0, 25.0])
    targets = 0.05 * np.array([sq.spending(i, 300.0) for i in info])
    bounds = []
    for t in range(len(info)):
        b, spent_before = walk_boundary(info[: t + 1], bounds, targets[t])
        assert spent_before == pytest.approx(targets[t - 1] if t else 0.0, rel=1e-7, abs=1e-12)
        bounds.append(b)
    assert bounds[0] == pytest.approx(math.sqrt(info[0]) * st.norm.isf(targets[0]))
    rng = np.random.default_rng(11)
    walks = np.cumsum(rng.standard_normal((400_000, len(info))) * np.sqrt(np.diff(np.r_[0, info])), axis=1)
    crossed = np.maximum.accumulate(walks >= np.array(bounds), axis=1).mean(axis=0)
    se = np.sqrt(targets * (1 - targets) / len(walks))
    assert np.all(np.abs(crossed - targets) <= 4 * se), (crossed, targets)


def test_walk_boundary_grid_is_fine_enough(monkeypatch):
    info, target = [25.0, 50.0, 75.0, 80.0, 105.0], 0.01
    def all_bounds():
        bs = []
        for t in range(len(info)):
            bs.append(walk_boundary(info[: t + 1], bs, target * (t + 1) / len(info))[0])
        return np.array(bs)
    coarse = all_bounds()
    monkeypatch.setattr(boundary, "GRID_PER_SD", 2 * boundary.GRID_PER_SD)
    boundary._walk_boundary.cache_clear()
    fine = all_bounds()
    boundary._walk_boundary.cache_clear()
    np.testing.assert_allclose(coarse, fine, rtol=1e-6)


def test_deterministic_given_seed():
    a = _run(3, 5, 0.05)[1].to_json()
    assert a == _run(3, 5, 0.05)[1].to_json()
    assert a != _run(4, 5, 0.05)[1].to_json()


def test_no_new_images_change_nothing():
    rng = np.random.default_rng(2)
    (P, U), = list(_history(rng, 1, per_night=40))
    res, state = next_look(None, P, U, alpha=0.05, seed=1, design=CHEAP)
    assert res.took_look and res.look == 1
    again, same = next_look(state, P[::-1], U[::-1], alpha=0.05, seed=1)  # same images, any order
    assert same is state and not again.took_look and again.look == 1
    assert (again.may_say_used, again.level, again.nominal_pvalue, again.alpha_spent) == \
           (res.may_say_used, res.level, res.nominal_pvalue, res.alpha_spent)
    # too few new images on one side: they wait, nothing is spent, and they are tested later
    P2 = np.vstack([P, rng.standard_normal((30, K))])
    U2 = np.vstack([U, rng.standard_normal((3, K))])
    wait, same2 = next_look(state, P2, U2, alpha=0.05, seed=1)
    assert same2 is state and not wait.took_look and "wait" in wait.reason
    U3 = np.vstack([U2, rng.standard_normal((20, K))])
    later, state3 = next_look(state, P2, U3, alpha=0.05, seed=1)
    assert later.took_look and state3.looks[-1].n_new_published == 30 and state3.looks[-1].n_new_unpublished == 23


def test_state_json_round_trip_continues_identically():
    results, state = _run(8, 4, 0.01)
    back = SequentialState.from_json(state.to_json())
    assert back == state and back.to_json() == state.to_json()
    rng = np.random.default_rng([8, 99])
    P, U = list(_history(rng, 5))[-1]
    r1, s1 = next_look(state, P, U, alpha=0.01, seed=8)
    r2, s2 = next_look(back, P, U, alpha=0.01, seed=8)
    assert r1 == r2 and s1.to_json() == s2.to_json()


def test_alpha_spending_is_monotone_and_below_alpha():
    rng = np.random.default_rng(9)
    alpha, state, spent, levels = 0.01, None, [], []
    P, U = rng.standard_normal((40, K)), rng.standard_normal((60, K))
    design = SequentialDesign(tau=200.0, n_permutations=99)
    for night in range(40):
        res, state = next_look(state, P, U, alpha=alpha, seed=0, design=design)
        if res.took_look:
            spent.append(res.alpha_spent)
            levels.append(res.level)
        n_new = [0, 10, 15, 80][night % 4]  # uneven nights, some with nothing new
        P = np.vstack([P, rng.standard_normal((n_new, K))])
        U = np.vstack([U, rng.standard_normal((n_new + 3, K))])
    assert len(spent) >= 25
    assert np.all(np.diff(spent) > 0) and spent[-1] < alpha
    assert all(0 < lv < alpha for lv in levels)


def test_a_real_shift_is_found_and_used_is_final():
    results, state = _run(1, 8, 0.01, delta=1.0)
    first = next(i for i, r in enumerate(results) if r.may_say_used)
    assert first < 4
    assert all(r.may_say_used and r.used_on_look == results[first].used_on_look for r in results[first:])
    assert not any(r.took_look for r in results[first + 1:])


def test_the_audit_keeps_its_level_seed_and_design():
    results, state = _run(2, 2, 0.05)
    P, U = np.ones((50, K)), np.zeros((50, K))
    with pytest.raises(ValueError, match="alpha"):
        next_look(state, P, U, alpha=0.01, seed=2)
    with pytest.raises(ValueError, match="seed"):
        next_look(state, P, U, alpha=0.05, seed=3)
    with pytest.raises(ValueError, match="design"):
        next_look(state, P, U, alpha=0.05, seed=2, design=SequentialDesign(tau=10.0))
    with pytest.raises(ValueError, match="features"):
        next_look(state, np.ones((50, K + 1)), np.zeros((50, K + 1)), alpha=0.05, seed=2)
    with pytest.raises(ValueError, match="calibrated"):
        SequentialDesign(procedure="paper-two-sided")
    with pytest.raises(ValueError, match="keys"):
        next_look(None, P, U, alpha=0.05, seed=2, published_keys=["a"])


def test_the_verdict_of_a_standing_audit_is_its_life_long_rule():
    """Rule 6 is replaced by the life-long decision; rules 1–5 still apply."""
    from cdi_ray.stats import run_test, verdict

    rng = np.random.default_rng(3)
    P, U = rng.standard_normal((60, K)) - [0.6, 0, 0, 0], rng.standard_normal((60, K))
    r = run_test(P, U, alpha=0.05, seed=0, max_permutations=199)
    assert r.pvalue <= 0.05 and verdict(r, alpha=0.05).label == "used"
    look, _ = next_look(None, P, U, alpha=0.05, seed=0, design=SequentialDesign(n_permutations=199))
    assert not look.may_say_used  # tonight's first look spends only α·g(E₁)
    v = verdict(r, alpha=0.05, lifelong=look)
    assert v.label == "not_detected" and "α spent so far" in v.reason
    used = sq.LookResult(True, False, 3, 0.001, 0.0004, 0.05, 0.02, 2, "crossed")
    assert verdict(r, alpha=0.05, lifelong=used).label == "used"
    assert verdict(r, alpha=0.05, lifelong=used, controls=["shift"]).label == "inconclusive"
    assert verdict(r, alpha=0.05, lifelong=used, min_samples=100).label == "inconclusive"

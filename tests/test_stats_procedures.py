"""run_test: input validation, determinism, result objects, and each scorer against a plain re-implementation."""
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from scipy import stats as st
from sklearn.model_selection import KFold

from cdi_ray.stats import PROCEDURES, crossfit_scores, logistic_pipeline, run_test
from cdi_ray.stats.results import TestResult as _Result
from cdi_ray.stats.permutation import LogisticCrossFit, RidgeCrossFit, auto_block_size, welch_t


def _data(n_p=60, n_u=45, k=5, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    P = rng.standard_normal((n_p, k)) - shift
    U = rng.standard_normal((n_u, k))
    return P, U


# ------------------------------------------------------------------ validation
def test_nan_rows_name_the_input_and_the_fix():
    P, U = _data()
    U[[3, 7]] = np.nan
    U[9, 0] = np.inf
    with pytest.raises(ValueError, match=r"unpublished has 3 row\(s\).*\[3, 7, 9\].*drop them"):
        run_test(P, U)


def test_mismatched_features_and_shapes():
    P, U = _data()
    with pytest.raises(ValueError, match="published has 5 features per sample but unpublished has 4"):
        run_test(P, U[:, :4])
    with pytest.raises(ValueError, match=r"reshape\(-1, 1\)"):
        run_test(P[:, 0], U)
    with pytest.raises(TypeError, match="published must be a numeric array"):
        run_test([["a", "b"]], U)


def test_too_few_samples():
    P, U = _data()
    with pytest.raises(ValueError, match="unpublished has 1 samples"):
        run_test(P, U[:1])
    with pytest.raises(ValueError, match="too small for n_splits=5"):
        run_test(P[:3], U[:3])
    with pytest.raises(ValueError, match="splits each collection into n_splits=5"):
        run_test(P[:4], U, procedure="paper-one-sided")


def test_unknown_procedure_and_option_list_valid_ones():
    P, U = _data()
    with pytest.raises(ValueError, match=r"valid procedures: \['crossfit-permutation', 'paper-one-sided', "
                                         r"'paper-two-sided', 'split'\]"):
        run_test(P, U, procedure="paper")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['n_permutations'\].*valid options"):
        run_test(P, U, n_permutations=10)
    with pytest.raises(ValueError, match="alpha must be in"):
        run_test(P, U, alpha=1.5)


def test_registry_flags_calibration():
    assert set(PROCEDURES) == {"crossfit-permutation", "split", "paper-one-sided", "paper-two-sided"}
    assert PROCEDURES["crossfit-permutation"].calibrated and PROCEDURES["split"].calibrated
    assert not PROCEDURES["paper-one-sided"].calibrated and not PROCEDURES["paper-two-sided"].calibrated


# ------------------------------------------------------------------ results and determinism
@pytest.mark.parametrize("procedure", sorted(PROCEDURES))
def test_result_object_and_determinism(procedure):
    P, U = _data(shift=0.2)
    a = run_test(P, U, procedure=procedure, seed=3)
    b = run_test(P, U, procedure=procedure, seed=3)
    assert isinstance(a, _Result) and a.procedure == procedure
    assert a.to_dict(include_scores=True) == b.to_dict(include_scores=True)
    d = a.to_dict()
    json.dumps(d, allow_nan=False)
    assert "scores_published" not in d
    assert (a.n_published, a.n_unpublished, a.alpha, a.seed) == (60, 45, 0.01, 3)
    assert 0 < a.pvalue <= 1 and 0 < a.pvalue_reverse <= 1
    if procedure == "crossfit-permutation":  # directional: which of "P looks like training data" and its reverse is larger
        assert a.direction == ("P>U" if a.statistic > a.options["statistic_reverse"] else "P<U")
    else:
        assert a.direction == ("P>U" if a.statistic > 0 else "P<U")
    assert len(a.scores_published) > 0 and len(a.scores_unpublished) > 0
    with pytest.raises(AttributeError):
        a.pvalue = 0.5  # frozen


def test_seed_changes_the_permutations():
    P, U = _data(shift=0.1)
    r = [run_test(P, U, seed=s) for s in range(4)]
    assert len({x.options["n_drawn"] for x in r} | {x.pvalue for x in r}) > 1


def test_sequential_stopping_is_cheap_under_the_null():
    P, U = _data(200, 200, 26, seed=1)
    res = run_test(P, U)
    assert res.n_permutations < 1000 and res.options["n_drawn"] < 2000
    assert res.p_tail_estimate is not None and not res.p_at_floor


# ------------------------------------------------------------------ scorers against plain code
def test_ridge_engine_matches_a_plain_implementation():
    P, U = _data(70, 55, 6, seed=2, shift=0.3)
    eng = RidgeCrossFit(P, U, n_splits=5, ridge=0.7, block_size=1, rng=np.random.default_rng(0))
    sp, su = eng.observed_scores()
    X, y = np.vstack([P, U]), np.r_[np.ones(70), np.zeros(55)]
    s = np.empty(len(X))
    for f in range(5):
        te = eng.row_fold == f
        tr = ~te
        mu, sd = X[tr].mean(0), X[tr].std(0)
        Z = (X[tr] - mu) / sd
        w = np.linalg.solve(Z.T @ Z / tr.sum() + 0.7 * np.eye(6), Z.T @ (y[tr] - y[tr].mean()) / tr.sum())
        w /= (Z @ w).std()  # unit score variance on the training fold
        s[te] = ((X[te] - mu) / sd) @ w
    np.testing.assert_allclose(np.r_[sp, su], s, atol=1e-10)
    t_plain = np.sqrt(70 * 55 / 125) * (s[:70].mean() - s[70:].mean())
    assert eng.statistic(eng.observed_labels())[0] == pytest.approx(t_plain, rel=1e-10)
    # a permuted label vector gives the statistic of the plain pipeline on those labels
    Y = eng.draw_labels(1)
    yb = Y[0][eng.row_unit]
    s2 = np.empty(len(X))
    for f in range(5):
        te = eng.row_fold == f
        tr = ~te
        mu, sd = X[tr].mean(0), X[tr].std(0)
        Z = (X[tr] - mu) / sd
        w = np.linalg.solve(Z.T @ Z / tr.sum() + 0.7 * np.eye(6), Z.T @ (yb[tr] - yb[tr].mean()) / tr.sum())
        w /= (Z @ w).std()
        s2[te] = ((X[te] - mu) / sd) @ w
    t2 = np.sqrt(70 * 55 / 125) * (s2[yb == 1].mean() - s2[yb == 0].mean())
    assert eng.statistic(Y)[0] == pytest.approx(t2, rel=1e-9)


def test_ridge_fold_repeats_average_plain_cross_fits():
    """R fold assignments: the statistic is the mean of the R single-assignment statistics."""
    P, U = _data(50, 40, 4, seed=8, shift=0.3)
    eng = RidgeCrossFit(P, U, n_splits=4, ridge=0.5, block_size=1, fold_repeats=3, rng=np.random.default_rng(2))
    X, Y = np.vstack([P, U]), np.vstack([eng.observed_labels(), eng.draw_labels(2)])
    for b in range(len(Y)):
        y = Y[b][eng.row_unit]
        ts = []
        for folds in eng.folds:
            s = np.empty(len(X))
            for idx in folds:
                te = np.isin(eng.row_unit, np.arange(eng.n_units)[idx])
                tr = ~te
                mu, sd = X[tr].mean(0), X[tr].std(0)
                Z = (X[tr] - mu) / sd
                w = np.linalg.solve(Z.T @ Z / tr.sum() + 0.5 * np.eye(4), Z.T @ (y[tr] - y[tr].mean()) / tr.sum())
                w /= (Z @ w).std()
                s[te] = ((X[te] - mu) / sd) @ w
            ts.append(np.sqrt(50 * 40 / 90) * (s[y == 1].mean() - s[y == 0].mean()))
        assert eng.statistic(Y[b:b + 1])[0] == pytest.approx(np.mean(ts), rel=1e-9)


def test_blocks_are_exchangeable_units_of_one_label():
    P, U = _data(23, 17, 3)
    eng = RidgeCrossFit(P, U, n_splits=3, ridge=1.0, block_size=4, rng=np.random.default_rng(1))
    lab_rows = eng.unit_label[eng.row_unit]
    assert lab_rows[:23].all() and not lab_rows[23:].any()
    sizes = np.bincount(eng.row_unit)
    assert set(sizes[eng.unit_stratum == 0]) == {4} and set(sizes[eng.unit_stratum == 1]) == {1}
    Y = eng.draw_labels(50)
    for s in np.unique(eng.unit_stratum):  # label counts are preserved within each stratum
        cols = eng.unit_stratum == s
        assert (Y[:, cols].sum(1) == eng.unit_label[cols].sum()).all()
    assert auto_block_size(4096) == 1 and auto_block_size(4097) == 2 and auto_block_size(40_000) == 10


def test_logistic_engine_matches_sklearn():
    P, U = _data(40, 30, 3, seed=4, shift=0.3)
    eng = LogisticCrossFit(P, U, n_splits=5, rng=np.random.default_rng(0))
    sp, su = eng.observed_scores()
    X, y = np.vstack([P, U]), np.r_[np.ones(40), np.zeros(30)]
    s = np.empty(70)
    for f in range(5):
        te = eng.row_fold == f
        s[te] = logistic_pipeline().fit(X[~te], y[~te]).predict_proba(X[te])[:, 1]
    np.testing.assert_allclose(np.r_[sp, su], s)
    assert eng.statistic(eng.observed_labels())[0] == pytest.approx(welch_t(s[:40], s[40:]))


def test_paper_procedure_is_the_authors_computation():
    P, U = _data(50, 50, 4, seed=5, shift=0.2)
    kf = KFold(n_splits=5, shuffle=True, random_state=9)
    sp, su = np.empty(50), np.empty(50)
    for (tp, vp), (tu, vu) in zip(kf.split(P), kf.split(U)):
        m = logistic_pipeline().fit(np.vstack([P[tp], U[tu]]), np.r_[np.ones(len(tp)), np.zeros(len(tu))])
        sp[vp], su[vu] = m.predict_proba(P[vp])[:, 1], m.predict_proba(U[vu])[:, 1]
    two = run_test(P, U, procedure="paper-two-sided", seed=9)
    one = run_test(P, U, procedure="paper-one-sided", seed=9)
    ref = st.ttest_ind(sp, su, equal_var=False)
    assert two.pvalue == pytest.approx(ref.pvalue) and two.statistic == pytest.approx(ref.statistic)
    assert one.pvalue == pytest.approx(st.ttest_ind(sp, su, equal_var=False, alternative="greater").pvalue)
    np.testing.assert_allclose(two.scores_published, sp)
    assert not one.calibrated and two.options["alternative"] == "two-sided"


def test_crossfit_scores_cover_every_sample_with_unequal_sizes():
    P, U = _data(37, 12, 3)
    for folds in ("stratified", "separate"):
        cf = crossfit_scores(P, U, n_splits=4, random_state=1, folds=folds)
        assert cf.scores_published.shape == (37,) and cf.scores_unpublished.shape == (12,)
        assert set(cf.fold_published) == set(range(4)) and set(cf.fold_unpublished) == set(range(4))
        assert ((cf.scores_published > 0) & (cf.scores_published < 1)).all()


# ------------------------------------------------------------------ properties
@settings(max_examples=25, deadline=None)
@given(n_p=hs.integers(5, 40), n_u=hs.integers(5, 40), k=hs.integers(1, 6), seed=hs.integers(0, 2**16),
       data=hs.data())
def test_default_is_invariant_to_per_feature_affine_rescaling(n_p, n_u, k, seed, data):
    """Per-fold standardisation + ridge on the correlation matrix: units of a feature don't matter."""
    rng = np.random.default_rng(seed)
    P, U = rng.standard_normal((n_p, k)), rng.standard_normal((n_u, k))
    a = np.array(data.draw(hs.lists(hs.floats(1e-3, 1e3), min_size=k, max_size=k)))
    b = np.array(data.draw(hs.lists(hs.floats(-1e3, 1e3), min_size=k, max_size=k)))
    r1 = run_test(P, U, seed=seed % 7, max_permutations=99)
    r2 = run_test(P * a + b, U * a + b, seed=seed % 7, max_permutations=99)
    assert r2.statistic == pytest.approx(r1.statistic, rel=1e-6, abs=1e-8)
    assert r2.pvalue == r1.pvalue
    assert 0 < r1.pvalue <= 1


def test_constant_feature_is_ignored():
    P, U = _data(30, 30, 3, shift=0.5)
    P[:, 1] = U[:, 1] = 2.0
    res = run_test(P, U)
    ref = run_test(P[:, [0, 2]], U[:, [0, 2]])
    assert np.isfinite(res.statistic) and res.statistic == pytest.approx(ref.statistic)
    assert res.pvalue == ref.pvalue


def test_stats_imports_without_ray_and_never_imports_torch():
    code = "import sys; sys.modules['ray'] = None\nimport cdi_ray.stats"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    # static check: no module of cdi_ray/stats imports ray or torch (scipy breaks if torch is stubbed out)
    import ast
    import pathlib

    import cdi_ray.stats

    for path in pathlib.Path(cdi_ray.stats.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("ray", "torch") for n in names), (path.name, names)

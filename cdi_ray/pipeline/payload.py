"""The report payload of one audit: what its HTML report plots, bounded in size whatever n_P and n_U.

Computed by the aggregator next to the test (it holds the feature matrices then): score
histograms of the held-out scores, per-feature AUCs and weights, the p-value against n on nested
subsets, and the collections' fingerprints — what a third party needs to check which images were
used (docs/REPORTS.md). Descriptive only: the verdict never depends on it.
"""
from __future__ import annotations

import numpy as np


#: Bins of the score histograms in the report (same edges for P and U).
REPORT_BINS = 30
#: Largest number of points of the p-value-vs-n curve.
CURVE_POINTS = 12
#: Smallest n per side of the curve (below it the procedures cannot split into folds).
CURVE_MIN_N = 10
#: Permutation cap of the curve's tests: the curve shows a trend, its p-values floor at 1e-3
#: (the audit's own p-value is the one that counts); ~1 ms a permutation on a 20k+20k audit.
CURVE_MAX_PERMUTATIONS = 999
#: Per-feature rows listed in the report (features ordered by |weight|).
REPORT_FEATURES = 64


def collection_fingerprint(hashes) -> str:
    """sha256 over the sorted content hashes of a collection, one per line: equal for the same set
    of image contents whatever their URIs, order or duplicates."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(set(hashes))).encode()).hexdigest()


def _hist(sp: np.ndarray, su: np.ndarray, bins: int = REPORT_BINS) -> dict:
    both = np.r_[sp, su]
    both = both[np.isfinite(both)]
    if both.size == 0:
        return {"edges": [], "published": [], "unpublished": []}
    lo, hi = float(both.min()), float(both.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    return {"edges": edges, "published": np.histogram(sp[np.isfinite(sp)], edges)[0],
            "unpublished": np.histogram(su[np.isfinite(su)], edges)[0]}


def _summary(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"n": 0}
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(x.size), "mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "q05": q[0], "q25": q[1], "median": q[2], "q75": q[3], "q95": q[4]}


def _feature_table(P: np.ndarray, U: np.ndarray, columns: list[str], ridge: float = 1.0) -> list[dict]:
    """Per feature: single-feature AUC (P above U), standardized mean difference, and the weight of a
    ridge discriminant fit on all images (standardized features; the direction the cross-fitted
    scorer learns, without the cross-fitting). Descriptive only — not a test."""
    from scipy import stats as st

    X = np.vstack([P, U])
    mu, sd = X.mean(0), X.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    Z = (X - mu) / sd
    zp, zu = Z[: len(P)], Z[len(P):]
    d = zp.mean(0) - zu.mean(0)
    C = np.cov(Z, rowvar=False).reshape(Z.shape[1], Z.shape[1]) if len(Z) > 1 else np.eye(Z.shape[1])
    w = np.linalg.solve(C + ridge * np.eye(len(C)) / max(len(Z), 1) + 1e-9 * np.eye(len(C)), d)
    norm = np.abs(w).sum()
    rows = []
    for j, name in enumerate(columns):
        r = st.rankdata(np.r_[P[:, j], U[:, j]])
        auc = (r[: len(P)].sum() - len(P) * (len(P) + 1) / 2) / (len(P) * len(U))
        rows.append({"feature": name, "auc": float(auc), "mean_difference": float(d[j]), "weight": float(w[j]),
                     "share": float(abs(w[j]) / norm) if norm > 0 else 0.0})
    rows.sort(key=lambda r: -abs(r["weight"]))
    return rows[:REPORT_FEATURES]


def pvalue_curve(P: np.ndarray, U: np.ndarray, *, procedure: str, alpha: float, seed: int, options: dict,
                 points: int = CURVE_POINTS) -> dict:
    """p-value of the audit's own procedure on nested random subsets of P and U (the same share of
    each), from ``CURVE_MIN_N`` per side up to all of them; the permutation cap is lowered to
    :data:`CURVE_MAX_PERMUTATIONS`. Skipped for the refit-per-permutation logistic scorer (too slow)."""
    from cdi_ray.stats import closed_form_permutations, run_test

    opts = dict(options)
    if procedure == "crossfit-permutation":
        if not closed_form_permutations(procedure, opts):
            return {"points": [], "skipped": "the logistic scorer refits per permutation; the curve would cost "
                                             "as much as the audit many times over"}
        opts["max_permutations"] = min(int(opts.get("max_permutations") or CURVE_MAX_PERMUTATIONS), CURVE_MAX_PERMUTATIONS)
        opts["max_permutations_reverse"] = min(int(opts.get("max_permutations_reverse") or 99), 99)
    n_min = min(len(P), len(U))
    if n_min < CURVE_MIN_N:
        return {"points": [], "skipped": f"fewer than {CURVE_MIN_N} usable images on one side"}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EB0]))
    op, ou = rng.permutation(len(P)), rng.permutation(len(U))  # nested: each subset is a prefix
    fracs = np.unique(np.geomspace(CURVE_MIN_N / n_min, 1.0, points))
    out = []
    for f in fracs:
        n_p, n_u = max(CURVE_MIN_N, int(round(f * len(P)))), max(CURVE_MIN_N, int(round(f * len(U))))
        if out and (n_p, n_u) == (out[-1]["n_published"], out[-1]["n_unpublished"]):
            continue
        try:
            r = run_test(P[op[:n_p]], U[ou[:n_u]], procedure=procedure, alpha=alpha, seed=seed, **opts)
            out.append({"n_published": n_p, "n_unpublished": n_u, "pvalue": r.pvalue})
        except Exception as exc:  # noqa: BLE001 — a size the procedure cannot handle: left out
            out.append({"n_published": n_p, "n_unpublished": n_u, "pvalue": None,
                        "error": f"{type(exc).__name__}: {exc}"})
    return {"points": out, "max_permutations": opts.get("max_permutations")}


def report_payload(P: np.ndarray, U: np.ndarray, hp: list[str], hu: list[str], columns: list[str], result,
                   *, procedure: str, alpha: float, seed: int, options: dict) -> dict:
    """Step 5: what the per-audit report shows, bounded in size (histograms, not all scores).

    Args:
        P (`ndarray` of shape (n_P, k)), U (`ndarray` of shape (n_U, k)): the matrices tested.
        hp, hu (`list[str]`): their content hashes (for the collection fingerprints).
        columns (`list[str]`): the k feature names.
        result (`TestResult`): the audit's test, with its held-out scores.
    """
    from cdi_ray.stats.results import json_safe

    sp = np.asarray(result.scores_published, dtype=np.float64)
    su = np.asarray(result.scores_unpublished, dtype=np.float64)
    return json_safe({
        "collections": {
            "published": {"n": len(hp), "fingerprint": collection_fingerprint(hp)},
            "unpublished": {"n": len(hu), "fingerprint": collection_fingerprint(hu)},
        },
        "scores": {"histogram": _hist(sp, su), "published": _summary(sp), "unpublished": _summary(su),
                   "held_out": True},
        "features": _feature_table(P, U, list(columns)) if P.shape[1] else [],
        "pvalue_curve": pvalue_curve(P, U, procedure=procedure, alpha=alpha, seed=seed, options=options),
        "test": result.to_dict(),
    })

"""The authors' scorer (METHOD.md, Step 3) and cross-fitted held-out scores.

    StandardScaler + LogisticRegression(solver="liblinear", C=1, max_iter=1000),
    label P=1 / U=0, K-fold cross-fitting, held-out ``predict_proba[:, 1]`` as the score.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["logistic_pipeline", "CrossFitScores", "crossfit_scores", "FOLD_SCHEMES"]

FOLD_SCHEMES = ("stratified", "separate")


def logistic_pipeline(*, C: float = 1.0, max_iter: int = 1000) -> Pipeline:
    """A fresh, unfitted ``StandardScaler → LogisticRegression(liblinear)`` pipeline (authors' settings)."""
    return Pipeline([("scaler", StandardScaler()),
                     ("clf", LogisticRegression(solver="liblinear", C=C, max_iter=max_iter))])


@dataclass(frozen=True, eq=False)
class CrossFitScores:
    """Held-out scores of every sample.

    Attributes:
        scores_published (`ndarray` of shape (n_P,)): held-out P(label=P) of each P sample.
        scores_unpublished (`ndarray` of shape (n_U,)): the same for each U sample.
        fold_published, fold_unpublished (`ndarray` of int): the fold each sample was held out in.
    """

    scores_published: np.ndarray
    scores_unpublished: np.ndarray
    fold_published: np.ndarray
    fold_unpublished: np.ndarray


def crossfit_scores(published: np.ndarray, unpublished: np.ndarray, *, n_splits: int = 5, random_state: int = 0,
                    folds: str = "stratified", C: float = 1.0, max_iter: int = 1000) -> CrossFitScores:
    """Cross-fit the authors' scorer and return held-out scores for every sample.

    Args:
        published (`ndarray` of shape (n_P, k)): features of P (label 1).
        unpublished (`ndarray` of shape (n_U, k)): features of U (label 0); n_U may differ from n_P.
        n_splits (`int`, *optional*, defaults to 5): K.
        random_state (`int`, *optional*, defaults to 0): shuffling seed of the folds.
        folds (`str`, *optional*, defaults to ``"stratified"``):
            ``"stratified"`` — ``StratifiedKFold(shuffle=True)`` over the pooled sample, so every
            training fold holds both classes in proportion; ``"separate"`` — the authors' style:
            the same ``KFold(shuffle=True, random_state)`` applied to P and to U separately and
            fold f of P paired with fold f of U.

    Note: these scores are *not* independent across folds; do not feed them to a t-test as if
    they were (that is the paper's calibration defect). ``run_test`` handles that.
    """
    P = np.asarray(published, dtype=np.float64)
    U = np.asarray(unpublished, dtype=np.float64)
    n_p, n_u = len(P), len(U)
    X = np.vstack([P, U])
    y = np.r_[np.ones(n_p, dtype=int), np.zeros(n_u, dtype=int)]
    if folds == "stratified":
        splits = list(StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state).split(X, y))
    elif folds == "separate":
        kf = KFold(n_splits=n_splits, shuffle=True, random_state=random_state)
        splits = [(np.r_[tp, n_p + tu], np.r_[vp, n_p + vu])
                  for (tp, vp), (tu, vu) in zip(kf.split(P), kf.split(U))]
    else:
        raise ValueError(f"folds must be one of {FOLD_SCHEMES}, got {folds!r}")
    scores = np.empty(len(X))
    fold = np.empty(len(X), dtype=np.int64)
    for f, (tr, te) in enumerate(splits):
        model = logistic_pipeline(C=C, max_iter=max_iter).fit(X[tr], y[tr])
        scores[te] = model.predict_proba(X[te])[:, 1]
        fold[te] = f
    return CrossFitScores(scores[:n_p], scores[n_p:], fold[:n_p], fold[n_p:])

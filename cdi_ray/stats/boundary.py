"""The group-sequential boundary of a Gaussian random walk (Armitage–McPherson–Rowe recursion).

The nightly re-audits (:mod:`cdi_ray.stats.sequential`) add one standard-normal increment per
look; :func:`walk_boundary` gives the last look's boundary such that the walk's chance of ever
crossing, up to that look, is exactly the α spent so far. Numerics only: no features, no state.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy import optimize
from scipy import signal
from scipy import stats as st

__all__ = ["walk_boundary"]

# Grid points per standard deviation of the smallest walk increment in the boundary recursion;
# 16 keeps the crossing probabilities within 1e-8 of a grid twice as fine (tests check it).
GRID_PER_SD = 16
# The walk's density is carried down to this many SDs below its mean (mass beyond: < 1e-23).
GRID_DEPTH_SD = 10.0

def _simpson_weights(n_intervals: int, h: float) -> np.ndarray:
    w = np.ones(n_intervals + 1)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return w * h / 3.0


def _grid_below(b: float, depth: float, h: float) -> np.ndarray:
    """Grid b, b−h, b−2h, … reaching ``depth`` (an even number of intervals, for Simpson)."""
    n = int(math.ceil((b - depth) / h))
    n += n % 2
    return b - h * np.arange(n + 1)


def walk_boundary(information, boundaries, target: float) -> tuple[float, float]:
    """Boundary of the last look of a Gaussian random walk, given the earlier looks' boundaries.

    The walk S has independent N(0, Iₜ − Iₜ₋₁) increments; the earlier looks stopped it at
    ``boundaries``. Returns (bₜ, spent before look t) such that
    P(S crosses some earlier bₛ, or Sₜ ≥ bₜ) = ``target``; bₜ = +inf when nothing is left.
    Audits that grow alike share boundaries, so results are cached.
    """
    return _walk_boundary(tuple(float(i) for i in information), tuple(float(b) for b in boundaries), float(target))


@functools.lru_cache(maxsize=4096)
def _walk_boundary(information: tuple, past: tuple, target: float) -> tuple[float, float]:
    info = np.asarray(information, dtype=np.float64)
    if len(past) != len(info) - 1 or not (np.diff(np.r_[0.0, info]) > 0).all():
        raise ValueError("need one more information level than boundaries, strictly increasing and positive")
    sd = np.sqrt(np.diff(np.r_[0.0, info]))
    if len(info) == 1:
        return (float(np.sqrt(info[0]) * st.norm.isf(target)) if target > 0 else math.inf), 0.0
    h = float(sd.min()) / GRID_PER_SD
    spent, x, q = 0.0, None, None
    for s in range(len(info)):
        if s == 0:
            crossing = lambda b: float(st.norm.sf(b / sd[0]))  # noqa: E731
        else:
            crossing = lambda b, x=x, q=q, s=s: float(q @ st.norm.sf((b - x) / sd[s]))  # noqa: E731
        if s == len(info) - 1:
            left = target - spent
            if left <= 1e-15:
                return math.inf, spent
            lo, hi = -GRID_DEPTH_SD * math.sqrt(info[s]), 40.0 * math.sqrt(info[s])
            return float(optimize.brentq(lambda b: crossing(b) - left, lo, hi, xtol=1e-12 * math.sqrt(info[s]))), spent
        b = past[s]
        if not math.isfinite(b):  # a look with nothing to spend: the walk is not stopped there
            b = 40.0 * math.sqrt(info[s])
        spent += crossing(b)
        y = _grid_below(b, -GRID_DEPTH_SD * math.sqrt(info[s]), h)
        if s == 0:
            g = st.norm.pdf(y / sd[0]) / sd[0]
        else:
            # g(y_k) = Σ_j q_j φ((y_k − x_j)/sd)/sd with y_k − x_j = D + h(j − k): a correlation.
            D = b - x[0]
            m_lo = int(math.floor((-12 * sd[s] - D) / h))
            m_hi = int(math.ceil((12 * sd[s] - D) / h))
            m = np.arange(m_lo, m_hi + 1)
            kernel = st.norm.pdf((D + h * m) / sd[s]) / sd[s]
            full = signal.fftconvolve(q, kernel[::-1])  # full[n] = Σ_i q_i kernel[m_hi − n + i − m_lo]
            idx = m_hi + np.arange(len(y))
            ok = (idx >= 0) & (idx < len(full))
            g = np.zeros(len(y))
            g[ok] = np.clip(full[idx[ok]], 0.0, None)
        x, q = y, _simpson_weights(len(y) - 1, h) * g
    raise AssertionError("unreachable")

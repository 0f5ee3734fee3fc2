"""Batched L-BFGS in which every sample is its own optimisation problem.

The authors' Noise Optimisation runs ``scipy.optimize.minimize(method="L-BFGS-B")`` once over the
whole batch, on the mean of the per-image losses: curvature history, two-loop recursion, step
length and stopping are shared by all images, so an image's result depends on its batch-mates.
Here each sample has its own optimiser, written as ordinary sequential code in a Python
generator that *yields* trial points and is *sent* ``(f, g)`` back. A driver collects the pending
trial points of all live samples, evaluates them in one batched call, and sends each sample its
own value and gradient. A sample's trajectory therefore depends only on its own function:
batching is purely an evaluation detail.

Per sample (Nocedal & Wright, Numerical Optimization, 2nd ed.):

1. direction ``d = −H·g`` by the two-loop recursion (Alg. 7.4) over the last ``history_size``
   pairs (s, y), with ``H0 = (sᵀy / yᵀy)·I``; the first iteration takes ``d = −g`` with initial
   step ``1/‖g‖₂`` (as scipy's L-BFGS-B: a first step of unit length), later ones step 1;
2. a strong-Wolfe line search (Alg. 3.5 / 3.6, cubic interpolation) with ``c1 = 1e-3``,
   ``c2 = 0.9`` (scipy's ``ftol``/``gtol`` of the line search), at most ``max_ls`` evaluations;
3. pairs with ``sᵀy ≤ 1e-10·yᵀy`` are not stored (curvature condition);
4. stop after ``max_iter`` iterations, or when ``max|g| ≤ tolerance_grad`` (scipy ``pgtol``
   1e-5), or when the relative decrease ``(f_k − f_{k+1}) / max(|f_k|, |f_{k+1}|, 1)`` is at most
   ``tolerance_change`` (scipy ``factr·eps`` ≈ 2.2e-9), or when the line search finds no
   decrease (the last accepted point is returned).

Evaluations per sample: 1 (at x0) + the line-search evaluations of each iteration (≥ 1).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generator

import torch

# (f, g) sent back for a yielded trial point
Eval = tuple[float, torch.Tensor]
Coroutine = Generator[torch.Tensor, Eval, "LBFGSResult"]


@dataclass(frozen=True)
class LBFGSResult:
    """The last accepted point of one sample's optimisation."""

    x: torch.Tensor
    f: float
    g: torch.Tensor
    n_iter: int
    n_evals: int


def _cubic_min(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float, lo: float, hi: float) -> float:
    """Minimiser of the cubic interpolating (x1, f1, g1), (x2, f2, g2), clipped to [lo, hi];
    the bisection of [lo, hi] when the cubic has no real minimiser."""
    if x1 == x2 or not all(map(math.isfinite, (f1, g1, f2, g2))):
        return 0.5 * (lo + hi)
    d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2)
    sq = d1 * d1 - g1 * g2
    if sq >= 0 and math.isfinite(sq):
        d2 = math.sqrt(sq)
        if x1 > x2:
            d2 = -d2
        denom = g2 - g1 + 2.0 * d2
        if denom != 0:
            xm = x2 - (x2 - x1) * ((g2 + d2 - d1) / denom)
            if math.isfinite(xm):
                return min(max(xm, lo), hi)
    return 0.5 * (lo + hi)


def _strong_wolfe(
    x: torch.Tensor, f0: float, g0: torch.Tensor, d: torch.Tensor, gtd0: float, alpha: float,
    *, c1: float, c2: float, max_ls: int,
) -> Generator[torch.Tensor, Eval, tuple[float, float, torch.Tensor, int, bool]]:
    """Strong-Wolfe line search along ``d`` from ``x``.

    Returns ``(alpha, f, g, n_evals, ok)``; when the budget runs out, the best point with
    sufficient decrease found so far (``ok`` True), or ``(0, f0, g0, n, False)`` if none.
    """
    n = 0
    best: tuple[float, float, torch.Tensor] | None = None

    def armijo(a: float, fa: float) -> bool:
        return fa <= f0 + c1 * a * gtd0

    # 1. bracketing phase (Alg. 3.5)
    a_prev, f_prev, gtd_prev = 0.0, f0, gtd0
    g_prev = g0
    lo = hi = None  # bracket for zoom: (a, f, g, gtd)
    while n < max_ls:
        fa, ga = yield x + alpha * d
        n += 1
        gtda = float(torch.dot(ga, d))
        if math.isfinite(fa) and armijo(alpha, fa) and (best is None or fa < best[1]):
            best = (alpha, fa, ga)
        if not math.isfinite(fa) or not armijo(alpha, fa) or (n > 1 and fa >= f_prev):
            lo, hi = (a_prev, f_prev, g_prev, gtd_prev), (alpha, fa, ga, gtda)
            break
        if abs(gtda) <= -c2 * gtd0:
            return alpha, fa, ga, n, True
        if gtda >= 0:
            lo, hi = (alpha, fa, ga, gtda), (a_prev, f_prev, g_prev, gtd_prev)
            break
        # extrapolate: cubic step, kept within [alpha + 0.01·Δ, 10·alpha]
        a_next = _cubic_min(a_prev, f_prev, gtd_prev, alpha, fa, gtda, alpha + 0.01 * (alpha - a_prev), alpha * 10.0)
        a_prev, f_prev, g_prev, gtd_prev = alpha, fa, ga, gtda
        alpha = a_next
    else:
        if best is not None:
            return best[0], best[1], best[2], n, True
        return 0.0, f0, g0, n, False

    # 2. zoom phase (Alg. 3.6): lo always satisfies Armijo and has the lowest f seen in the bracket
    while n < max_ls:
        a_lo, f_lo, g_lo, gtd_lo = lo
        a_hi, f_hi, g_hi, gtd_hi = hi
        left, right = min(a_lo, a_hi), max(a_lo, a_hi)
        if not math.isfinite(f_hi):
            alpha = 0.5 * (left + right)
        else:
            width = right - left
            alpha = _cubic_min(a_lo, f_lo, gtd_lo, a_hi, f_hi, gtd_hi, left + 0.1 * width, right - 0.1 * width)
        if right - left <= 1e-12 * max(1.0, right):
            break
        fa, ga = yield x + alpha * d
        n += 1
        gtda = float(torch.dot(ga, d))
        if math.isfinite(fa) and armijo(alpha, fa) and (best is None or fa < best[1]):
            best = (alpha, fa, ga)
        if not math.isfinite(fa) or not armijo(alpha, fa) or fa >= f_lo:
            hi = (alpha, fa, ga, gtda)
        else:
            if abs(gtda) <= -c2 * gtd0:
                return alpha, fa, ga, n, True
            if gtda * (a_hi - a_lo) >= 0:
                hi = lo
            lo = (alpha, fa, ga, gtda)
    if best is not None:
        return best[0], best[1], best[2], n, True
    return 0.0, f0, g0, n, False


def lbfgs(
    x0: torch.Tensor,
    *,
    max_iter: int = 5,
    history_size: int = 10,
    c1: float = 1e-3,
    c2: float = 0.9,
    max_ls: int = 20,
    tolerance_grad: float = 1e-5,
    tolerance_change: float = 2.220446049250313e-09,
) -> Coroutine:
    """One sample's L-BFGS as a coroutine over a flat ``x0`` (D,); see the module docstring."""
    x = x0.detach().flatten().clone()
    f, g = yield x
    g = g.detach().flatten()
    n_evals = 1
    S: deque[torch.Tensor] = deque(maxlen=history_size)
    Y: deque[torch.Tensor] = deque(maxlen=history_size)
    R: deque[float] = deque(maxlen=history_size)
    n_iter = 0
    while n_iter < max_iter:
        if not math.isfinite(f) or float(g.abs().max()) <= tolerance_grad:
            break
        # 1. direction by the two-loop recursion
        if S:
            q = -g.clone()
            alphas = []
            for s, y, rho in zip(reversed(S), reversed(Y), reversed(R)):
                a = rho * float(torch.dot(s, q))
                alphas.append(a)
                q.add_(y, alpha=-a)
            gamma = float(torch.dot(S[-1], Y[-1])) / float(torch.dot(Y[-1], Y[-1]))
            q.mul_(gamma)
            for (s, y, rho), a in zip(zip(S, Y, R), reversed(alphas)):
                b = rho * float(torch.dot(y, q))
                q.add_(s, alpha=a - b)
            d, step = q, 1.0
        else:
            d = -g
            step = 1.0 / max(float(torch.linalg.vector_norm(g)), 1e-30)
        gtd = float(torch.dot(g, d))
        if not gtd < 0:
            if not S:
                break
            # lost descent (numerical trouble): restart from steepest descent
            S.clear(), Y.clear(), R.clear()
            continue
        # 2. line search
        alpha, f_new, g_new, n_ls, ok = yield from _strong_wolfe(x, f, g, d, gtd, step, c1=c1, c2=c2, max_ls=max_ls)
        n_evals += n_ls
        n_iter += 1
        if not ok:
            break
        g_new = g_new.detach().flatten()
        x_new = x + alpha * d
        # 3. curvature pair
        s, y = x_new - x, g_new - g
        sy, yy = float(torch.dot(s, y)), float(torch.dot(y, y))
        if sy > 1e-10 * yy and yy > 0:
            S.append(s), Y.append(y), R.append(1.0 / sy)
        # 4. relative-decrease stop
        small = (f - f_new) <= tolerance_change * max(abs(f), abs(f_new), 1.0)
        x, f, g = x_new, f_new, g_new
        if small:
            break
    return LBFGSResult(x=x, f=f, g=g, n_iter=n_iter, n_evals=n_evals)


def lbfgs_batched(
    x0: torch.Tensor,
    value_and_grad: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    **options,
) -> list[LBFGSResult]:
    """Minimise B independent problems at once.

    Args:
        x0 (`Tensor` of shape (B, ...)): starting points.
        value_and_grad (`callable`): ``(index (N,), X (N, ...)) -> (f (N,), g (N, ...))`` evaluates
            the problems of samples ``index`` at points ``X``; called once per round with all
            live samples.
        **options: passed to ``lbfgs`` (``max_iter``, ``history_size``, ``max_ls``, …).

    Returns:
        `list[LBFGSResult]`, one per sample.
    """
    B = x0.shape[0]
    shape = x0.shape[1:]
    coros = [lbfgs(x0[i], **options) for i in range(B)]
    pending = {i: next(c) for i, c in enumerate(coros)}
    results: list[LBFGSResult | None] = [None] * B
    while pending:
        idx = sorted(pending)
        X = torch.stack([pending[i] for i in idx]).reshape(len(idx), *shape)
        f, g = value_and_grad(torch.tensor(idx, dtype=torch.long), X)
        fs = f.detach().double().cpu().tolist()
        for j, i in enumerate(idx):
            try:
                pending[i] = coros[i].send((fs[j], g[j].detach().flatten()))
            except StopIteration as stop:
                results[i] = stop.value
                del pending[i]
    return results  # type: ignore[return-value]

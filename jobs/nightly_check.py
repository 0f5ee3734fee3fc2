"""Checks of the life-long rule's exactness (docs/VERDICTS.md §5.2): the walk's boundaries spend what
they claim, and the increment p-values of innocent histories are uniform and serially uncorrelated.

    python jobs/nightly_check.py --walks 2000000 --cache out/nightly_simulation_cache/report \\
        --out docs/measurements/nightly_check.json

1. **Boundaries.** The default design's schedule for +``per_night`` images per side per night over
   ``nights`` nights (weights, information, spending exactly as ``next_look`` computes them);
   ``walks`` Gaussian random walks with those increments; the fraction that crosses some boundary
   by each look against the α the recursion spends (with its binomial standard error).
2. **Increments.** Every later look's randomised p-value in the null histories cached by
   ``jobs/nightly_simulation.py --mode report`` (looks at the smallest α: each history once):
   Kolmogorov–Smirnov against Uniform(0, 1), the rates at 0.01 and 0.05, and the lag-1
   correlation of ζ = Φ⁻¹(1 − p) within histories.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np
from scipy import stats as st

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cdi_ray.stats.boundary import walk_boundary  # noqa: E402
from cdi_ray.stats.sequential import SequentialDesign, spending  # noqa: E402


def schedule(alpha: float, nights: int, per_night: int, design: SequentialDesign) -> dict:
    """Weights, information, boundaries and spent α of the walk looks 2..nights (balanced growth)."""
    n_eff = per_night / 2
    e1 = n_eff
    w, info, bounds, targets = [], [], [], []
    for t in range(2, nights + 1):
        past = per_night * (t - 1)
        w.append(math.sqrt(n_eff) * past / (past + design.weight_half))
        info.append(sum(x * x for x in w))
        targets.append(alpha * (spending(n_eff * t, design.tau) - spending(e1, design.tau)))
        bounds.append(walk_boundary(info, bounds, targets[-1])[0])
    return {"weights": w, "information": info, "boundaries": bounds, "targets": targets}


def simulate_walks(sched: dict, n: int, seed: int, chunk: int = 200_000) -> np.ndarray:
    """Fraction of ``n`` walks that crossed some boundary by each look."""
    rng = np.random.default_rng(seed)
    w, b = np.asarray(sched["weights"]), np.asarray(sched["boundaries"])
    crossed = np.zeros(len(w))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        S = np.cumsum(rng.standard_normal((m, len(w))) * w, axis=1)
        crossed += np.maximum.accumulate(S >= b, axis=1).sum(axis=0)
    return crossed / n


def increment_check(cache: str) -> dict | None:
    ps, lag = [], []
    for sc in ("null-gauss", "null-heavy"):
        for path in glob.glob(os.path.join(cache, sc, "*.json")):
            with open(path) as f:
                rec = json.load(f)
            a_min = min(rec["looks"], key=float)
            p = [lk["pvalue"] for lk in rec["looks"][a_min][1:]]  # look 1 is the whole-collection test
            ps += p
            z = st.norm.isf(np.asarray(p))
            lag += list(zip(z[:-1], z[1:]))
    if not ps:
        return None
    ps = np.asarray(ps)
    z0, z1 = np.asarray(lag).T
    return {"n_pvalues": len(ps), "ks_pvalue": float(st.kstest(ps, "uniform").pvalue),
            "rate_at_0.01": float((ps <= 0.01).mean()), "rate_at_0.05": float((ps <= 0.05).mean()),
            "lag1_correlation": float(np.corrcoef(z0, z1)[0, 1]), "n_pairs": len(z0)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--walks", type=int, default=2_000_000)
    p.add_argument("--nights", type=int, default=30)
    p.add_argument("--per-night", type=int, default=50)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--cache", default="out/nightly_simulation_cache/report")
    p.add_argument("--seed", type=int, default=31_337)
    p.add_argument("--out", default="docs/measurements/nightly_check.json")
    args = p.parse_args(argv)
    t0 = time.time()
    design = SequentialDesign()
    walks = {}
    for alpha in args.alphas:
        sched = schedule(alpha, args.nights, args.per_night, design)
        rate = simulate_walks(sched, args.walks, args.seed)
        target = sched["targets"][-1]
        walks[str(alpha)] = {"spent_by_recursion": target, "crossed_by_simulation": float(rate[-1]),
                             "standard_error": math.sqrt(target * (1 - target) / args.walks),
                             "max_abs_z_over_looks": float(np.max(np.abs(rate - sched["targets"]) / np.sqrt(
                                 np.asarray(sched["targets"]) * (1 - np.asarray(sched["targets"])) / args.walks)))}
    out = {"walks": args.walks, "nights": args.nights, "per_night": args.per_night, "design": design.__dict__,
           "boundaries": walks, "increments": increment_check(args.cache), "seconds": time.time() - t0,
           "date": time.strftime("%Y-%m-%d")}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

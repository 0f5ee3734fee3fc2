"""Nightly re-audits: life-long false-``used`` rate and power, per-night test vs the sequential rule.

A history is one standing audit: night t holds 50·t published and 50·t unpublished images
(+50 per side per night), k = 26 features, tested every night for 30 nights.

    python jobs/nightly_simulation.py --mode report --power-histories 500 --workers 2   # the reported table
    python jobs/nightly_simulation.py --mode tune --histories 200 --workers 2            # design choice
    python jobs/nightly_simulation.py --smoke-test                                       # seconds, tiny counts

``report`` runs, per history, (a) today's behaviour — ``run_test`` on the whole collection every
night at α, a ``used`` whenever p ≤ α — and (b) ``cdi_ray.stats.sequential.next_look`` night by
night (state round-tripped through JSON), at α = 0.01 and 0.05, and tabulates the fraction of
histories with ANY ``used`` night (with its Clopper–Pearson 95 % interval) and the first night.
``tune`` records the raw evidence of every night (cumulative p-values, increment p-values) on
SEPARATE seeds and compares the candidate designs offline (docs/VERDICTS.md §5.3); the design's
parameters were chosen there, never on the report seeds.

Resumable: every history is cached as ``<cache>/<mode>/<scenario>/<index>.json`` and skipped
when present; seeds are explicit (history i of scenario s uses SeedSequence([root, s, i]), root
20_261 for report, 90_210 for tune, ``--root-seed`` for an independent repeat).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import stats as st  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cdi_ray.stats import run_test  # noqa: E402
from cdi_ray.stats.boundary import walk_boundary  # noqa: E402
from cdi_ray.stats.sequential import (SequentialDesign, SequentialState, increment_pvalue, next_look,  # noqa: E402
                                      spending)

ROOT_SEED = {"report": 20_261, "tune": 90_210}
K = 26
# name → (feature family, shifted features, δ: published features are LOWERED by δ, "lower loss = member").
# δ was set on a few pilot histories (not the report seeds) so that the whole-collection test at
# α = 0.01 detects in most audits by night 20–30: the range where a nightly rule's cost shows.
SCENARIOS = {
    "null-gauss": ("gauss", None, 0.0),
    "null-heavy": ("heavy", None, 0.0),
    "sparse-gauss": ("gauss", 3, 0.20),
    "dense-gauss": ("gauss", K, 0.05),
    "sparse-heavy": ("heavy", 3, 0.12),
    "dense-heavy": ("heavy", K, 0.10),
}
FAMILY_OF_FEATURE = np.repeat(np.arange(3), [9, 9, 8])  # three correlated families (like ML / GM / single-step)


def draw(family: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of k = 26 features. gauss: i.i.d. N(0, 1). heavy: t₅ tails (unit variance), three
    families with within-family correlation 0.7 — closer to real loss features."""
    if family == "gauss":
        return rng.standard_normal((n, K))
    t5 = lambda shape: rng.standard_t(5, shape) / math.sqrt(5 / 3)  # noqa: E731
    return math.sqrt(0.3) * t5((n, K)) + math.sqrt(0.7) * t5((n, 3))[:, FAMILY_OF_FEATURE]


def history(scenario: str, index: int, root: int, nights: int, per_night: int):
    """Yield (night, P, U) with the WHOLE collections of each night (new rows appended)."""
    family, n_shift, delta = SCENARIOS[scenario]
    rng = np.random.default_rng(np.random.SeedSequence([root, list(SCENARIOS).index(scenario), index]))
    P, U = np.empty((0, K)), np.empty((0, K))
    for night in range(1, nights + 1):
        new_p = draw(family, per_night, rng)
        if n_shift:
            new_p[:, :n_shift] -= delta
        P, U = np.vstack([P, new_p]), np.vstack([U, draw(family, per_night, rng)])
        yield night, P, U


def audit_seed(scenario: str, index: int) -> int:
    return int(np.random.SeedSequence([7, list(SCENARIOS).index(scenario), index]).generate_state(1)[0] >> 1)


# --------------------------------------------------------------------------------------
# One history
# --------------------------------------------------------------------------------------
def report_history(scenario: str, index: int, root: int, nights: int, per_night: int, alphas: tuple, design: dict,
                   per_night_test: bool = True) -> dict:
    """Per-night test (every night, stop after its first `used` at the smallest α) and next_look at each α."""
    t0 = time.process_time()
    seed = audit_seed(scenario, index)
    a_min = min(alphas)
    first_per_night = {a: None for a in alphas}
    first_design = {a: None for a in alphas}
    states = {a: None for a in alphas}
    pvals = []
    for night, P, U in history(scenario, index, root, nights, per_night):
        if per_night_test and first_per_night[a_min] is None:
            # cap 999 resolves p ≤ 0.01 and p ≤ 0.05 (a run stopped early by h = 25 exceedances has p ≥ 0.025)
            r = run_test(P, U, alpha=a_min, seed=seed, max_permutations=999)
            pvals.append(r.pvalue)
            for a in alphas:
                if first_per_night[a] is None and r.pvalue <= a and r.direction == "P>U":
                    first_per_night[a] = night
        for a in alphas:
            if first_design[a] is None:
                st_in = None if states[a] is None else SequentialState.from_json(states[a])
                res, new = next_look(st_in, P, U, alpha=a, seed=seed, design=SequentialDesign(**design),
                                     label=f"night-{night}")
                states[a] = new.to_json()
                if res.may_say_used:
                    first_design[a] = night
    looks = {str(a): [{k: lk[k] for k in ("pvalue", "level", "nominal_pvalue", "alpha_spent")}
                      for lk in json.loads(states[a])["looks"]] for a in alphas}
    return {"scenario": scenario, "index": index, "seed": seed, "per_night_pvalues": pvals,
            "first_used_per_night": {str(a): first_per_night[a] for a in alphas},
            "first_used_sequential": {str(a): first_design[a] for a in alphas},
            "looks": looks, "cpu_s": time.process_time() - t0}


TUNE_RIDGES = (1.0, 10.0)


def tune_history(scenario: str, index: int, root: int, nights: int, per_night: int, stop_below: float = 1e-6) -> dict:
    """Raw evidence of every night: the whole-collection test's p and each increment's randomised p
    for every candidate ridge ρ. The whole-collection test runs with a 999 cap (its decisions at
    α = 0.01 and 0.05 are those of the default cap); where p sits at the 1e-3 floor the Gaussian
    tail estimate of its permutation null stands in — an APPROXIMATION, on the optimistic side, for
    the spending rules that need p down to 1e-5. It stops once p < 1e-6 (every rule has decided)."""
    t0 = time.process_time()
    seed = audit_seed(scenario, index)
    cum, zeta = [], {str(r): [] for r in TUNE_RIDGES}
    prev = None
    for night, P, U in history(scenario, index, root, nights, per_night):
        if not cum or cum[-1] > stop_below:
            r = run_test(P, U, alpha=0.01, seed=seed, max_permutations=999)
            p = r.pvalue if not r.p_at_floor or r.p_tail_estimate is None else min(r.pvalue, r.p_tail_estimate)
            cum.append(float(p))
        if prev is not None:
            n = prev
            for rho in TUNE_RIDGES:
                zeta[str(rho)].append(float(st.norm.isf(increment_pvalue(
                    P[:n], U[:n], P[n:], U[n:], ridge=rho, seed=[seed, night]))))
        prev = len(P)
    return {"scenario": scenario, "index": index, "seed": seed, "cumulative_p": cum, "zeta": zeta,
            "cpu_s": time.process_time() - t0}


def _task(args):
    mode, scenario, index, path, kw = args
    rec = report_history(scenario, index, **kw) if mode == "report" else tune_history(scenario, index, **kw)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f)
    os.replace(tmp, path)
    return scenario, index


# --------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------
def _rate(k: int, n: int) -> dict:
    ci = st.binomtest(k, n).proportion_ci(method="exact") if n else None
    return {"k": k, "n": n, "rate": k / n if n else float("nan"),
            "ci_low": float(ci.low) if ci else None, "ci_high": float(ci.high) if ci else None}


def _first_nights(firsts: list, nights: int) -> dict:
    got = sorted(f for f in firsts if f is not None)
    out = {"any": _rate(len(got), len(firsts)), "median_first_night": float(np.median(got)) if got else None}
    for t in (10, 20, nights):
        out[f"by_night_{t}"] = sum(f <= t for f in got) / max(len(firsts), 1)
    return out


def summarise_report(records: list, alphas: tuple, nights: int) -> dict:
    out = {}
    for sc in SCENARIOS:
        recs = [r for r in records if r["scenario"] == sc]
        if not recs:
            continue
        rules = ("per_night", "sequential") if any(r["per_night_pvalues"] for r in recs) else ("sequential",)
        out[sc] = {str(a): {rule: _first_nights([r[f"first_used_{rule}"][str(a)] for r in recs], nights)
                            for rule in rules} for a in alphas}
        out[sc]["cpu_s_per_history"] = float(np.mean([r["cpu_s"] for r in recs]))
    return out


def _walk_first(zeta: np.ndarray, alpha: float, tau: float, first_p: float, per_night: int, m0: float) -> int | None:
    """First night the 'first look + increment walk' rule says used (increment s has past m = 50·s per side;
    weight √n_eff·m/(m + m0), m0 = 0 → equal weights)."""
    n_eff = per_night / 2
    I1 = n_eff
    if first_p <= alpha * spending(I1, tau):
        return 1
    m = per_night * np.arange(1, len(zeta) + 1, dtype=float)
    w = math.sqrt(n_eff) * (m / (m + m0) if m0 else np.ones_like(m))
    S, info = np.cumsum(w * zeta), np.cumsum(w ** 2)
    bs = []
    for t in range(len(zeta)):
        target = alpha * (spending(I1 + n_eff * (t + 1), tau) - spending(I1, tau))
        b, _ = walk_boundary(info[: t + 1], bs, target)
        bs.append(b)
        if S[t] >= b:
            return t + 2
    return None


def _eprocess_first(zeta: np.ndarray, alpha_walk: float, rho: float, per_night: int) -> int | None:
    """Half-normal mixture of exp(λS − λ²I/2) over λ ≥ 0 (a test supermartingale); used when ≥ 1/α_walk."""
    n_eff = per_night / 2
    S, info = np.cumsum(math.sqrt(n_eff) * zeta), n_eff * np.arange(1, len(zeta) + 1)
    v = info + rho
    logm = (math.log(2) + 0.5 * np.log(rho / v) + S ** 2 / (2 * v) + st.norm.logcdf(S / np.sqrt(v)))
    hit = np.flatnonzero(logm >= -math.log(alpha_walk))
    return int(hit[0]) + 2 if hit.size else None


def _spending_first(cum_p: list, alpha: float, level_of_night) -> int | None:
    for t, p in enumerate(cum_p, start=1):
        lv = level_of_night(t)
        if lv > 0 and p <= lv:
            return t
    return None


def summarise_tune(records: list, alphas: tuple, nights: int, per_night: int) -> dict:
    """Every candidate design's any-used rate and detection nights on the tuning histories."""
    designs = {"per-night (today, invalid)": lambda r, a: _spending_first(r["cumulative_p"], a, lambda t: a)}
    for tn in (1, 5, 15, 30):
        designs[f"cumulative test, Bonferroni α·τ/((t+τ)(t−1+τ)), τ={tn} nights (optimistic)"] = (
            lambda r, a, tn=tn: _spending_first(r["cumulative_p"], a, lambda t: a * tn / ((t + tn) * (t - 1 + tn))))
    designs["cumulative test, α/30 per night, horizon 30 only (optimistic)"] = (
        lambda r, a: _spending_first(r["cumulative_p"], a, lambda t: a / nights))
    looks = [1, 2, 4, 8, 16, 32]
    designs["cumulative test at nights 1,2,4,8,16,… α/(j(j+1)) (optimistic)"] = (
        lambda r, a: _spending_first(r["cumulative_p"], a, lambda t: a / (looks.index(t) + 1) / (looks.index(t) + 2)
                                     if t in looks else 0.0))
    for rho in TUNE_RIDGES:
        for tau in (100, 250, 500, 1000, 2000):
            for m0 in (0, 500):
                designs[f"walk ρ={rho:g} τ={tau} m0={m0}"] = (
                    lambda r, a, rho=rho, tau=tau, m0=m0: _walk_first(np.array(r["zeta"][str(rho)]), a, tau,
                                                                       r["cumulative_p"][0], per_night, m0))
        for mix in (100, 400, 1600):
            designs[f"e-process ρ={rho:g} mixture {mix} (first look as walk τ=500)"] = (
                lambda r, a, rho=rho, mix=mix: 1 if r["cumulative_p"][0] <= a * spending(per_night / 2, 500) else
                _eprocess_first(np.array(r["zeta"][str(rho)]), a * (1 - spending(per_night / 2, 500)), mix, per_night))
    out = {}
    for sc in SCENARIOS:
        recs = [r for r in records if r["scenario"] == sc]
        if recs:
            out[sc] = {name: {str(a): _first_nights([fn(r, a) for r in recs], nights) for a in alphas}
                       for name, fn in designs.items()}
    return out


# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("report", "tune"), default="report")
    p.add_argument("--histories", type=int, default=1000)
    p.add_argument("--power-histories", type=int, help="histories of the shifted scenarios (default: --histories)")
    p.add_argument("--nights", type=int, default=30)
    p.add_argument("--per-night", type=int, default=50, help="new images per side per night")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--root-seed", type=int, help="root of the histories' seeds (default: 20261 report, 90210 tune); "
                   "another root gives independent histories, cached apart")
    p.add_argument("--no-per-night", action="store_true", help="report mode: run only the sequential rule")
    p.add_argument("--design", default="{}", help="report mode: SequentialDesign fields as JSON (default: the "
                   "default design), e.g. '{\"ridge\": 0.1}'; cached apart")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cache", default="out/nightly_simulation_cache", help="per-history cache (out/ is git-ignored)")
    p.add_argument("--out", help="summary JSON (default: docs/measurements/nightly_<mode>.json)")
    p.add_argument("--smoke-test", action="store_true", help="6 histories, 5 nights, no cache kept")
    return p.parse_args(argv)


def main(args) -> dict:
    if args.smoke_test:
        import tempfile
        args.histories, args.power_histories, args.nights = 6, 6, 5
        args.cache = tempfile.mkdtemp(prefix="nightly_smoke_")
        args.out = os.path.join(args.cache, "summary.json")
    out_path = args.out or f"docs/measurements/nightly_{args.mode}.json"
    root = ROOT_SEED[args.mode] if args.root_seed is None else args.root_seed
    kw = dict(root=root, nights=args.nights, per_night=args.per_night)
    if args.mode == "report":
        kw.update(alphas=tuple(args.alphas), design=json.loads(args.design), per_night_test=not args.no_per_night)
    tasks, paths = [], []
    for sc in args.scenarios:
        n = args.histories if SCENARIOS[sc][1] is None else (args.power_histories or args.histories)
        folder = args.mode if root == ROOT_SEED[args.mode] else f"{args.mode}-root{root}"
        if args.mode == "report" and json.loads(args.design):
            folder += "-design" + hashlib.sha1(json.dumps(json.loads(args.design), sort_keys=True).encode()).hexdigest()[:8]
        d = os.path.join(args.cache, folder, sc)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            path = os.path.join(d, f"{i}.json")
            paths.append(path)
            if not os.path.exists(path):
                tasks.append((args.mode, sc, i, path, kw))
    t0 = time.time()
    print(f"{len(paths) - len(tasks)} histories cached, {len(tasks)} to run", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as ex:
        for j, fut in enumerate(as_completed([ex.submit(_task, t) for t in tasks]), 1):
            fut.result()
            if j % 50 == 0 or j == len(tasks):
                print(f"{j}/{len(tasks)} histories, {time.time() - t0:.0f} s", flush=True)
    records = []
    for path in paths:
        with open(path) as f:
            records.append(json.load(f))
    summary = (summarise_report(records, tuple(args.alphas), args.nights) if args.mode == "report" else
               summarise_tune(records, tuple(args.alphas), args.nights, args.per_night))
    result = {"mode": args.mode, "histories": args.histories, "power_histories": args.power_histories or args.histories,
              "nights": args.nights, "per_night": args.per_night, "k": K, "alphas": args.alphas,
              "root_seed": root, "per_night_test": args.mode == "tune" or not args.no_per_night,
              "design": dataclasses.asdict(SequentialDesign(**json.loads(args.design))) if args.mode == "report" else None,
              "scenarios": {s: SCENARIOS[s] for s in args.scenarios}, "wall_s_this_run": time.time() - t0,
              "cpu_s_total": float(sum(r["cpu_s"] for r in records)), "summary": summary,
              "numpy": np.__version__, "date": time.strftime("%Y-%m-%d")}
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    _print(result)
    return result


def _print(result: dict) -> None:
    """One line per scenario × rule × α (report: rule = per-night test or sequential; tune: every candidate)."""
    for sc, rows in result["summary"].items():
        print(f"\n== {sc}")
        items = ([(rule, a, s) for a, by_rule in rows.items() if isinstance(by_rule, dict)
                  for rule, s in by_rule.items()] if result["mode"] == "report" else
                 [(rule, a, s) for rule, by_alpha in rows.items() for a, s in by_alpha.items()])
        last = f"by_night_{result['nights']}"
        for rule, a, s in items:
            r = s["any"]
            print(f"  {rule:75s} α={a:5s} any used {r['rate']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]  "
                  f"by night 10/20/{result['nights']}: {s['by_night_10']:.2f}/{s['by_night_20']:.2f}/{s[last]:.2f}  "
                  f"median first night {s['median_first_night']}")


if __name__ == "__main__":
    main(parse_args())

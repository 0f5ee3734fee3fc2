"""Calibration of the dataset-inference test procedures on synthetic null features, and the cost benchmark.

Prints and writes (JSON):

1. calibration — null features (P and U from one distribution) in three settings per (n, k):
   ``gaussian`` (i.i.d. N(0, I), |U| = |P|), ``unequal`` (|U| = 3|P| for n = 50, |P|/4 above) and
   ``heavy-tailed correlated`` (Student t with 3 degrees of freedom, equicorrelation 0.5):
   rejection rate at each α with its 95 % Clopper–Pearson interval, per procedure, and the mean p;
2. blocking — the default with plain row permutations vs. the blocked randomization "auto" uses
   above 4,096 rows, on the same planted-shift audits;
(optional, --ridge-audits) the ridge-strength sweep behind the ridge scorer's ρ = 1;
3. benchmark — CPU seconds of the default test on 20,000 + 20,000 samples × 26 features.

Power under planted shifts and the seed-to-seed spread are in ``jobs/power.py``.

    python jobs/calibration.py --workers 2 --out docs/measurements/calibration.json
    python jobs/calibration.py --only-ridge-sweep --ridge-audits 200 --workers 2 --out docs/measurements/ridge_sweep.json
    python jobs/calibration.py --smoke-test          # ~1 minute, tiny counts

Numbers from a full run are recorded in docs/STATISTICS.md with the command and date.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cdi_ray.stats import run_test  # noqa: E402
from cdi_ray.stats.evaluation import rejection_rates, simulate_pvalues, synthetic_audit  # noqa: E402

# name → (procedure, options). "crossfit-ridge" is the default permutation test with the ridge
# scorer (R = 10 fold assignments); "crossfit-logistic" with the authors' scorer — each permutation
# refits 5 LRs, so it gets fewer audits and a 199 cap (the p-value is exact for any cap).
PROCEDURES = {
    "crossfit-permutation": ("crossfit-permutation", {}),
    "crossfit-ridge": ("crossfit-permutation", {"scorer": "ridge"}),
    "split": ("split", {}),
    "paper-one-sided": ("paper-one-sided", {}),
    "paper-two-sided": ("paper-two-sided", {}),
    "crossfit-logistic": ("crossfit-permutation", {"scorer": "logistic", "max_permutations": 199,
                                                   "max_permutations_reverse": 99}),
}
#: Null settings: name → function (n) -> simulate_pvalues keyword arguments.
SETTINGS = {
    "gaussian": lambda n: {},
    "unequal": lambda n: {"n_unpublished": 3 * n if n < 200 else n // 4},
    "heavy-tailed correlated": lambda n: {"tail_df": 3.0, "rho": 0.5},
}


# Ridge-strength sweep (how the default ρ = 1 was chosen): n = 300 per side, k = 26.
RIDGE_VALUES = (1e-3, 0.1, 0.3, 1.0, 10.0)
RIDGE_SCENARIOS = ("contrast", "families-all", "families-one")


def _ridge_audit(scenario: str, rng: np.random.Generator, n: int = 300, k: int = 26):
    """contrast: equicorrelated (ρ=.7) features, +0.15 on one and −0.15 on another (signal in a
    low-variance direction, favours LDA); families-*: three correlated feature families (like ML/GM/
    single-step losses), shift −0.08 in all features or −0.12 in one family (favours shrinkage)."""
    if scenario == "contrast":
        P, U = synthetic_audit(n, n, k, rng, rho=0.7)
        P[:, 0] -= 0.15
        P[:, 1] += 0.15
        return P, U
    fam = np.repeat(np.arange(3), [k // 3, k // 3, k - 2 * (k // 3)])

    def draw(m):
        return np.sqrt(0.3) * rng.standard_normal((m, k)) + np.sqrt(0.7) * rng.standard_normal((m, 3))[:, fam]
    P, U = draw(n), draw(n)
    if scenario == "families-all":
        P -= 0.08
    else:
        P[:, fam == 0] -= 0.12
    return P, U


def _ridge_cell(task):
    scenario, ridge, audits, seed = task
    p = []
    for a, child in enumerate(np.random.SeedSequence(seed).spawn(audits)):
        P, U = _ridge_audit(scenario, np.random.default_rng(child))
        p.append(run_test(P, U, seed=a, scorer="ridge", fold_repeats=1, ridge=ridge, max_permutations=999).pvalue)
    return {"scenario": scenario, "ridge": ridge, "pvalues": p}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", type=int, nargs="+", default=[50, 200, 1000], help="|P| = |U| of the null cells")
    p.add_argument("--ks", type=int, nargs="+", default=[4, 26], help="feature counts of the null cells")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.05])
    p.add_argument("--audits", type=int, default=1000, help="null audits per (procedure, setting, n, k) cell")
    p.add_argument("--other-audits", type=int, default=300, help="null audits per cell of procedures other than the default")
    p.add_argument("--logistic-audits", type=int, default=50, help="null audits per cell for crossfit-logistic")
    p.add_argument("--logistic-max-n", type=int, default=200, help="skip crossfit-logistic cells above this n")
    p.add_argument("--procedures", nargs="+", default=["crossfit-permutation", "crossfit-ridge"], choices=list(PROCEDURES))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--other-settings", nargs="+", default=["gaussian"], choices=list(SETTINGS),
                   help="settings run for procedures other than the default")
    p.add_argument("--block-audits", type=int, default=60, help="audits of the blocking comparison (0 = skip)")
    p.add_argument("--bench-n", type=int, default=20000, help="|P| = |U| of the benchmark (0 = skip)")
    p.add_argument("--confirm", action="store_true",
                   help="re-run, with fresh seeds and 3× the audits, every default cell whose interval lies above α")
    p.add_argument("--ridge-audits", type=int, default=0, help="audits per cell of the ridge-strength sweep (0 = skip)")
    p.add_argument("--only-ridge-sweep", action="store_true", help="run only the ridge-strength sweep")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--out", default="calibration.json", help="JSON summary path")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "cdi-ray" / "calibration"),
                   help="finished null cells are kept here, so a killed run resumes ('' = no cache)")
    p.add_argument("--smoke-test", action="store_true", help="tiny counts, for CI")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.ns, args.ks, args.audits, args.other_audits, args.logistic_audits = [50, 200], [4], 40, 10, 5
        args.block_audits, args.bench_n, args.cache = 4, 2000, ""
        args.ridge_audits = 5
    return args


# --------------------------------------------------------------------------------------
# work units (top-level so they pickle)
# --------------------------------------------------------------------------------------
def _null_cell(task):
    name, setting, n, k, audits, seed, cache = task
    proc, opts = PROCEDURES[name]
    extra = SETTINGS[setting](n)
    file = None
    if cache:
        from power import _key  # same cache key rule: cell parameters + the library's defaults

        file = Path(cache) / f"null-{_key(name, opts, setting, extra, n, k, audits, seed)}.json"
        if file.exists():
            return json.loads(file.read_text())
    t0 = time.process_time()
    p = simulate_pvalues(proc, n, k, audits, seed=seed, **extra, **opts)
    out = {"kind": "null", "procedure": name, "setting": setting, "n": n, "k": k,
           "n_unpublished": extra.get("n_unpublished", n), "pvalues": p.tolist(), "cpu_s": time.process_time() - t0}
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(out))
    return out


def _cached(cache, name, fn, *key):
    """``fn()``, kept in ``cache`` under ``name`` and the key (nothing kept when ``cache`` is empty)."""
    if not cache:
        return fn()
    from power import _key  # same cache key rule: parameters + the library's defaults

    file = Path(cache) / f"{name}-{_key(*key)}.json"
    if file.exists():
        return json.loads(file.read_text())
    out = fn()
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(out))
    return out


def _block_cell(task):
    block_size, audits, seed, cache = task
    return _cached(cache, "block", lambda: _block_cell_compute(block_size, audits, seed), block_size, audits, seed)


def _block_cell_compute(block_size, audits, seed):
    # 5,000 + 5,000 rows: "auto" uses blocks of 3 rows; shift sized for neither 0 % nor 100 % power
    p = simulate_pvalues("crossfit-permutation", 5000, 26, audits, seed=seed, shift=0.006,
                         block_size=block_size, max_permutations=999)
    return {"kind": "block", "block_size": block_size, "pvalues": p.tolist()}


COST_SCORERS = {"directional (default)": {}, "ridge, R=10": {"scorer": "ridge"}}


def statistics_cost(n: int, seed: int, scorers=("directional (default)",)) -> list[dict]:
    """CPU seconds of one test at n + n × 26, under the null and with evidence that runs to the cap
    (``scorers``: names in :data:`COST_SCORERS`; jobs/benchmark.py calls this with the default)."""
    rows = []
    rng = np.random.default_rng(seed)
    scorers = {name: COST_SCORERS[name] for name in scorers}
    for label, shift in (("null", 0.0), ("overwhelming (runs to the 9,999 cap)", 0.05)):
        P, U = synthetic_audit(n, n, 26, rng, shift=shift)
        for scorer, sopts in scorers.items():
            for block in ("auto", 1):
                opts = dict(sopts)
                if block == 1 and shift > 0 and n > 5000:
                    opts["max_permutations"] = 999  # plain permutations at full cap would take ~10× longer
                t0, c0 = time.perf_counter(), time.process_time()
                res = run_test(P, U, block_size=block, **opts)
                rows.append({"case": label, "scorer": scorer, "n_published": n, "n_unpublished": n, "k": 26,
                             "block_size": res.options["block_size"], "max_permutations": res.options["max_permutations"],
                             "permutations_drawn": res.options["n_drawn"], "pvalue": res.pvalue,
                             "p_at_floor": res.p_at_floor, "p_tail_estimate": res.p_tail_estimate,
                             "cpu_s": round(time.process_time() - c0, 3), "wall_s": round(time.perf_counter() - t0, 3)})
    return rows


def _run(fn, tasks, workers):
    if workers <= 1:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, tasks))


# --------------------------------------------------------------------------------------
def main(args) -> dict:
    started = _dt.datetime.now(_dt.timezone.utc)
    t_start = time.perf_counter()
    ss = np.random.SeedSequence(args.seed)
    seeds = iter(int(s.generate_state(1)[0]) for s in ss.spawn(10_000))
    if args.only_ridge_sweep:
        args.procedures, args.block_audits, args.bench_n = [], 0, 0

    # 1. calibration under the null
    tasks = []
    for name in args.procedures:
        for setting in (args.settings if name == "crossfit-permutation" else args.other_settings):
            for n in args.ns:
                for k in args.ks:
                    if name == "crossfit-logistic" and n > args.logistic_max_n:
                        continue
                    a = {"crossfit-permutation": args.audits, "crossfit-logistic": args.logistic_audits}.get(
                        name, args.other_audits)
                    tasks.append((name, setting, n, k, a, next(seeds), args.cache))
    null = _run(_null_cell, tasks, args.workers)
    calibration = []
    for cell in null:
        p = np.asarray(cell["pvalues"])
        for row in rejection_rates(p, args.alphas):
            calibration.append({"procedure": cell["procedure"], "setting": cell["setting"], "n": cell["n"],
                                "n_unpublished": cell["n_unpublished"], "k": cell["k"], **row,
                                "mean_p": float(p.mean()), "cpu_s_per_audit": cell["cpu_s"] / len(p)})
    pooled = []
    for name in args.procedures:
        for setting in [*SETTINGS, "all"]:
            p = [np.asarray(c["pvalues"]) for c in null if c["procedure"] == name and setting in (c["setting"], "all")]
            if p:
                p = np.concatenate(p)
                for row in rejection_rates(p, args.alphas):
                    pooled.append({"procedure": name, "setting": setting, **row, "mean_p": float(p.mean())})

    # 1b. confirmation: a default cell whose 95 % interval lies above α is re-run with fresh, 3× as many audits.
    #     Both runs are reported; with ~36 cell × α rows, about one such row is expected by chance alone.
    confirmation = []
    if args.confirm:
        flagged = {(r["setting"], r["n"], r["k"]) for r in calibration
                   if r["procedure"] == "crossfit-permutation" and not r["calibrated"]}
        tasks = [("crossfit-permutation", setting, n, k, 3 * args.audits, 10**6 + i, args.cache)
                 for i, (setting, n, k) in enumerate(sorted(flagged))]
        for cell in _run(_null_cell, tasks, args.workers):
            p = np.asarray(cell["pvalues"])
            for row in rejection_rates(p, args.alphas):
                confirmation.append({"procedure": cell["procedure"], "setting": cell["setting"], "n": cell["n"],
                                     "n_unpublished": cell["n_unpublished"], "k": cell["k"], **row,
                                     "mean_p": float(p.mean())})

    # 2. blocked vs plain permutations on identical audits
    blocking = []
    if args.block_audits:
        s = next(seeds)
        for cell in _run(_block_cell, [("auto", args.block_audits, s, args.cache), (1, args.block_audits, s, args.cache)],
                         args.workers):
            p = np.asarray(cell["pvalues"])
            blocking.append({"block_size": cell["block_size"], "audits": len(p),
                             **{f"power@{a}": float(np.mean(p <= a)) for a in args.alphas}, "mean_p": float(p.mean())})

    # 3. ridge-strength sweep (same audits for every ρ within a scenario)
    ridge_sweep = []
    if args.ridge_audits:
        tasks = []
        for scen in RIDGE_SCENARIOS:
            s = next(seeds)
            tasks += [(scen, r, args.ridge_audits, s) for r in RIDGE_VALUES]
        for cell in _run(_ridge_cell, tasks, args.workers):
            p = np.asarray(cell["pvalues"])
            ridge_sweep.append({"scenario": cell["scenario"], "ridge": cell["ridge"], "audits": len(p),
                                **{f"power@{a}": float(np.mean(p <= a)) for a in args.alphas},
                                "mean_p": float(p.mean())})

    # 4. benchmark (single process, nothing else of ours running)
    bench = statistics_cost(args.bench_n, next(seeds), scorers=tuple(COST_SCORERS)) if args.bench_n else []

    summary = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date_utc": started.isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "numpy": np.__version__},
        "args": vars(args),
        "calibration": calibration, "calibration_pooled": pooled, "confirmation": confirmation, "blocking": blocking,
        "ridge_sweep": ridge_sweep, "benchmark": bench, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    _print(summary, args.alphas)
    with open(args.out, "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"\nwrote {args.out}")
    return summary


def _print(s, alphas):
    print(f"# {s['command']}  ({s['date_utc']}, {s['host']['cpus']} CPUs)\n")
    print("## Calibration: null rejection rate [95% CI] per procedure × setting × n × k × α")
    print("| procedure | setting | n_P | n_U | k | audits | α | rate | 95% CI | ≤ α within CI | mean p |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in s["calibration"]:
        print(f"| {r['procedure']} | {r['setting']} | {r['n']} | {r['n_unpublished']} | {r['k']} | {r['audits']} | "
              f"{r['alpha']} | {r['rate']:.4f} | [{r['ci_low']:.4f}, {r['ci_high']:.4f}] | "
              f"{'yes' if r['calibrated'] else 'NO'} | {r['mean_p']:.3f} |")
    print("\n## Calibration pooled over cells")
    print("| procedure | setting | audits | α | rate | 95% CI | ≤ α within CI | mean p |")
    print("|---|---|---|---|---|---|---|---|")
    for r in s["calibration_pooled"]:
        print(f"| {r['procedure']} | {r['setting']} | {r['audits']} | {r['alpha']} | {r['rate']:.4f} | "
              f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}] | {'yes' if r['calibrated'] else 'NO'} | {r['mean_p']:.3f} |")
    if s.get("confirmation"):
        print("\n## Confirmation runs (fresh seeds, 3× the audits) of cells whose interval lay above α")
        print("| procedure | setting | n_P | n_U | k | audits | α | rate | 95% CI | ≤ α within CI | mean p |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in s["confirmation"]:
            print(f"| {r['procedure']} | {r['setting']} | {r['n']} | {r['n_unpublished']} | {r['k']} | {r['audits']} | "
                  f"{r['alpha']} | {r['rate']:.4f} | [{r['ci_low']:.4f}, {r['ci_high']:.4f}] | "
                  f"{'yes' if r['calibrated'] else 'NO'} | {r['mean_p']:.3f} |")
    if s["blocking"]:
        print("\n## Blocked vs plain permutations (5,000 + 5,000 × 26, dense shift .006, same audits)")
        print("| block_size | audits | " + " | ".join(f"power@{a}" for a in alphas) + " | mean p |")
        print("|---|---|" + "---|" * len(alphas) + "---|")
        for r in s["blocking"]:
            print(f"| {r['block_size']} | {r['audits']} | " + " | ".join(f"{r[f'power@{a}']:.3f}" for a in alphas)
                  + f" | {r['mean_p']:.3f} |")
    if s["ridge_sweep"]:
        print("\n## Ridge strength ρ of the default scorer (n = 300 + 300, k = 26, cap 999)")
        print("| scenario | ρ | audits | " + " | ".join(f"power@{a}" for a in alphas) + " | mean p |")
        print("|---|---|---|" + "---|" * len(alphas) + "---|")
        for r in s["ridge_sweep"]:
            print(f"| {r['scenario']} | {r['ridge']:g} | {r['audits']} | "
                  + " | ".join(f"{r[f'power@{a}']:.3f}" for a in alphas) + f" | {r['mean_p']:.3f} |")
    if s["benchmark"]:
        print("\n## Benchmark: default test, one process, BLAS 1 thread")
        print("| case | scorer | n_P + n_U | block | cap | permutations | p | CPU s | wall s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in s["benchmark"]:
            print(f"| {r['case']} | {r['scorer']} | {r['n_published']}+{r['n_unpublished']} | {r['block_size']} | "
                  f"{r['max_permutations']} | {r['permutations_drawn']} | {r['pvalue']:.3g} | {r['cpu_s']} | {r['wall_s']} |")
    print(f"\ntotal wall time {s['wall_s']} s")


if __name__ == "__main__":
    main(parse_args())

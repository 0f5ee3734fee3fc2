"""Power under planted shifts and seed-to-seed spread of the p-value (issue 17 targets).

1. power — n = 200 + 200, k = 26, α ∈ {0.01, 0.05}: the issue's three settings (δ = .15 and .3
   on 3 of 26 features, δ = .05 on all 26) with the shift planted in the direction every CDI
   feature has (``known``: members lower), in random directions per feature (``random``: a prior
   direction is right for half of them) and against it (``opposite``); plus the earlier job's
   small-n and large-n scenarios. Procedures: the default (directional scorer), the previous
   default (ridge scorer, one fold assignment, h = 10), the ridge scorer averaged over 10 fold
   assignments, ``split`` and Hotelling's T² on the raw features. Same audits for every
   procedure within a scenario.
2. seed spread — SD of log10 p over 30 seeds on fixed data sets (δ = .25 on 3 of 26, n = 200),
   per procedure; the seed moves the folds and the permutations.

    python jobs/power.py --workers 2 --out docs/measurements/power.json
    python jobs/power.py --smoke-test
    python jobs/power.py --markdown docs/measurements/power.json

Cells are cached as they finish (``--cache``), so a killed run resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cdi_ray.stats import run_test  # noqa: E402
from cdi_ray.stats.evaluation import simulate_pvalues, synthetic_audit  # noqa: E402

#: name → (procedure, options). "previous default" is the default before issue 17.
PROCEDURES = {
    "default (directional)": ("crossfit-permutation", {}),
    "previous default (ridge, R=1, h=10)": ("crossfit-permutation", {"scorer": "ridge", "fold_repeats": 1,
                                                                     "stop_exceedances": 10}),
    "ridge, R=10": ("crossfit-permutation", {"scorer": "ridge"}),
    "split": ("split", {}),
    "hotelling": ("hotelling", {}),
}
#: (name, n, k, shift, informative features, modes)
SCENARIOS = [
    ("δ=.15 on 3/26", 200, 26, 0.15, 3, ("known", "random", "opposite")),
    ("δ=.3 on 3/26", 200, 26, 0.30, 3, ("known", "random", "opposite")),
    ("δ=.05 on 26/26", 200, 26, 0.05, None, ("known", "random", "opposite")),
    ("n=50 k=4 δ=.3 dense", 50, 4, 0.30, None, ("known", "random")),
    ("n=1000 k=26 δ=.025 dense", 1000, 26, 0.025, None, ("known", "random")),
]
#: procedures whose power does not depend on the shift's signs (sign-equivariant): run in "known" only
SIGN_FREE = ("previous default (ridge, R=1, h=10)", "ridge, R=10", "split", "hotelling")
ALPHAS = (0.01, 0.05)


def _key(*parts) -> str:
    """Cache key of a cell: its parameters and the library's defaults (a changed default is a new cell)."""
    from cdi_ray.stats import directional, procedures

    defaults = (procedures.PROCEDURES["crossfit-permutation"].defaults, directional.DEFAULT_PRIOR,
                directional.DEFAULT_RIDGE, procedures._SCORER_OPTIONS)
    return hashlib.sha256(json.dumps([parts, defaults], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _power_cell(task):
    name, scen, n, k, shift, inf, mode, audits, seed, cache = task
    proc, opts = PROCEDURES[name]
    file = Path(cache) / f"power-{_key(name, opts, scen, n, k, shift, inf, mode, audits, seed)}.json"
    if file.exists():
        return json.loads(file.read_text())
    t0 = time.process_time()
    p = simulate_pvalues(proc, n, k, audits, seed=seed, shift=shift, informative=inf, mode=mode, **opts)
    out = {"procedure": name, "scenario": scen, "mode": mode, "pvalues": p.tolist(),
           "cpu_s_per_audit": (time.process_time() - t0) / audits}
    file.write_text(json.dumps(out))
    return out


def _spread_cell(task):
    name, data_seed, seeds, cache = task
    proc, opts = PROCEDURES[name]
    file = Path(cache) / f"spread-{_key(name, opts, data_seed, seeds)}.json"
    if file.exists():
        return json.loads(file.read_text())
    P, U = synthetic_audit(200, 200, 26, np.random.default_rng(data_seed), shift=0.25, informative=3)
    p = [run_test(P, U, procedure=proc, seed=s, **opts).pvalue for s in range(seeds)]
    out = {"procedure": name, "data_seed": data_seed, "pvalues": p}
    file.write_text(json.dumps(out))
    return out


def _run(fn, tasks, workers):
    if workers <= 1:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(fn, tasks))


def main(args) -> dict:
    started = datetime.now(timezone.utc)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tasks = []
    for i, (scen, n, k, shift, inf, modes) in enumerate(SCENARIOS):
        for mode in modes:
            seed = args.seed + 1000 * i + {"known": 0, "random": 1, "opposite": 2}[mode]
            for name in PROCEDURES:
                if mode != "known" and name in SIGN_FREE:
                    continue
                audits = args.audits if mode == "known" else args.audits_other
                if name == "ridge, R=10":
                    audits = min(audits, args.audits_ridge10)
                tasks.append((name, scen, n, k, shift, inf, mode, audits, seed, str(cache)))
    power = []
    for cell in _run(_power_cell, tasks, args.workers):
        p = np.asarray(cell["pvalues"])
        power.append({"scenario": cell["scenario"], "mode": cell["mode"], "procedure": cell["procedure"],
                      "audits": len(p), **{f"power@{a}": float(np.mean(p <= a)) for a in ALPHAS},
                      "mean_p": float(p.mean()), "cpu_s_per_audit": cell["cpu_s_per_audit"]})
    spread_tasks = [(name, 9000 + d, args.spread_seeds, str(cache)) for name in PROCEDURES
                    if name not in ("hotelling",) for d in range(args.spread_datasets if name != "ridge, R=10"
                                                                else min(args.spread_datasets, 5))]
    spread = []
    for cell in _run(_spread_cell, spread_tasks, args.workers):
        lp = np.log10(cell["pvalues"])
        spread.append({"procedure": cell["procedure"], "data_seed": cell["data_seed"], "seeds": len(lp),
                       "sd_log10_p": float(lp.std(ddof=1)), "median_p": float(np.median(cell["pvalues"])),
                       "p10": float(np.quantile(cell["pvalues"], 0.1)), "p90": float(np.quantile(cell["pvalues"], 0.9))})
    summary = {"command": "python jobs/power.py " + " ".join(args.argv), "date_utc": started.isoformat(timespec="seconds"),
               "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "numpy": np.__version__},
               "power": power, "spread": spread,
               "wall_s": round((datetime.now(timezone.utc) - started).total_seconds(), 1)}
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(markdown(summary))
    return summary


def markdown(s: dict) -> str:
    lines = [f"`{s['command']}` ({s['date_utc']}, {s['wall_s']} s wall)", "",
             "| scenario | shift planted | procedure | audits | power α=0.01 | power α=0.05 | mean p |",
             "|---|---|---|---|---|---|---|"]
    for r in s["power"]:
        lines.append(f"| {r['scenario']} | {r['mode']} | {r['procedure']} | {r['audits']} | {r['power@0.01']:.3f} | "
                     f"{r['power@0.05']:.3f} | {r['mean_p']:.3f} |")
    lines += ["", "Seed-to-seed spread (δ = .25 on 3 of 26, n = 200; SD of log10 p over seeds, per data set):", "",
              "| procedure | data sets | seeds each | mean SD of log10 p | max SD | median p (mean over data sets) |",
              "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["procedure"] for r in s["spread"]):
        rows = [r for r in s["spread"] if r["procedure"] == name]
        sd = [r["sd_log10_p"] for r in rows]
        lines.append(f"| {name} | {len(rows)} | {rows[0]['seeds']} | {np.mean(sd):.3f} | {np.max(sd):.3f} | "
                     f"{np.mean([r['median_p'] for r in rows]):.4f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audits", type=int, default=1000, help="audits per cell, shift in the known direction")
    p.add_argument("--audits-other", type=int, default=400, help="audits per cell, random / opposite shifts")
    p.add_argument("--audits-ridge10", type=int, default=300, help="at most this many for the R=10 ridge scorer")
    p.add_argument("--spread-datasets", type=int, default=10)
    p.add_argument("--spread-seeds", type=int, default=30)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "cdi-ray" / "power"))
    p.add_argument("--out", default="power.json")
    p.add_argument("--smoke-test", action="store_true")
    p.add_argument("--markdown", metavar="REPORT")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke_test:
        args.audits, args.audits_other, args.audits_ridge10, args.spread_datasets, args.spread_seeds = 4, 2, 2, 1, 3
        args.cache = str(Path(args.cache) / "smoke")
    return args


if __name__ == "__main__":
    _args = parse_args()
    if _args.markdown:
        print(markdown(json.loads(Path(_args.markdown).read_text())))
    else:
        main(_args)

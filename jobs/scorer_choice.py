"""How the default scorer's settings were chosen: the directional scorer's ridge ρ and prior c on the
TUNING half of the demo ``hard`` model, against the ridge scorer (issue 17, item 1).

For each setting: mean p of the default test (cap 999) over random audits at n = 200 and 300,
P from the tuning half's members, U from one half of its held-out images, white-box features
(the paper's 26 columns; ``--preset`` for another). Settings are chosen here, never on the
evaluation half that docs/DEMO_DATA.md reports.

    python jobs/scorer_choice.py --out docs/measurements/scorer_choice.json
    python jobs/scorer_choice.py --markdown docs/measurements/scorer_choice.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from demo_halves import DEFAULT_CACHE, part_features  # noqa: E402

RIDGES = (0.03, 0.1, 0.3, 1.0)
PRIORS = (0.0, 0.5, 1.0)


def settings() -> dict[str, dict]:
    out = {f"directional ρ={r:g} c={c:g}": {"scorer": "directional", "ridge": r, "prior": c}
           for r in RIDGES for c in PRIORS}
    out["ridge ρ=1, R=1 (previous default)"] = {"scorer": "ridge", "ridge": 1.0, "fold_repeats": 1}
    out["ridge ρ=1, R=10"] = {"scorer": "ridge", "ridge": 1.0, "fold_repeats": 10}
    return out


def main(args) -> dict:
    from cdi_ray.stats import mean_pvalue_curve

    Xm, Xh, cols = part_features("hard", "tune", preset=args.preset, cache=Path(args.cache))
    perm = np.random.default_rng(args.seed).permutation(len(Xh))
    u_pool, nm_pool = Xh[perm[: len(perm) // 2]], Xh[perm[len(perm) // 2:]]
    rows = {}
    for name, opts in settings().items():
        reps = args.repeats if opts["scorer"] == "directional" or opts.get("fold_repeats") == 1 else args.repeats // 4
        curve = mean_pvalue_curve(Xm, nm_pool, u_pool, ns=args.ns, repeats=reps, seed=args.seed,
                                  max_permutations=999, **opts)
        rows[name] = {"options": opts, "repeats": reps,
                      "mean_p": {str(n): float(p) for n, p in zip(curve.ns, curve.mean_p)},
                      "share_p_le_0.01": {str(n): float(np.mean(r <= 0.01)) for n, r in zip(curve.ns, curve.pvalues)}}
        print(f"{name:40s} " + "  ".join(f"n={n}: {v:.4f}" for n, v in rows[name]["mean_p"].items()), flush=True)
    report = {"date": date.today().isoformat(), "command": "python jobs/scorer_choice.py " + " ".join(args.argv),
              "data": f"demo hard, tuning half, preset {args.preset}", "settings": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


def markdown(report: dict) -> str:
    rows = report["settings"]
    ns = list(next(iter(rows.values()))["mean_p"])
    lines = [f"Measured {report['date']} with `{report['command']}` ({report['data']}; cap 999).", "",
             "| scorer setting | audits | " + " | ".join(f"mean p, n = {n} (share ≤ 0.01)" for n in ns) + " |",
             "|---|---|" + "---|" * len(ns)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['repeats']} | " + " | ".join(
            f"{r['mean_p'][n]:.4f} ({r['share_p_le_0.01'][n]:.2f})" for n in ns) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=[200, 300])
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--preset", default="white-box")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--out", default="scorer_choice.json")
    p.add_argument("--markdown", metavar="REPORT")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


if __name__ == "__main__":
    _args = parse_args()
    if _args.markdown:
        print(markdown(json.loads(Path(_args.markdown).read_text())))
    else:
        main(_args)

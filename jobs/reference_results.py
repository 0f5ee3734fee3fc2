"""Reference results on the demo models: the paper's evaluations, reproduced on our own data.

For each shipped demo model this job extracts (cached) the features of its members and of the
bundle's held-out pool in-process — the same ``FeatureExtractor`` the pipeline's actors run, on
the PNG bytes ``cdi-ray demo`` writes, so content hashes and every random draw match the
pipeline's — and reports, per feature preset:

1. single-feature MIA: TPR at FPR = 1 % and AUC per column family (best column), lower = member;
2. minimum |P| for mean p < 0.01 per feature group and procedure, on METHOD.md's n-grid;
3. partial use: mean p with P = (1 − r)·members + r·held-out, r ∈ {0, .1, .3, .5, .8};
4. false-positive rate, held-out vs held-out, of the default and of the paper's procedures.

Data (``jobs/demo_halves.py``): ``hard`` is reported on its EVALUATION half (1,000 members,
1,250 held-out) — every setting of the statistics and of the ``efficient`` preset was chosen on
its tuning half; ``easy`` (never used for tuning) is reported whole. U is always drawn from one
fixed half of the held-out images of the part, P's non-members from the other.

    python jobs/reference_results.py --out docs/measurements/reference_results.json     # ~1 h on 2 busy cores
    python jobs/reference_results.py --smoke-test
    python jobs/reference_results.py --markdown docs/measurements/reference_results.json
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

#: Feature groups of the paper's ablation (column prefixes of the white-box preset).
GROUPS = {
    "MIAs": ("dl", "secmi", "pia", "pian"),
    "GM": ("gm_",),
    "ML": ("ml_",),
    "NO": ("no_",),
    "all": ("",),
}
MIX_R = (0.0, 0.1, 0.3, 0.5, 0.8)
#: Procedures compared: name → (procedure, options). "previous default" = before issue 17.
PROCEDURES = {
    "default": ("crossfit-permutation", {}),
    "previous default": ("crossfit-permutation", {"scorer": "ridge", "fold_repeats": 1, "stop_exceedances": 10}),
}
#: (model, part) evaluated; hard's tuning half is never reported.
PARTS = {"hard": "eval", "easy": "all"}
#: Grid points shown in the markdown tables (around each model's minimum |P|).
SHOWN_NS = {"hard": ("100", "200", "300", "400"), "easy": ("10", "20", "30", "40", "50")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(PARTS))
    p.add_argument("--presets", nargs="+", default=["white-box", "gray-box", "efficient"])
    p.add_argument("--repeats", type=int, default=20, help="random audits per n for the mean-p curves")
    p.add_argument("--null-repeats", type=int, default=200, help="held-out vs held-out audits per procedure")
    p.add_argument("--null-n", type=int, default=200, help="|P| = |U| of the held-out vs held-out audits")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="feature cache folder")
    p.add_argument("--out", default="reference_results.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: the 16×16 demo UNet gains little from more, and an "
                        "oversubscribed pool is ~100× slower on a busy machine)")
    p.add_argument("--max-permutations", type=int, default=999,
                   help="permutation cap in the curves: mean p < 0.01 needs no finer floor than 1e-3")
    p.add_argument("--smoke-test", action="store_true", help="easy model, white-box, 60 images per pool, 3 repeats")
    p.add_argument("--markdown", metavar="REPORT", help="print the docs' tables of a written report and exit")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def columns_of(columns: list[str], prefixes: tuple[str, ...]) -> list[int]:
    return [j for j, c in enumerate(columns) if any(c == p or (p.endswith("_") or p == "") and c.startswith(p) for p in prefixes)]


def _families(columns: list[str]) -> list[str]:
    """Column families: the part before ``_t`` (``ml_t100`` → ``ml``), else the column."""
    return list(dict.fromkeys(c.split("_t")[0] if "_t" in c else c for c in columns))


def _grid() -> list[int]:
    from cdi_ray.stats import N_GRID

    return list(N_GRID)


def _curve(curve) -> dict:
    return {str(int(n)): float(p) for n, p in zip(curve.ns, curve.mean_p)}


def evaluate(members: np.ndarray, heldout: np.ndarray, columns: list[str], preset: str, args) -> dict:
    from cdi_ray.stats import mean_pvalue_curve, mia_table, minimum_samples, run_test

    out: dict = {"n_members": len(members), "n_heldout": len(heldout), "columns": columns}
    # 1. single-feature MIA, best column per family
    table = mia_table(members, heldout, columns)
    out["mia"] = {}
    for fam in _families(columns):
        rows = [r for r in table.rows if r.name == fam or r.name.startswith(fam + "_t")]
        r = max(rows, key=lambda r: r.auc)
        out["mia"][fam] = {"column": r.name, "tpr_at_1pct_fpr": r.tpr_at_1pct_fpr, "auc": r.auc}
    # U from one half of the held-out images, P's non-members from the other
    perm = np.random.default_rng(args.seed).permutation(len(heldout))
    u_pool, nm_pool = heldout[perm[: len(perm) // 2]], heldout[perm[len(perm) // 2:]]
    n_max = min(len(members), len(u_pool), len(nm_pool))
    ns = [n for n in _grid() if n <= n_max]
    groups = GROUPS if preset == "white-box" else {"all": ("",)}
    # 2. minimum |P| per feature group and procedure
    out["minimum_n"] = {}
    for proc_name, (proc, opts) in PROCEDURES.items():
        for group, prefixes in groups.items():
            if proc_name != "default" and group != "all":
                continue
            cols = columns_of(columns, prefixes)
            curve = mean_pvalue_curve(members[:, cols], nm_pool[:, cols], u_pool[:, cols], ns=ns, repeats=args.repeats,
                                      seed=args.seed, procedure=proc, max_permutations=args.max_permutations, **opts)
            out["minimum_n"][f"{proc_name}|{group}"] = {"minimum_n": minimum_samples(curve), "curve": _curve(curve)}
            print(f"  {preset} {proc_name} {group}: min |P| = {minimum_samples(curve)}", flush=True)
    # 3. partial use (default, all features)
    out["partial"] = {}
    pns = [n for n in (50, 100, 200, 400, 600) if n <= n_max]
    for r in MIX_R:
        curve = mean_pvalue_curve(members, nm_pool, u_pool, ns=pns, repeats=args.repeats, mix_r=r, seed=args.seed,
                                  max_permutations=args.max_permutations)
        out["partial"][str(r)] = _curve(curve)
    # 4. false positives: held-out vs held-out
    out["null"] = {}
    n = min(args.null_n, len(heldout) // 2)
    for name, (procedure, opts) in {**PROCEDURES, "paper-one-sided": ("paper-one-sided", {}),
                                    "paper-two-sided": ("paper-two-sided", {})}.items():
        ps = []
        for j in range(args.null_repeats):
            idx = np.random.default_rng([args.seed, j]).permutation(len(heldout))
            ps.append(run_test(heldout[idx[:n]], heldout[idx[n:2 * n]], procedure=procedure, seed=j, **opts).pvalue)
        ps = np.asarray(ps)
        out["null"][name] = {"n": n, "repeats": len(ps), "fpr_at_0.01": float(np.mean(ps <= 0.01)),
                             "fpr_at_0.05": float(np.mean(ps <= 0.05)), "mean_p": float(ps.mean())}
    return out


def markdown(report: dict) -> str:
    """The tables docs/DEMO_DATA.md quotes, from a report this job wrote."""
    lines = [f"Measured {report['date']} with `{report['command']}`.", ""]
    for name, per_preset in report["models"].items():
        for preset, res in per_preset.items():
            lines += [f"**{name}**, {res['part']}, preset `{preset}` ({res['n_members']} members, "
                      f"{res['n_heldout']} held-out):", "", "| feature | TPR@1%FPR | AUC |", "|---|---|---|"]
            lines += [f"| {fam} (`{v['column']}`) | {100 * v['tpr_at_1pct_fpr']:.1f} % | {v['auc']:.3f} |"
                      for fam, v in res["mia"].items()]
            mn = res["minimum_n"]
            shown = SHOWN_NS.get(name, ("100", "200", "300", "400"))
            lines += ["", "| procedure — feature group | min \\|P\\| for mean p < 0.01 | "
                      + " | ".join(f"mean p, n = {n}" for n in shown) + " |", "|---|---|" + "---|" * len(shown)]
            for key, v in mn.items():
                c = v["curve"]
                lines.append(f"| {key.replace('|', ' — ')} | {v['minimum_n'] or '> ' + max(c, key=int)} | "
                             + " | ".join(f"{c[n]:.3g}" if n in c else "—" for n in shown) + " |")
            ns = sorted({n for c in res["partial"].values() for n in c}, key=int)
            lines += ["", "| r (share of P not in training) | " + " | ".join(f"mean p, n = {n}" for n in ns) + " |",
                      "|---" * (len(ns) + 1) + "|"]
            lines += [f"| {r} | " + " | ".join(f"{c[n]:.3g}" if n in c else "—" for n in ns) + " |"
                      for r, c in res["partial"].items()]
            lines += ["", "| procedure (held-out vs held-out) | n | repeats | FPR at 0.01 | FPR at 0.05 | mean p |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {proc} | {v['n']} | {v['repeats']} | {100 * v['fpr_at_0.01']:.1f} % | "
                      f"{100 * v['fpr_at_0.05']:.1f} % | {v['mean_p']:.3f} |" for proc, v in res["null"].items()]
            lines += [""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.smoke_test:
        args.models, args.presets, args.repeats, args.null_repeats, args.null_n = ["easy"], ["white-box"], 3, 10, 30
    report = {"date": date.today().isoformat(), "command": "python jobs/reference_results.py " + " ".join(args.argv),
              "parts": {m: PARTS[m] for m in args.models}, "models": {}}
    for name in args.models:
        report["models"][name] = {}
        for preset in args.presets:
            Xm, Xh, columns = part_features(name, PARTS[name], preset=preset, cache=Path(args.cache))
            if args.smoke_test:
                Xm, Xh = Xm[:60], Xh[:120]
            print(f"{name} ({PARTS[name]}) {preset}: {len(Xm)} members, {len(Xh)} held-out", flush=True)
            res = evaluate(Xm, Xh, list(columns), preset, args)
            res["part"] = {"eval": "evaluation half", "all": "all images"}[PARTS[name]]
            report["models"][name][preset] = res
            Path(args.out).write_text(json.dumps(report, indent=1))  # partial results survive an interruption
    return report


if __name__ == "__main__":
    _args = parse_args()
    if _args.markdown:
        print(markdown(json.loads(Path(_args.markdown).read_text())))
    else:
        main(_args)

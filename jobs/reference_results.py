"""Reference results on the demo models: the paper's evaluations, reproduced on our own data.

For each shipped demo model (``easy``, ``hard``) this job extracts the white-box features of its
members and of the bundle's held-out pool (in-process, the same ``FeatureExtractor`` the pipeline's
actors run, on the PNG bytes ``cdi-ray demo`` writes — so the content hashes and therefore every
random draw match the pipeline's), then reports:

1. single-feature MIA: TPR at FPR = 1 % and AUC per feature family (best column of multi-column
   families), lower raw feature = member;
2. minimum |P| for mean p < 0.01 per feature group (MIAs, GM, ML, NO, all), on METHOD.md's n-grid;
3. partial use: mean p with P = (1 − r)·members + r·held-out, r ∈ {0, .1, .3, .5, .8};
4. false-positive rate, held-out vs held-out, of the default and of the paper's procedures.

    python jobs/reference_results.py --out docs/reference_results.json      # both models (~15 min on 2 cores)
    python jobs/reference_results.py --smoke-test                           # tiny, seconds

Features are cached (``--cache``) so the statistics can be re-run without the model.
"""
from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

import numpy as np

#: Feature groups of the paper's ablation (column prefixes of the white-box preset).
GROUPS = {
    "MIAs": ("dl", "secmi", "pia", "pian"),
    "GM": ("gm_",),
    "ML": ("ml_",),
    "NO": ("no_",),
    "all": ("",),
}
FAMILIES = ("dl", "secmi", "pia", "pian", "gm_", "ml_", "no_")
MIX_R = (0.0, 0.1, 0.3, 0.5, 0.8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["easy", "hard"])
    p.add_argument("--repeats", type=int, default=20, help="random audits per n for the mean-p curves")
    p.add_argument("--null-repeats", type=int, default=200, help="held-out vs held-out audits per procedure")
    p.add_argument("--null-n", type=int, default=200, help="|P| = |U| of the held-out vs held-out audits")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "cdi-ray" / "reference"), help="feature cache folder")
    p.add_argument("--out", default="reference_results.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: the 16×16 demo UNet gains little from more, and an "
                        "oversubscribed pool is ~100× slower on a busy machine)")
    p.add_argument("--max-permutations", type=int, default=999,
                   help="cap of the default test in the curves: mean p < 0.01 needs no finer floor than 1e-3")
    p.add_argument("--smoke-test", action="store_true", help="easy model, 60 images per pool, 3 repeats")
    p.add_argument("--markdown", metavar="REPORT", help="print the docs' tables of a written report and exit")
    return p.parse_args(argv)


def columns_of(columns: list[str], prefixes: tuple[str, ...]) -> list[int]:
    return [j for j, c in enumerate(columns) if any(c == p or (p.endswith("_") or p == "") and c.startswith(p) for p in prefixes)]


def evaluate(members: np.ndarray, heldout: np.ndarray, columns: list[str], args) -> dict:
    from cdi_ray.stats import mean_pvalue_curve, mia_table, minimum_samples, run_test

    rng = np.random.default_rng(args.seed)
    out: dict = {"n_members": len(members), "n_heldout": len(heldout)}
    # 1. single-feature MIA, best column per family
    table = mia_table(members, heldout, columns)
    best = {}
    for fam in FAMILIES:
        rows = [r for r in table.rows if r.name == fam or (fam.endswith("_") and r.name.startswith(fam))]
        r = max(rows, key=lambda r: r.auc)
        best[fam.rstrip("_")] = {"column": r.name, "tpr_at_1pct_fpr": r.tpr_at_1pct_fpr, "auc": r.auc}
    out["mia"] = best
    # Pools: U always from one half of the held-out pool, P's non-members from the other half.
    perm = rng.permutation(len(heldout))
    u_pool, nm_pool = heldout[perm[: len(perm) // 2]], heldout[perm[len(perm) // 2:]]
    n_max = min(len(members), len(u_pool), len(nm_pool))
    # 2. minimum |P| per feature group
    out["minimum_n"] = {}
    for group, prefixes in GROUPS.items():
        cols = columns_of(columns, prefixes)
        curve = mean_pvalue_curve(members[:, cols], nm_pool[:, cols], u_pool[:, cols],
                                  ns=[n for n in _grid() if n <= n_max], repeats=args.repeats, seed=args.seed,
                                  max_permutations=args.max_permutations)
        out["minimum_n"][group] = {"minimum_n": minimum_samples(curve), "curve": _curve(curve)}
    # 3. partial use (all features)
    out["partial"] = {}
    ns = [n for n in (50, 100, 200, 400) if n <= n_max]
    for r in MIX_R:
        curve = mean_pvalue_curve(members, nm_pool, u_pool, ns=ns, repeats=args.repeats, mix_r=r, seed=args.seed,
                                  max_permutations=args.max_permutations)
        out["partial"][str(r)] = _curve(curve)
    # 4. false positives: held-out vs held-out
    out["null"] = {}
    n = min(args.null_n, len(heldout) // 2)
    for procedure in ("crossfit-permutation", "paper-one-sided", "paper-two-sided"):
        ps = []
        for j in range(args.null_repeats):
            idx = np.random.default_rng([args.seed, j]).permutation(len(heldout))
            ps.append(run_test(heldout[idx[:n]], heldout[idx[n:2 * n]], procedure=procedure, seed=j).pvalue)
        ps = np.asarray(ps)
        out["null"][procedure] = {"n": n, "repeats": len(ps), "fpr_at_0.01": float(np.mean(ps <= 0.01)),
                                  "fpr_at_0.05": float(np.mean(ps <= 0.05)), "mean_p": float(ps.mean())}
    return out


def _grid() -> list[int]:
    from cdi_ray.stats import N_GRID

    return list(N_GRID)


def _curve(curve) -> dict:
    return {str(int(n)): float(p) for n, p in zip(curve.ns, curve.mean_p)}


def markdown(report: dict) -> str:
    """The tables docs/DEMO_DATA.md quotes, from a report this job wrote."""
    lines = [f"Measured {report['date']} with `{report['command']}`.", ""]
    for name, res in report["models"].items():
        lines += [f"**{name}** ({res['n_members']} members, {res['n_heldout']} held-out):", "",
                  "| feature | TPR@1%FPR | AUC |", "|---|---|---|"]
        lines += [f"| {fam} (`{v['column']}`) | {100 * v['tpr_at_1pct_fpr']:.1f} % | {v['auc']:.3f} |"
                  for fam, v in res["mia"].items()]
        lines += ["", "| feature group | " + " | ".join(res["minimum_n"]) + " |",
                  "|---" * (len(res["minimum_n"]) + 1) + "|",
                  "| min \\|P\\| for mean p < 0.01 | " + " | ".join(
                      str(v["minimum_n"] or "> " + max(v["curve"], key=int)) for v in res["minimum_n"].values()) + " |"]
        ns = sorted({n for c in res["partial"].values() for n in c}, key=int)
        lines += ["", "| r (share of P not in training) | " + " | ".join(f"mean p, n = {n}" for n in ns) + " |",
                  "|---" * (len(ns) + 1) + "|"]
        lines += [f"| {r} | " + " | ".join(f"{c[n]:.3g}" if n in c else "—" for n in ns) + " |"
                  for r, c in res["partial"].items()]
        lines += ["", "| procedure (held-out vs held-out) | n | repeats | FPR at 0.01 | FPR at 0.05 | mean p |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {proc} | {v['n']} | {v['repeats']} | {100 * v['fpr_at_0.01']:.1f} % | {100 * v['fpr_at_0.05']:.1f} % "
                  f"| {v['mean_p']:.3f} |" for proc, v in res["null"].items()]
        lines += [""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    from cdi_ray.demo.bundle import load_split
    from cdi_ray.demo.features import demo_features

    import torch

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    if args.smoke_test:
        args.models, args.repeats, args.null_repeats, args.null_n = ["easy"], 3, 10, 30
    report = {"date": date.today().isoformat(), "command": "python jobs/reference_results.py " +
              ("--smoke-test" if args.smoke_test else f"--repeats {args.repeats} --null-repeats {args.null_repeats}"),
              "models": {}}
    for name in args.models:
        split = load_split(name)
        members, heldout = np.asarray(split["members"]), np.asarray(split["heldout"])
        if args.smoke_test:
            members, heldout = members[:60], heldout[:120]
        Xm, columns, sm = demo_features(name, members, seed=args.seed, cache=cache)
        Xh, _, sh = demo_features(name, heldout, seed=args.seed, cache=cache)
        res = evaluate(Xm, Xh, columns, args)
        res["extraction_images_per_s"] = round((len(Xm) + len(Xh)) / max(sm + sh, 1e-9), 1)
        report["models"][name] = res
        print(json.dumps({name: {k: res[k] for k in ("mia", "null")}}, indent=1))
        print(json.dumps({name: {g: v["minimum_n"] for g, v in res["minimum_n"].items()}}))
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    _args = parse_args()
    if _args.markdown:
        print(markdown(json.loads(Path(_args.markdown).read_text())))
    else:
        main(_args)

"""Feature signal against compute, and the feature preset chosen at a fixed pass budget (issue 17, item 3).

Everything here runs on the TUNING half of the demo ``hard`` model (``jobs/demo_halves.py``);
the chosen preset is then reported on the evaluation half and on ``easy`` by
``jobs/reference_results.py``. Inputs: the per-draw bank of ``jobs/feature_bank.py`` and the
paper's white-box features (both cached).

1. single-quantity signal: AUC (lower = member) and Cohen's d of
   * the denoising loss at each timestep t averaged over n = 1, 2, 4, 8 noise draws,
   * PIA at each t and norm order p, SecMI with the inversion reaching t, Noise Optimisation settings,
   * the 26 white-box columns;
2. candidate feature sets of at most :data:`PASS_BUDGET` forward passes per image (the gray-box
   preset's cost) — mean p of the default test over random audits at each n of :data:`NS` and
   the minimum |P| (smallest such n with mean p < 0.01); the candidate with the smallest minimum
   |P| (ties: the smaller average of log10 mean p over NS) becomes the ``efficient`` preset.

    python jobs/feature_signal.py --out docs/measurements/feature_signal.json     # ≈ 10 min of statistics
    python jobs/feature_signal.py --markdown docs/measurements/feature_signal.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from demo_halves import DEFAULT_CACHE, cached_features, demo_halves  # noqa: E402
from feature_bank import LOSS_DRAWS, bank  # noqa: E402

#: Forward passes per image a candidate may spend: the gray-box preset's 28.
PASS_BUDGET = 28
#: A finer grid than METHOD.md's between 50 and 200, so candidates that all reach p < 0.01 at
#: the grid's 200 can still be told apart.
NS = (60, 80, 100, 120, 140, 160, 200, 300)


def _loss(B: dict, t: int, n: int) -> np.ndarray:
    return np.mean([B[f"loss_t{t}_d{k}"] for k in range(n)], axis=0)


def candidates(B: dict, W: dict) -> dict[str, dict]:
    """Candidate feature sets: name → {cols: name → values, passes: forward passes per image}.

    Costs count distinct forward passes per image: a loss draw 1; PIA 1 per timestep plus the
    shared f(z, 0) (any number of norm orders p from one residual); SecMI to t: t/10 − 1 inversion
    steps after the shared f(z, 0), + 2. Defined after the single-quantity table of the tuning
    half showed PIA strongest at t = 40–75 with p ≥ 4 and the losses at t = 50–150.
    """
    def losses(ts, n):
        return {f"dlm_t{t}": _loss(B, t, n) for t in ts}

    def pia(ts, ps):
        return {f"piam_t{t}_p{p:g}": B[f"pia_t{t}_p{p:g}"] for t in ts for p in ps}

    small_t = (20, 30, 40, 50, 75, 100)
    out = {
        "gray-box (paper)": ({c: W[c] for c in W if not c.startswith(("gm_", "no_"))}, 28),
        "white-box (paper)": (dict(W), None),
        "dl (paper: t=100, 5 draws)": ({"dl": W["dl"]}, 5),
        "pia (paper: t=200, p=5)": ({"pia": W["pia"]}, 2),
        "pia t=50, p=5": (pia((50,), (5,)), 2),
        "pia t=30,50,75,100, p=5": (pia((30, 50, 75, 100), (5,)), 5),
        "pia t=20–100, p=2,5": (pia(small_t, (2, 5)), 7),
        "pia t=10–100, p=2–8": (pia((10,) + small_t, (2, 3, 4, 5, 6, 8)), 8),
        "dlm t=50,75,100,150 × 7": (losses((50, 75, 100, 150), 7), 28),
        "pia t=20–100, p=5 + dlm t=50,75,100,150,200 × 4": ({**pia(small_t, (5,)), **losses((50, 75, 100, 150, 200), 4)},
                                                          7 + 20),
        "pia t=30–100, p=2,4,8 + dlm t=50,100,150 × 6": ({**pia((30, 40, 50, 75, 100), (2, 4, 8)),
                                                         **losses((50, 100, 150), 6)}, 6 + 18),
        "pia t=30,50,75,100, p=5 + dlm t=50,75,100,150 × 4 + secmi t=40": (
            {**pia((30, 50, 75, 100), (5,)), **losses((50, 75, 100, 150), 4), "secmi_t40": B["secmi_t40"]}, 5 + 16 + 5),
        "pia t=10–100, p=2–8 + dlm t=50,75,100,150 × 5": ({**pia((10,) + small_t, (2, 3, 4, 5, 6, 8)),
                                                         **losses((50, 75, 100, 150), 5)}, 8 + 20),
        "pia t=20–100, p=2,5 + dlm t=75 × 8 + secmi t=20": ({**pia(small_t, (2, 5)), **losses((75,), 8),
                                                            "secmi_t20": B["secmi_t20"]}, 7 + 8 + 3),
    }
    return {name: {"cols": cols, "columns": list(cols), "passes": passes} for name, (cols, passes) in out.items()}


def single_signal(members: dict, heldout: dict) -> list[dict]:
    from cdi_ray.stats import mia_table

    names = list(members)
    table = mia_table(np.stack([members[c] for c in names], 1), np.stack([heldout[c] for c in names], 1), names)
    rows = []
    for r in table.rows:
        a, b = members[r.name], heldout[r.name]
        sp = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
        rows.append({"quantity": r.name, "auc": r.auc, "tpr_at_1pct_fpr": r.tpr_at_1pct_fpr,
                     "cohens_d": float((b.mean() - a.mean()) / sp)})
    return rows


def evaluate(sets: dict, members: dict, heldout: dict, *, repeats: int, seed: int, max_permutations: int) -> dict:
    from cdi_ray.stats import mean_pvalue_curve, minimum_samples

    rng = np.random.default_rng(seed)
    n_h = len(next(iter(heldout.values())))
    perm = rng.permutation(n_h)
    u_idx, nm_idx = perm[: n_h // 2], perm[n_h // 2:]
    out = {}
    for name, c in sets.items():
        t0 = time.perf_counter()
        M = np.stack([members[k] for k in c["columns"]], 1)
        H = np.stack([heldout[k] for k in c["columns"]], 1)
        curve = mean_pvalue_curve(M, H[nm_idx], H[u_idx], ns=list(NS), repeats=repeats, seed=seed,
                                  max_permutations=max_permutations)
        out[name] = {"columns": c["columns"], "passes": c["passes"], "minimum_n": minimum_samples(curve),
                     "mean_p": {str(n): float(p) for n, p in zip(curve.ns, curve.mean_p)},
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:60s} passes={c['passes']}  " + "  ".join(f"n={n}: {p:.4f}" for n, p in out[name]["mean_p"].items()),
              flush=True)
    return out


def main(args) -> dict:
    h = demo_halves("hard")
    mi, hi = h.part("tune")
    cache = Path(args.cache)
    sides = {}
    for side, idx in (("members", mi), ("heldout", hi)):
        B = {}
        for which in ("losses", "proximal") + (("no",) if args.no else ()):
            Xb, cb, _ = bank("hard", idx, which=which, cache=cache)
            B.update({c: Xb[:, j] for j, c in enumerate(cb)})
        Xw, cw, _ = cached_features("hard", idx, cache=cache)
        sides[side] = (B, {c: Xw[:, j] for j, c in enumerate(cw)})
    (Bm, Wm), (Bh, Wh) = sides["members"], sides["heldout"]
    # 1. single quantities
    qm, qh = {}, {}
    for t in sorted({int(c.split("_")[1][1:]) for c in Bm if c.startswith("loss_")}):  # loss_t{t}_d{k}
        for n in (1, 2, 4, LOSS_DRAWS):
            qm[f"loss t={t} n={n}"], qh[f"loss t={t} n={n}"] = _loss(Bm, t, n), _loss(Bh, t, n)
    for c in Bm:
        if not c.startswith("loss_"):
            qm[c], qh[c] = Bm[c], Bh[c]
    for c in Wm:
        qm[f"white-box {c}"], qh[f"white-box {c}"] = Wm[c], Wh[c]
    single = single_signal(qm, qh)
    # 2. candidate sets at the pass budget
    cm, ch = candidates(Bm, Wm), candidates(Bh, Wh)
    members = {f"{n}|{c}": v for n, s in cm.items() for c, v in s["cols"].items()}
    heldout = {f"{n}|{c}": v for n, s in ch.items() for c, v in s["cols"].items()}
    sets = {n: {"columns": [f"{n}|{c}" for c in s["columns"]], "passes": s["passes"]} for n, s in cm.items()}
    results = evaluate(sets, members, heldout, repeats=args.repeats, seed=args.seed,
                       max_permutations=args.max_permutations)
    for r in results.values():
        r["columns"] = [c.split("|", 1)[1] for c in r["columns"]]
    # rule: smallest n with mean p < 0.01 on NS; ties: smaller mean of log10(mean p) over NS
    eligible = {n: r for n, r in results.items() if r["passes"] is not None and r["passes"] <= PASS_BUDGET}
    best = min(eligible, key=lambda n: (eligible[n]["minimum_n"] or 10**9,
                                         float(np.mean(np.log10(list(eligible[n]["mean_p"].values()))))))
    report = {"date": date.today().isoformat(), "command": "python jobs/feature_signal.py " + " ".join(args.argv),
              "data": "demo hard, tuning half (1,000 members, 1,250 held-out); audit seed 0",
              "pass_budget": PASS_BUDGET, "repeats": args.repeats, "max_permutations": args.max_permutations,
              "single": single, "candidates": results, "chosen": best}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"chosen: {best}")
    return report


def markdown(report: dict) -> str:
    lines = [f"Measured {report['date']} with `{report['command']}` on {report['data']}.", "",
             "| quantity | AUC | TPR@1%FPR | Cohen's d |", "|---|---|---|---|"]
    lines += [f"| {r['quantity']} | {r['auc']:.3f} | {100 * r['tpr_at_1pct_fpr']:.1f} % | {r['cohens_d']:+.3f} |"
              for r in report["single"]]
    ns = list(next(iter(report["candidates"].values()))["mean_p"])
    lines += ["", f"Candidate feature sets (budget {report['pass_budget']} forward passes per image; default test, "
                  f"mean p over {report['repeats']} audits, cap {report['max_permutations']}):", "",
              "| feature set | passes | " + " | ".join(f"mean p, n = {n}" for n in ns) + " | min \\|P\\| |",
              "|---|---|" + "---|" * len(ns) + "---|"]
    for name, r in report["candidates"].items():
        mark = " **(chosen)**" if name == report["chosen"] else ""
        lines.append(f"| {name}{mark} | {r['passes'] if r['passes'] is not None else '28 + 16 fwd+bwd + NO'} | "
                     + " | ".join(f"{r['mean_p'][n]:.4f}" for n in ns) + f" | {r['minimum_n'] or '> ' + ns[-1]} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--max-permutations", type=int, default=999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no", action="store_true", help="include the Noise Optimisation settings of the bank")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--out", default="feature_signal.json")
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

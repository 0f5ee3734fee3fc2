"""Evidence for the guards against false accusations, measured on the demo models (issue 10).

For each demo model (``easy``, ``hard``), with white-box features and the model-free descriptors
of the bundle's images (the PNG files ``cdi-ray demo`` writes), in process:

1. four audits, each with and without its guards — (i) members vs held-out; (ii) held-out vs
   held-out; (iii) a shifted pair the model never saw: held-out classes 0–4 as P against
   held-out classes 5–9 as U; (iv) the same shift with genuine members: half of P are members of
   classes 0–4 — plus the same audits on reference-calibrated features (target minus the other
   demo model, which saw none of these members);
2. false-``used`` rates over random null pairs the model never saw: unshifted (two random halves
   of the held-out pool), shifted (P from a random 5 of the 10 classes, U from the other 5) and
   mildly shifted (P 70 % / 30 % from the two class groups, U the reverse): how often the
   unguarded test and the guarded audit say ``used``, and how often the control fires;
3. minimum |P| for mean p < 0.01 with plain and with reference-calibrated features.

    python jobs/guard_evidence.py --out docs/measurements/guard_evidence.json   # ~10 min once features are cached
    python jobs/guard_evidence.py --smoke-test                                 # easy model, tiny, ~1 min

Features come from the cache ``jobs/reference_results.py`` fills (same key), so run that first.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np

from cdi_ray.demo.features import DEFAULT_CACHE

REFERENCE_OF = {"easy": "hard", "hard": "easy"}   # each saw none of the other's members nor the held-out pool
#: Audit size per model for the four scenarios: the hard model needs ~3× the images (docs/DEMO_DATA.md).
EVIDENCE_N = {"easy": 200, "hard": 600}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["easy", "hard"])
    p.add_argument("--null-repeats", type=int, default=100, help="random null pairs per kind and model")
    p.add_argument("--null-n", type=int, default=200, help="|P| = |U| of the null pairs")
    p.add_argument("--curve-repeats", type=int, default=10, help="random audits per n for the minimum-|P| curves")
    p.add_argument("--max-permutations", type=int, default=999)
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: the 16×16 demo UNet gains little from more, and an "
                        "oversubscribed pool is ~100× slower on a busy machine)")
    p.add_argument("--out", default="guard_evidence.json")
    p.add_argument("--smoke-test", action="store_true", help="easy model only, small n and few repeats")
    return p.parse_args(argv)


class Pools:
    """Features, reference features and descriptors of one model's members and the held-out pool, by bundle index."""

    def __init__(self, model: str, members: np.ndarray, heldout: np.ndarray, *, seed: int, cache: Path):
        from cdi_ray.demo.features import demo_descriptors, demo_features

        self.members, self.heldout = members, heldout
        index = np.concatenate([members, heldout])
        self.row = {int(i): r for r, i in enumerate(index)}
        ref = REFERENCE_OF[model]
        Xm, self.columns, _ = demo_features(model, members, seed=seed, cache=cache)
        Xh, _, _ = demo_features(model, heldout, seed=seed, cache=cache)
        Rm, _, _ = demo_features(ref, members, seed=seed, cache=cache)
        Rh, _, _ = demo_features(ref, heldout, seed=seed, cache=cache)
        self.X, self.R = np.concatenate([Xm, Xh]), np.concatenate([Rm, Rh])
        self.D = demo_descriptors(index)

    def take(self, idx: np.ndarray):
        rows = np.asarray([self.row[int(i)] for i in idx], dtype=np.int64)
        return self.X[rows], self.R[rows], self.D[rows]


def audit(pools: Pools, p_idx, u_idx, *, seed: int, max_permutations: int) -> dict:
    from cdi_ray.controls.evidence import guarded_audit

    XP, RP, DP = pools.take(p_idx)
    XU, RU, DU = pools.take(u_idx)
    return guarded_audit(XP, XU, DP, DU, ref_P=RP, ref_U=RU, seed=seed, max_permutations=max_permutations).to_dict()


def scenarios(pools: Pools, labels: np.ndarray, n: int, rng: np.random.Generator) -> dict[str, tuple]:
    """(i)–(iv) as (P indices, U indices, what)."""
    held, mem = rng.permutation(pools.heldout), rng.permutation(pools.members)
    low, high = held[labels[held] < 5], held[labels[held] >= 5]
    mem_low = mem[labels[mem] < 5]
    n_shift = min(n, len(high), len(low) // 2 * 2)
    half = n_shift // 2
    return {
        "i_members_vs_heldout": (mem[:n], held[:n], "members vs held-out"),
        "ii_heldout_vs_heldout": (held[n:2 * n], held[2 * n:3 * n], "held-out vs held-out"),
        "iii_class_shift": (low[:n_shift], high[:n_shift], "held-out classes 0–4 vs held-out classes 5–9"),
        "iv_class_shift_with_members": (np.concatenate([mem_low[:half], low[:n_shift - half]]), high[:n_shift],
                                        "50 % members + 50 % held-out, classes 0–4, vs held-out classes 5–9"),
    }


def null_pairs(kind: str, heldout: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator):
    """One random null pair of ``kind`` (unshifted / shifted / mild) from the held-out pool."""
    if kind == "unshifted":
        perm = rng.permutation(heldout)
        return perm[:n], perm[n:2 * n]
    group_a = rng.choice(10, 5, replace=False)
    in_a = np.isin(labels[heldout], group_a)
    a, b = rng.permutation(heldout[in_a]), rng.permutation(heldout[~in_a])
    if kind == "shifted":
        return a[:n], b[:n]
    k = int(round(0.7 * n))  # mild: 70/30 against 30/70
    return np.concatenate([a[:k], b[:n - k]]), np.concatenate([a[k:k + n - k], b[n - k:n - k + k]])


def rates(results: list[dict]) -> dict:
    verdicts_g, verdicts_u = Counter(r["guarded"] for r in results), Counter(r["unguarded"] for r in results)
    m = len(results)
    return {"pairs": m,
            "unguarded_used": verdicts_u["used"] / m,
            "guarded_used": verdicts_g["used"] / m,
            "guarded_inconclusive": verdicts_g["inconclusive"] / m,
            "control_fired": sum(r["control_fired"] for r in results) / m,
            "calibrated_guarded_used": sum(r["calibrated_guarded"] == "used" for r in results) / m}


def minimum_n(pools: Pools, *, calibrated: bool, repeats: int, seed: int, max_permutations: int) -> dict:
    from cdi_ray.stats import N_GRID, mean_pvalue_curve, minimum_samples

    X = pools.X - pools.R if calibrated else pools.X
    m = X[: len(pools.members)]
    h = X[len(pools.members):]
    perm = np.random.default_rng(seed).permutation(len(h))
    u_pool, nm_pool = h[perm[: len(h) // 2]], h[perm[len(h) // 2:]]
    n_max = min(len(m), len(u_pool), len(nm_pool))
    curve = mean_pvalue_curve(m, nm_pool, u_pool, ns=[n for n in N_GRID if n <= n_max], repeats=repeats, seed=seed,
                              max_permutations=max_permutations)
    return {"minimum_n": minimum_samples(curve), "curve": {str(int(n)): float(p) for n, p in zip(curve.ns, curve.mean_p)}}


def main(args: argparse.Namespace) -> dict:
    from cdi_ray.demo.bundle import load_bundle, load_split

    if args.smoke_test:
        args.models, args.null_repeats, args.null_n, args.curve_repeats = ["easy"], 5, 60, 2
    import torch

    torch.set_num_threads(args.threads)
    cache, bundle = Path(args.cache), load_bundle()
    report = {"date": date.today().isoformat(), "command": "python jobs/guard_evidence.py" + (
        " --smoke-test" if args.smoke_test else f" --null-repeats {args.null_repeats} --null-n {args.null_n}"),
        "alpha": 0.01, "control_alpha": 0.05, "models": {}}
    for name in args.models:
        split = load_split(name)
        members, heldout = np.asarray(split["members"]), np.asarray(split["heldout"])
        if args.smoke_test:
            members, heldout = members[:100], heldout[:400]
        pools = Pools(name, members, heldout, seed=args.seed, cache=cache)
        n = min(EVIDENCE_N[name], len(members), len(heldout) // 3)
        rng = np.random.default_rng([args.seed, 1])
        res: dict = {"reference_model": REFERENCE_OF[name], "evidence_n": n, "scenarios": {}, "null": {}}
        for key, (p_idx, u_idx, what) in scenarios(pools, bundle.labels, n, rng).items():
            res["scenarios"][key] = {"what": what, **audit(pools, p_idx, u_idx, seed=args.seed,
                                                             max_permutations=args.max_permutations)}
        for kind in ("unshifted", "shifted", "mild"):
            runs = []
            for j in range(args.null_repeats):
                p_idx, u_idx = null_pairs(kind, heldout, bundle.labels, args.null_n, np.random.default_rng([args.seed, 2, j]))
                runs.append(audit(pools, p_idx, u_idx, seed=j, max_permutations=args.max_permutations))
            res["null"][kind] = {"n": args.null_n, **rates(runs)}
        res["minimum_n"] = {
            kind: minimum_n(pools, calibrated=kind == "calibrated", repeats=args.curve_repeats, seed=args.seed,
                            max_permutations=args.max_permutations)
            for kind in ("plain", "calibrated")}
        report["models"][name] = res
        print(json.dumps({name: {"scenarios": {k: {f: v[f] for f in ("pvalue", "control_pvalue", "unguarded", "guarded",
                                                                     "calibrated_pvalue", "calibrated_guarded")}
                                               for k, v in res["scenarios"].items()},
                                 "null": res["null"],
                                 "minimum_n": {k: v["minimum_n"] for k, v in res["minimum_n"].items()}}}, indent=1),
              flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(parse_args())

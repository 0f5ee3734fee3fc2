"""Compare the e2e section of benchmark runs of two code versions (an A/B, e.g. ABBA on one machine).

A ratio to the floor divides by a floor re-measured for ~1.5 s right before each case, and on a
shared machine that floor alone moves by ±10 % between cases. The question "did the pipeline get
costlier" is answered by what both versions spent on the same work (2,000 images, same passes):
the CPU seconds of Ray's workers (actors, tasks, aggregators, Ray Data) per case. This prints, per
case, each run's floor, workers' CPU and ratio; the versions' means; and the ratio of each
version against the *pooled* floor (the mean of every run's floor for that case), so that both
versions are divided by the same number::

    python jobs/benchmark_compare.py base=docs/measurements/ab_2026-12-03/base_1.json \\
        main=docs/measurements/ab_2026-12-03/main_1.json main=docs/measurements/ab_2026-12-03/main_2.json \\
        base=docs/measurements/ab_2026-12-03/base_2.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

WORKERS = ("actors", "tasks", "aggregators", "ray_data")  # jobs.bench.process_meters.ProcessCpu.WORKERS


def load(pairs: list[str]) -> dict[str, dict[str, list[dict]]]:
    """``case → version → [run figures]`` from ``VERSION=FILE`` arguments (benchmark ``--json`` files)."""
    runs: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for pair in pairs:
        version, _, path = pair.partition("=")
        if not path:
            raise SystemExit(f"{pair!r}: write VERSION=FILE, e.g. main=bench.json")
        with open(path) as f:
            e2e = json.load(f)["raw"].get("e2e") or {}
        if not e2e:
            raise SystemExit(f"{path}: no e2e section (run the benchmark with --only e2e)")
        for case, r in e2e.items():
            runs[case][version].append({"file": path, "floor": r["floor_cpu_s"], "actors": r["cpu_s"]["actors"],
                                        "workers": sum(r["cpu_s"][g] for g in WORKERS), "ratio": r["ratio"]["cpu"]})
    return runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="VERSION=FILE")
    runs = load(p.parse_args(argv).runs)
    versions = list(dict.fromkeys(v for case in runs.values() for v in case))
    print("| case | version | floor CPU s per run | workers CPU s per run | actors CPU s per run | cpu ratio per run "
          "(mean) | workers CPU s, mean | ratio to the pooled floor |")
    print("|---|---|---|---|---|---|---|---|")
    pooled_ratio: dict[str, list[float]] = defaultdict(list)
    for case, by_version in runs.items():
        pooled = statistics.fmean(r["floor"] for rs in by_version.values() for r in rs)
        for v in versions:
            rs = by_version.get(v, [])
            if not rs:
                continue
            workers = statistics.fmean(r["workers"] for r in rs)
            pooled_ratio[v].append(pooled / workers)
            fmt = lambda key, d=1: ", ".join(f"{r[key]:.{d}f}" for r in rs)  # noqa: E731
            print(f"| {case} | {v} | {fmt('floor')} | {fmt('workers')} | {fmt('actors')} | {fmt('ratio', 3)} "
                  f"({statistics.fmean(r['ratio'] for r in rs):.3f}) | {workers:.1f} | {pooled / workers:.3f} |")
    print()
    for v in versions:
        per_run = [r["ratio"] for case in runs.values() for r in case.get(v, [])]
        print(f"{v}: mean cpu ratio per run {statistics.fmean(per_run):.3f} over {len(per_run)} case runs; "
              f"mean ratio to the pooled floor {statistics.fmean(pooled_ratio[v]):.3f}")
    if len(versions) == 2:
        a, b = versions
        diffs = [statistics.fmean(r["workers"] for r in case[b]) / statistics.fmean(r["workers"] for r in case[a]) - 1
                 for case in runs.values() if case.get(a) and case.get(b)]
        print(f"workers' CPU of {b} vs {a}, per case: " + ", ".join(f"{d:+.1%}" for d in diffs)
              + f"; mean {statistics.fmean(diffs):+.1%}")


if __name__ == "__main__":
    main()

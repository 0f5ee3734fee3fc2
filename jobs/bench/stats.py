"""Section ``stats``: the default test on 20,000 + 20,000 × 26 (``statistics_cost`` of
jobs/calibration.py, the function behind STATISTICS.md §8.5)."""
from __future__ import annotations

import importlib.util

from jobs.bench.cluster import ROOT
from jobs.bench.models import Bench
from jobs.bench.table import Row


def section_stats(bench: Bench, args, state: dict) -> list[Row]:
    spec = importlib.util.spec_from_file_location("cdi_ray_calibration", ROOT / "jobs" / "calibration.py")
    calibration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibration)
    rows = []
    for r in calibration.statistics_cost(args.stats_n, seed=0):
        rows.append(Row("stats", f"{r['n_published']:,} + {r['n_unpublished']:,} × {r['k']}, {r['case']}, "
                                 f"block {r['block_size']}, cap {r['max_permutations']}: permutations drawn, p, CPU s, wall s",
                        f"{r['permutations_drawn']}, {r['pvalue']:.3g}, {r['cpu_s']:.2f}, {r['wall_s']:.2f}"))
    return rows

"""Performance benchmark: how close an audit runs to the model's own floor (issue #8).

The cost of an audit is evaluations of the model f; everything else is overhead. One run measures
and prints one table (docs/PERFORMANCE.md records a full run):

1. ``floor``   — f's raw batched throughput, forward and forward+backward w.r.t. the input, per
                 batch size, at the feature actors' thread count; the best batch size is the floor;
2. ``passes``  — passes of f per image of each preset: planned, performed, and METHOD.md's count;
3. ``method``  — the feature extractor alone on decoded images: images/s, and the ratio to the
                 rate the floor allows for the passes it performed;
4. ``e2e``     — ``run_manifest`` through Ray (list → hash → decode → actors → store → aggregator
                 → results) on ≥ 2,000 images from local files and from S3 (a moto server);
5. ``scaling`` — 100 vs 1,000 collections of 20 images against one model, each in a fresh driver
                 process: time ratio, feature-actor (= model load) count, driver peak memory;
6. ``stats``   — the default test on 20,000 + 20,000 × 26 (jobs/calibration.py's benchmark);
7. ``shards``  — small files vs tar vs Parquet shards from S3 (moto), the same images
                 (:func:`jobs.bench.s3_layouts.bench_sources`; docs/PIPELINE.md).

    python jobs/benchmark.py                          # the full run (16 min on an idle 2-core machine)
    python jobs/benchmark.py --quick                  # development: small counts, ~5 min
    python jobs/benchmark.py --only floor,passes,method --preset gray-box
    python jobs/benchmark.py --gpu-dit-xl             # model layer on a DiT-XL/2-256 (random weights, bf16, batch 64)
    python jobs/benchmark.py --gpu-dit-xl --tiny      # the same code path on CPU with a tiny DiT (shape check)

Rates are reported by wall clock and, where the work runs in this process, by CPU time: on a
shared machine CPU time is the steadier clock (other processes stretch the wall clock, not the
CPU seconds a computation needs). Ratios compare figures of the same clock from the same run;
the end-to-end ratio uses a floor re-measured right before that run. Ray's workers run at
niceness 0 here (``RAY_worker_niceness``, default 15) so that on a shared machine the actors
compete for CPU on the same terms as the floor measured in this process.

This file is the entry point (arguments, section selection, the table and its JSON); each section
is one module of ``jobs/bench/`` (floor, passes, method, e2e, scaling, stats, shards), with the
model under test in ``models.py``, the local Ray, moto and child drivers in ``cluster.py`` and the
/proc meters in ``process_meters.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs.bench.cluster import moto_server  # noqa: E402  (the repository root is on the path from here)
from jobs.bench.e2e import e2e_case, section_e2e  # noqa: E402
from jobs.bench.floor import section_floor  # noqa: E402
from jobs.bench.method import section_method  # noqa: E402
from jobs.bench.models import load_bench  # noqa: E402
from jobs.bench.passes import SPEC_PASSES, section_passes  # noqa: E402
from jobs.bench.scaling import scaling_case, section_scaling  # noqa: E402
from jobs.bench.shards import section_shards  # noqa: E402
from jobs.bench.stats import section_stats  # noqa: E402
from jobs.bench.table import Row, format_table  # noqa: E402

#: Every section, in the order a full run measures them (``--only`` picks some and runs them in the
#: order given): each a function ``(bench, args, state) -> list[Row]`` in its own module of jobs/bench/.
SECTION_FUNCS = {"floor": section_floor, "passes": section_passes, "method": section_method, "e2e": section_e2e,
                 "scaling": section_scaling, "stats": section_stats, "shards": section_shards}
SECTIONS = tuple(SECTION_FUNCS)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections ({','.join(SECTIONS)})")
    p.add_argument("--quick", action="store_true", help="small counts for development (noisy figures)")
    p.add_argument("--tiny", action="store_true", help="tiny random models and counts: checks the code path, not speed")
    p.add_argument("--gpu-dit-xl", action="store_true",
                   help="model layer (floor, passes, method) on a DiT-XL/2-256 from config, cuda, bf16 autocast, batch 64")
    p.add_argument("--model", default="easy", help="demo model easy|hard (default easy), or dit-xl")
    p.add_argument("--preset", action="append", dest="presets", choices=sorted(SPEC_PASSES), help="repeatable; default both")
    p.add_argument("--source", action="append", dest="sources", choices=("local", "s3", "s3-tar"),
                   help="repeatable; default local and s3 (small objects); s3-tar: the same images as tar shards on S3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, help="images per extractor call / feature-actor batch (default 64)")
    p.add_argument("--batches", help="batch sizes tried for the floor, e.g. 16,32,64,128")
    p.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per feature actor (default 1)")
    p.add_argument("--actors", type=int, default=1, help="feature actors in the e2e and scaling runs (default 1)")
    p.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs of the local Ray (default 8)")
    p.add_argument("--seconds", type=float, help="seconds per floor measurement")
    p.add_argument("--method-images", type=int, help="images for the method-layer measurement")
    p.add_argument("--e2e-images", type=int, help="images per end-to-end run (half P, half U)")
    p.add_argument("--collections", help="scaling cases, e.g. 100,1000")
    p.add_argument("--images-per-collection", type=int, default=20)
    p.add_argument("--stats-n", type=int, help="|P| = |U| of the statistics benchmark (default 20000)")
    p.add_argument("--json", help="also write the table and raw figures as JSON here")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    # internal: one scaling case in a child driver
    p.add_argument("--scaling-case", type=int, help=argparse.SUPPRESS)
    p.add_argument("--e2e-case", help=argparse.SUPPRESS)
    p.add_argument("--e2e-published", help=argparse.SUPPRESS)
    p.add_argument("--e2e-unpublished", help=argparse.SUPPRESS)
    p.add_argument("--ray-address", help=argparse.SUPPRESS)
    p.add_argument("--model-uri", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scaling_case or args.e2e_case:
        args.batch = args.batch or 64
        return args
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; valid: {','.join(SECTIONS)}")
    if "method" in args.sections or "e2e" in args.sections:
        args.sections = list(dict.fromkeys(["floor", *args.sections]))  # ratios need the floor
    if args.gpu_dit_xl:
        args.model = "dit-xl"
        args.device = args.device if args.device != "cpu" or args.tiny else "cuda"
        args.batch = args.batch or 64
        args.sections = [s for s in args.sections if s in ("floor", "passes", "method")]
    if args.device.startswith("cuda") and not __import__("torch").cuda.is_available():
        p.error(f"device {args.device!r}: no CUDA device here; add --tiny to run the same code path on CPU")
    args.presets = args.presets or ["white-box", "gray-box"]
    args.sources = args.sources or ["local", "s3"]
    args.autocast = "bfloat16" if args.gpu_dit_xl and not args.tiny else None
    args.dtype = __import__("torch").bfloat16 if args.autocast else __import__("torch").float32
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    defaults = {  # per size: batch, floor batches, seconds, method images, e2e images, collections, stats n
        "tiny": (4, "4,8", 0.2, 4, 16, "2,4", 200),
        "quick": (64, "32,64,128", 1.0, 64, 256, "10,100", 2000),
        "full": (64, "16,32,64,128,256", 3.0, 256, 2000, "100,1000", 20000),
    }[size]
    args.batch = args.batch or defaults[0]
    if args.gpu_dit_xl and not args.tiny and not args.batches:
        args.batches = "32,64,128"  # DiT-XL/2's forward+backward activations at 256 rows approach 100 GB
    args.batches = [int(b) for b in (args.batches or defaults[1]).split(",")]
    args.seconds = args.seconds or defaults[2]
    args.method_images = args.method_images or defaults[3]
    args.e2e_images = args.e2e_images or defaults[4]
    args.collections = [int(c) for c in (args.collections or defaults[5]).split(",")]
    args.stats_n = args.stats_n or defaults[6]
    if args.tiny:
        args.images_per_collection = min(args.images_per_collection, 10)  # 5 + 5: the smallest 5-fold test
    return args


def run(args, on_section=None) -> tuple[list[Row], dict]:
    """Run the selected sections; returns the rows and the raw figures. ``on_section(rows, state)``
    is called after each section (the full run saves its progress with it)."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cdi-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(args.workdir or tmp)
        state: dict = {"workdir": str(workdir)}
        bench = load_bench(args, workdir)
        if ("e2e" in args.sections and {"s3", "s3-tar"} & set(args.sources)) or "shards" in args.sections:
            stack.enter_context(moto_server())
        rows = [Row("setup", "model, device, torch threads, autocast",
                    f"{bench.name}, {bench.device}, {torch.get_num_threads()}, {bench.autocast or 'none'}")]
        for section in args.sections:
            t0 = time.perf_counter()
            rows += SECTION_FUNCS[section](bench, args, state)
            print(f"[{section}] {time.perf_counter() - t0:.1f} s, load average {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
            if on_section:
                on_section(rows, state)
    return rows, state


def header(started: _dt.datetime) -> str:
    return (f"# cdi-ray benchmark — {started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}\n# python {' '.join(sys.argv)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scaling_case or args.e2e_case:
        print(json.dumps(scaling_case(args) if args.scaling_case else e2e_case(args)))
        return 0
    started = _dt.datetime.now(_dt.timezone.utc)

    def save(rows: list[Row], state: dict) -> None:
        if not args.json:
            return
        raw = {k: (asdict(v) if k == "floor" else v) for k, v in state.items()}
        Path(args.json).write_text(json.dumps({"started": started.isoformat(timespec="seconds"), "argv": sys.argv,
                                               "table": header(started) + "\n" + format_table(rows),
                                               "rows": [asdict(r) for r in rows], "raw": raw}, indent=1, default=str))

    rows, state = run(args, on_section=save)
    print(header(started))
    print(format_table(rows))
    save(rows, state)
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Fixed cost of a small audit: ``jobs/audit.py`` against ``cdi-ray features`` on the same images.

    python jobs/fixed_cost.py                  # 3 pairs, 200 + 200 demo images, demo model 'easy', gray-box
    python jobs/fixed_cost.py --pairs 5 --json /tmp/fixed.json

One audit of the demo model ``easy`` — 200 of its training images (P) against 200 held-out images
(U), the gray-box preset, every default (calibrated test, model-free control, reports) — runs
through ``python jobs/audit.py MANIFEST --out FRESH`` (its own process: Python start, imports, a
local Ray, listing, hashing, planning, the feature stream, aggregation, results and reports, Ray's
shutdown) and ``cdi-ray features --model easy --images LIST --preset gray-box`` computes the
same 400 images' features in one process. Each pair runs both back to back (the order alternates
from pair to pair) against a fresh output and feature store, so every feature is computed in
both; the difference of the two wall times is the audit's fixed cost. The median over the pairs
is reported, with every pair's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(work: Path, n: int, preset: str) -> tuple[Path, Path]:
    """Write the collections, the audit's manifest and the features' list file; return (manifest, list)."""
    import yaml

    from cdi_ray.demo.audit import materialise
    from cdi_ray.demo.bundle import demo_model_dir

    folders = materialise(work / "collections", n=n, models=("easy",))
    p, u = folders["members-easy"], folders["heldout-u-easy"]
    manifest = work / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({
        "models": {"easy": {"uri": str(demo_model_dir("easy")), "access": "gray-box"}},
        "audits": [{"id": "easy-members", "model": "easy", "published": str(p), "unpublished": str(u), "preset": preset}],
        "output": str(work / "unused"),
    }))
    images = work / "images.txt"
    images.write_text("".join(f"{f}\n" for d in (p, u) for f in sorted(d.iterdir())))
    return manifest, images


TICK = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, float]]:
    """``pid → (parent pid, CPU seconds so far)`` of every process (from /proc)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return out


def timed(cmd: list[str], threads: int, interval: float = 1.0) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of the whole process tree)`` of one command. The CPU clock sums
    every descendant — a local Ray's daemons, workers and actors included — sampled from /proc every
    ``interval`` s (a process that ends between two samples loses at most that much). Sampling is
    not free — a local Ray has ~15 processes to read — so it is kept coarse: sampled every 0.2 s
    the audit took 44–48 s, unsampled 38–39 s (same code, quiet 2-core machine, 2026-12-02)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           **{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    t0 = time.perf_counter()
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    seen: dict[int, float] = {}
    tree = {proc.pid}
    while True:
        try:
            proc.wait(timeout=interval)  # the wall time to the millisecond, the CPU every interval
            break
        except subprocess.TimeoutExpired:
            pass
        procs = _processes()
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _) in procs.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        for pid in tree:
            if pid in procs:
                seen[pid] = max(seen.get(pid, 0.0), procs[pid][1])
    seconds = time.perf_counter() - t0
    log.seek(0)
    stderr = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return seconds, sum(seen.values())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3, help="paired runs (default 3)")
    p.add_argument("--n", type=int, default=200, help="images per side (default 200)")
    p.add_argument("--preset", default="gray-box", choices=["gray-box", "white-box"])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of both commands (default 1)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="cdi-fixed-"))
    manifest, images = prepare(work, args.n, args.preset)
    from cdi_ray.demo.bundle import demo_model_dir

    pairs = []
    for i in range(args.pairs):
        audit = [sys.executable, str(ROOT / "jobs" / "audit.py"), str(manifest), "--out", str(work / f"audit-{i}")]
        feats = [sys.executable, "-m", "cdi_ray", "features", "--model", str(demo_model_dir("easy")), "--images",
                 str(images), "--preset", args.preset, "--out", str(work / f"features-{i}.parquet")]
        order = [("audit", audit), ("features", feats)] if i % 2 == 0 else [("features", feats), ("audit", audit)]
        got = {name: timed(cmd, args.threads) for name, cmd in order}
        walls = {name: wall for name, (wall, _) in got.items()}
        walls["fixed_cost"] = walls["audit"] - walls["features"]
        cpu = {f"{name}_cpu": c for name, (_, c) in got.items()}
        cpu["fixed_cost_cpu"] = cpu["audit_cpu"] - cpu["features_cpu"]
        run = json.loads((work / f"audit-{i}" / "results.json").read_text())["run"]
        pairs.append({**walls, **cpu, "load_average": os.getloadavg()[0], "run_seconds": run["seconds"],
                      "timings": run["timings"]})
        print(json.dumps({"pair": i, **{k: round(v, 2) for k, v in {**walls, **cpu}.items()},
                          "load": round(os.getloadavg()[0], 1), "run_seconds": run["seconds"],
                          "timings": run["timings"]}), flush=True)
    out = {"n_per_side": args.n, "preset": args.preset, "threads": args.threads, "pairs": pairs,
           "median": {k: round(statistics.median(p[k] for p in pairs), 2)
                      for k in ("audit", "features", "fixed_cost", "audit_cpu", "features_cpu", "fixed_cost_cpu")},
           "load_average": os.getloadavg()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["median"]))
    return out


if __name__ == "__main__":
    main()

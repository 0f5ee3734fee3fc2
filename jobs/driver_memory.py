"""Driver memory of a plan-only run against the number of image URIs.

    python jobs/driver_memory.py                               # 10 k, 100 k and 1 M URIs
    python jobs/driver_memory.py --sizes 10000,100000 --json /tmp/mem.json

For each size N, a synthetic batch: ``--audits`` audits (20 collections: each audit's own P and
U) of N image URIs in all — zero-byte files on local disk, so listing really walks and stats
them — and a feature store whose URI → hash index already holds every one of them (a synthetic
index: a distinct made-up content hash per URI, the size and mtime as listed), so hashing reads
nothing. A fresh driver process then runs :func:`cdi_ray.plan_manifest` — list, hash via the
index, plan, write the plan, compute nothing — on a local Ray, sampling its own resident memory
every 20 ms. Reported per size: the driver's RSS just before the call, its peak during it, the
growth, and the growth per URI; then the slope between the smallest and the largest size (what
each additional URI costs the driver) and the extrapolation to 10 M URIs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from jobs.bench.process_meters import PeakRss, rss_mb  # noqa: E402  (the benchmark's meters)


def build(work: Path, n: int, audits: int) -> Path:
    """Write the collections, the synthetic hash index, a tiny model and the manifest; return the manifest."""
    import pyarrow as pa
    import yaml

    from cdi_ray import storage
    from cdi_ray.models.testing import make_tiny_pixel_ddpm

    model = make_tiny_pixel_ddpm(work / "model", image_size=16, channels=1)
    per = n // (2 * audits)
    rows = {"uri": [], "size": [], "version": [], "content_hash": []}
    for c in range(2 * audits):
        folder = work / "collections" / f"c{c:03d}"
        folder.mkdir(parents=True)
        for j in range(per):
            p = folder / f"{j:07d}.png"
            p.touch()
            rows["uri"].append(str(p))
            rows["size"].append(0)
            rows["version"].append(str(p.stat().st_mtime_ns))
            rows["content_hash"].append(hashlib.sha256(str(p).encode()).hexdigest())
    store = work / "out" / "features"
    storage.write_parquet(str(store / "_hashes" / "part-synthetic.parquet"), pa.table(rows))
    manifest = work / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({
        "models": {"m": {"uri": str(model), "access": "gray-box"}},
        "audits": [{"id": f"a{i:03d}", "model": "m", "published": str(work / "collections" / f"c{2 * i:03d}"),
                    "unpublished": str(work / "collections" / f"c{2 * i + 1:03d}")} for i in range(audits)],
        "output": str(work / "out"),
    }))
    return manifest


def measure(manifest: str) -> dict:
    """In this (fresh) process: start Ray, then plan the manifest while sampling RSS."""
    import ray

    from cdi_ray import load_manifest, plan_manifest

    m = load_manifest(manifest)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    before = rss_mb()
    t0 = time.perf_counter()
    with PeakRss(interval=0.02) as peak:
        plan = plan_manifest(m)
    seconds = time.perf_counter() - t0
    after = rss_mb()
    ray.shutdown()
    return {"rss_before_mb": before, "peak_mb": peak.peak_mb, "after_mb": after, "seconds": seconds,
            "to_compute": plan.to_compute, "needed": plan.needed,
            "planned": sum(a.error is None for a in plan.audits.values())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="image URIs per case (default 10k,100k,1M)")
    p.add_argument("--audits", type=int, default=10, help="audits per case (each with its own P and U; default 10)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, removed afterwards)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return {}
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="cdi-mem-"))
    cases = []
    try:
        for n in (int(x) for x in args.sizes.split(",")):
            work = scratch / f"n{n}"
            t0 = time.perf_counter()
            manifest = build(work, n, args.audits)
            built = time.perf_counter() - t0
            proc = subprocess.run([sys.executable, __file__, "--measure", str(manifest)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode != 0:
                raise RuntimeError(f"case {n} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r.update(uris=n, growth_mb=r["peak_mb"] - r["rss_before_mb"], build_seconds=built)
            r["growth_kb_per_uri"] = r["growth_mb"] * 1024 / n
            cases.append(r)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)
    out = {"audits": args.audits, "cases": cases, "load_average": os.getloadavg()}
    if len(cases) >= 2:
        small, big = cases[0], cases[-1]
        slope = (big["growth_mb"] - small["growth_mb"]) * 1024 / (big["uris"] - small["uris"])
        out["slope_kb_per_uri"] = slope
        out["extrapolated_10M_growth_mb"] = big["growth_mb"] + slope * (10_000_000 - big["uris"]) / 1024
        print(json.dumps({"slope_kb_per_uri": round(slope, 4),
                          "extrapolated_10M_growth_mb": round(out["extrapolated_10M_growth_mb"], 1)}))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()

"""Section ``e2e``: ``run_manifest`` through Ray (list → hash → decode → actors → store → aggregator
→ results) on one audit of ≥ 2,000 images from local files, S3 small objects or S3 tar shards,
with its ratio to a floor re-measured right before each case."""
from __future__ import annotations

import os
import time
from pathlib import Path

from jobs.bench.cluster import child_driver, start_ray
from jobs.bench.floor import TARGET_E2E_RATIO, quick_floor
from jobs.bench.image_files import upload, write_collection
from jobs.bench.models import Bench
from jobs.bench.passes import planned_passes
from jobs.bench.process_meters import ProcessCpu
from jobs.bench.table import Row


def e2e_case(args) -> dict:
    """Run in a child driver (a new Ray job, cold workers — as ``ray job submit`` gives each batch):
    one audit of ``args.e2e_published`` vs ``args.e2e_unpublished``; returns the figures."""
    import ray

    from cdi_ray.pipeline.run import run_manifest
    from cdi_ray.spec import parse_manifest

    ray.init(address=args.ray_address, log_to_driver=False)
    out = Path(args.workdir)
    manifest = parse_manifest({
        "models": {"m": {"uri": args.model_uri, "access": "white-box", "batch_size": args.batch,
                         "num_cpus": args.threads, "min_replicas": args.actors, "max_replicas": args.actors,
                         "pool": "actors"}},  # the benchmark measures the actor pool at every size
        "audits": [{"id": "bench", "model": "m", "published": args.e2e_published,
                    "unpublished": args.e2e_unpublished, "preset": args.e2e_case, "test": {"min_samples": 2}}],
        "output": str(out / "results"),
        "feature_store": str(out / "store"),
    })
    t0 = time.perf_counter()
    with ProcessCpu(root=os.getppid()) as cpu:
        batch = run_manifest(manifest)
    wall = time.perf_counter() - t0
    return {"seconds": wall, "cpu_s": cpu.seconds(), "cpu_by_title": cpu.by_title(),
            "computed": batch.run["features"]["computed"],
            "done": batch.summary.get("done"), "timings": batch.run["timings"],
            "first_error": next((a["error"] for a in batch.audits if a["status"] != "done"), None)}


def section_e2e(bench: Bench, args, state: dict) -> list[Row]:
    if bench.model_uri is None:
        return [Row("e2e", "skipped", "the model exists only in memory (no directory for the actors)")]
    start_ray(args)
    work = Path(state["workdir"]) / "e2e"
    n = args.e2e_images
    p_dir, u_dir = work / "P", work / "U"
    write_collection(p_dir, 0, n // 2)
    write_collection(u_dir, n // 2, n - n // 2)
    sources = {"local": (str(p_dir), str(u_dir))}
    if "s3" in args.sources:
        sources["s3"] = (upload(p_dir, "bench/P"), upload(u_dir, "bench/U"))
    if "s3-tar" in args.sources:  # the same images as WebDataset shards: one object per ~250 images
        from cdi_ray.packing import pack

        for side, folder in (("P", p_dir), ("U", u_dir)):
            upload(folder, f"bench/{side}")  # pack's source; bucket created
            pack(f"s3://bench/{side}/", f"s3://bench/{side}-tar/", fmt="webdataset", shard_size=250)
        sources["s3-tar"] = ("s3://bench/P-tar/*.tar", "s3://bench/U-tar/*.tar")
    main = "cpu" if bench.device == "cpu" else "wall"
    rows = []
    for preset in args.presets:
        for src in args.sources:
            floor = quick_floor(bench, args, state)
            per = state.get("performed", {}).get(preset) or planned_passes(preset, bench, args)
            implied = floor.images_per_s(per["fwd"], per["fb"], "wall") * args.actors
            r = child_driver(args, work / f"{preset}-{src}", bench.model_uri, "--e2e-case", preset,
                             "--e2e-published", sources[src][0], "--e2e-unpublished", sources[src][1])
            used = r["cpu_s"]
            # CPU clock: the floor's CPU seconds for these passes against the CPU seconds of Ray's
            # workers (everything the pipeline runs, not Ray's daemons or the driver)
            floor_cpu_s = n / floor.images_per_s(per["fwd"], per["fb"], "cpu")
            ratio = {"wall": n / r["seconds"] / implied, "cpu": floor_cpu_s / sum(used[g] for g in ProcessCpu.WORKERS),
                     "actors_cpu": floor_cpu_s / used["actors"] if used["actors"] else 0.0}
            state.setdefault("e2e", {})[f"{preset}/{src}"] = {**r, "images_per_s": n / r["seconds"], "ratio": ratio,
                                                              "floor_cpu_s": floor_cpu_s, "implied": implied}
            ok = ratio[main] >= TARGET_E2E_RATIO and r["computed"] == n and r["done"] == 1
            rows.append(Row("e2e", f"{preset} from {src}: images/s ({r['computed']} computed, {args.actors} actor(s) × "
                                   f"{args.threads} thread(s)); stage seconds",
                            f"{n / r['seconds']:.2f} in {r['seconds']:.1f} s; "
                            + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())))
            rows.append(Row("e2e", f"{preset} from {src}: CPU s — floor for these passes; " + ", ".join(ProcessCpu.GROUPS),
                            f"{floor_cpu_s:.1f}; " + ", ".join(f"{used[g]:.1f}" for g in ProcessCpu.GROUPS)))
            rows.append(Row("e2e", f"{preset} from {src}: ratio to the floor — wall (floor {implied:.2f} images/s "
                                   f"measured just before) / cpu (floor ÷ Ray workers: actors, tasks, aggregators, "
                                   f"Ray Data) / cpu in the feature actors alone",
                            f"{ratio['wall']:.3f} / {ratio['cpu']:.3f} / {ratio['actors_cpu']:.3f}",
                            f"{main} ≥ {TARGET_E2E_RATIO}", ok))
            if r["first_error"]:
                rows.append(Row("e2e", f"{preset} from {src}: error", r["first_error"], "", False))
    return rows

"""Section ``scaling``: 100 vs 1,000 collections of 20 images against one model, each case in a
fresh driver process: time ratio, feature-actor (= model load) count, driver peak memory."""
from __future__ import annotations

import time
from pathlib import Path

from jobs.bench.cluster import child_driver, feature_actor_count, start_ray
from jobs.bench.image_files import image_name, write_collection
from jobs.bench.models import Bench
from jobs.bench.process_meters import PeakRss, rss_mb
from jobs.bench.table import Row

#: Targets of issue #8.
TARGET_SCALING_TIME_RATIO = 11.0
TARGET_MEMORY_RATIO = 1.25   # "flat": driver peak memory at 10× the collections within 25 %


def scaling_case(args) -> dict:
    """Run in a child process: one manifest of ``args.scaling_case`` collections; returns the figures."""
    import ray

    from cdi_ray.pipeline.run import run_manifest
    from cdi_ray.spec import parse_manifest

    ray.init(address=args.ray_address, log_to_driver=False)
    root = Path(args.workdir)
    n, k = args.scaling_case, args.images_per_collection
    half = k // 2
    audits = [{"id": f"c{i:05d}", "model": "m",
               "published": [str(root / "images" / image_name(i * k + j)) for j in range(half)],
               "unpublished": [str(root / "images" / image_name(i * k + j)) for j in range(half, k)],
               "features": ["dl"], "overrides": {"dl": {"n_draws": 1}}, "test": {"min_samples": 2}}
              for i in range(n)]
    manifest = parse_manifest({
        "models": {"m": {"uri": args.model_uri, "access": "gray-box", "batch_size": args.batch,
                         "num_cpus": args.threads, "min_replicas": args.actors, "max_replicas": args.actors,
                         "pool": "actors"}},  # the benchmark measures the actor pool at every size
        "audits": audits, "output": str(root / f"out-{n}"), "feature_store": str(root / f"store-{n}"),
    })
    before = feature_actor_count()
    rss0 = rss_mb()
    t0 = time.perf_counter()
    with PeakRss() as rss:
        batch = run_manifest(manifest)
    wall = time.perf_counter() - t0
    return {"collections": n, "images": n * k, "seconds": wall, "computed": batch.run["features"]["computed"],
            "done": batch.summary.get("done"), "feature_actors": feature_actor_count() - before,
            "first_error": next((a["error"] for a in batch.audits if a["status"] != "done"), None),
            "rss_before_mb": rss0, "peak_rss_mb": rss.peak_mb,
            "timings": batch.run["timings"]}


def section_scaling(bench: Bench, args, state: dict) -> list[Row]:
    if bench.model_uri is None:
        return [Row("scaling", "skipped", "the model exists only in memory")]
    start_ray(args)
    root = Path(state["workdir"]) / "scaling"
    k = args.images_per_collection
    write_collection(root / "images", 0, max(args.collections) * k)
    results = [child_driver(args, root, bench.model_uri, "--scaling-case", str(n),
                            "--images-per-collection", str(k)) for n in args.collections]
    state["scaling"] = results
    rows = []
    for r in results:
        t = r["timings"]
        rows.append(Row("scaling", f"{r['collections']} collections × {k} images: seconds; stage seconds",
                        f"{r['seconds']:.1f}; " + ", ".join(f"{s} {v:.1f}" for s, v in t.items())))
        rows.append(Row("scaling", f"{r['collections']} collections: model loads (feature actors) / actors; "
                                   "images computed; audits done",
                        f"{r['feature_actors']} / {args.actors}; {r['computed']} / {r['images']}; "
                        f"{r['done']} / {r['collections']}", "loads = actors, all computed and done",
                        r["feature_actors"] == args.actors and r["computed"] == r["images"]
                        and r["done"] == r["collections"]))
        rows.append(Row("scaling", f"{r['collections']} collections: driver RSS before the run → peak during it, MB",
                        f"{r['rss_before_mb']:.0f} → {r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['rss_before_mb']:.0f})"))
    if len(results) >= 2:
        small, big = results[0], results[-1]
        work = big["images"] / small["images"]
        ratio = big["seconds"] / small["seconds"]
        target = TARGET_SCALING_TIME_RATIO * work / 10
        rows.append(Row("scaling", f"time ratio {big['collections']} / {small['collections']} collections ({work:.0f}× the work)",
                        f"{ratio:.2f}", f"≤ {target:.1f}", ratio <= target))
        mem = big["peak_rss_mb"] / small["peak_rss_mb"]
        rows.append(Row("scaling", "driver peak memory ratio", f"{mem:.2f}", f"≤ {TARGET_MEMORY_RATIO} (flat)",
                        mem <= TARGET_MEMORY_RATIO))
    return rows

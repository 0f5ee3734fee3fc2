"""Section ``shards``: small files vs tar vs Parquet shards from S3 (moto), the same images
(:func:`jobs.bench.s3_layouts.bench_sources`; docs/PIPELINE.md)."""
from __future__ import annotations

from jobs.bench.models import Bench
from jobs.bench.table import Row


def section_shards(bench: Bench, args, state: dict) -> list[Row]:
    from jobs.bench.s3_layouts import bench_sources

    result = bench_sources(n_images=args.e2e_images)
    return [Row("shards", f"{kind}: images/s from S3 ({r['objects']} objects)", f"{r['images_per_s']:.1f}")
            for kind, r in result["per_kind"].items()]

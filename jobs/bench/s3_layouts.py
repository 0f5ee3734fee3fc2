"""Benchmark: the same images audited from S3 as small files, WebDataset tar shards and Parquet shards.

:func:`bench_sources` writes ``n_images`` random images to a (moto) S3 bucket three ways, then
runs the same audit (tiny pixel model, one cheap feature) on each with a fresh feature store, and
returns wall-clock seconds, images/s and the run's own step timings per source kind. Every run
reads every byte from S3 (nothing is cached between kinds), so the differences are I/O: one GET
per image twice (hash pass + decode) for small files, against one GET per shard to index it and a
few ranged GETs per decode batch for tars, or a row-group read for Parquet.

Used by ``jobs/benchmark.py``; figures in docs/PIPELINE.md ("Shard sources"). Needs ``moto[server]``
when no ``endpoint`` is given.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time

import numpy as np

KINDS = ("files", "webdataset", "parquet")


@contextlib.contextmanager
def moto_endpoint():
    """A moto S3 server on 127.0.0.1 (a free port) for benchmarks; yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _write_images(folder: str, n: int, size: int, seed: int) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # smooth random images compress like photos (a few KB as PNG), not like noise
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(os.path.join(folder, f"{i:05d}.png"))


def bench_sources(n_images: int = 2000, *, image_size: int = 64, shard_size: int = 250, repeats: int = 1,
                  bucket: str = "bench", endpoint: str | None = None, workdir: str | None = None) -> dict:
    """Audit the same ``n_images`` (half published, half unpublished) from S3 in each source form.

    Args:
        n_images: images in all (≥ 2,000 for the documented figures).
        image_size: side of the PNGs (the model preprocesses them to 16×16).
        shard_size: images per tar / Parquet shard.
        repeats: runs per kind, each with a fresh feature store; the fastest is reported (the
            others are noise from whatever else the machine runs).
        bucket: S3 bucket to create and fill.
        endpoint: an S3 endpoint URL; default: a moto server started here on 127.0.0.1.
        workdir: scratch folder (default: a temp folder, removed afterwards).

    Returns:
        ``{"n_images", "image_size", "shard_size", "per_kind": {kind: {"seconds", "images_per_s",
        "objects", "timings", "computed"}}}`` — ``timings`` are the run's own steps (list includes
        shard indexing; hash is the small-file hash pass).
    """
    import ray

    from cdi_ray import storage
    from cdi_ray.models.testing import make_tiny_pixel_ddpm
    from cdi_ray.pipeline.run import run_manifest
    from cdi_ray.packing import pack
    from cdi_ray.spec import parse_manifest

    tmp = workdir or tempfile.mkdtemp(prefix="cdi-bench-")
    stack = contextlib.ExitStack()
    try:
        url = endpoint or stack.enter_context(moto_endpoint())
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "bench"),
               "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "bench"),
               "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
        os.environ.update(env)
        storage.reset_client()
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False,
                     runtime_env={"env_vars": env})
        storage.s3_client().create_bucket(Bucket=bucket)
        model = str(make_tiny_pixel_ddpm(os.path.join(tmp, "model"), image_size=16, channels=3))
        half = n_images // 2
        sources = {k: {} for k in KINDS}
        for side, seed in (("p", 1), ("u", 2)):
            local = os.path.join(tmp, side)
            _write_images(local, half, image_size, seed)
            for name in sorted(os.listdir(local)):
                with open(os.path.join(local, name), "rb") as f:
                    storage.atomic_write_bytes(f"s3://{bucket}/files/{side}/{name}", f.read())
            pack(local, f"s3://{bucket}/wds/{side}", fmt="webdataset", shard_size=shard_size)
            pack(local, f"s3://{bucket}/pq/{side}", fmt="parquet", shard_size=shard_size)
            sources["files"][side] = f"s3://{bucket}/files/{side}/"
            sources["webdataset"][side] = {"webdataset": f"s3://{bucket}/wds/{side}/shard-*.tar"}
            sources["parquet"][side] = {"parquet": f"s3://{bucket}/pq/{side}/shard-*.parquet"}
        per_kind = {}
        for kind, rep in ((k, r) for r in range(repeats) for k in KINDS):
            manifest = parse_manifest({
                "models": {"m": {"uri": model, "access": "gray-box", "batch_size": 256, "max_replicas": 2}},
                "audits": [{"id": kind, "model": "m", "published": sources[kind]["p"], "unpublished": sources[kind]["u"],
                            "features": ["dl"], "overrides": {"dl": {"n_draws": 1}}, "controls": {"model_free": False},
                            "test": {"procedure": "split"}}],
                "output": f"s3://{bucket}/out/{kind}-{rep}/",
            })
            t0 = time.perf_counter()
            batch = run_manifest(manifest, write=False)
            seconds = time.perf_counter() - t0
            if kind in per_kind and per_kind[kind]["seconds"] <= seconds:
                continue
            per_kind[kind] = {"seconds": round(seconds, 2), "images_per_s": round(n_images / seconds, 1),
                              "objects": n_images if kind == "files" else 2 * -(-half // shard_size),
                              "timings": batch.run["timings"], "computed": batch.run["features"]["computed"],
                              "status": batch.audits[0]["status"]}
        return {"n_images": 2 * half, "image_size": image_size, "shard_size": shard_size, "repeats": repeats,
                "per_kind": per_kind}
    finally:
        stack.close()
        storage.reset_client()
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(bench_sources(int(sys.argv[1]) if len(sys.argv) > 1 else 2000), indent=2))

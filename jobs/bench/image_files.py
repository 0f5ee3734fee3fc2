"""The benchmark's images as files: distinct demo-bundle PNGs in a folder, copied to S3 on request."""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np


def image_name(i: int) -> str:
    return f"{i:07d}.png"


def write_collection(folder: Path, start: int, n: int) -> list[Path]:
    """``n`` distinct demo-bundle PNGs (bundle images from ``start``; a pixel is nudged where the
    bundle repeats, so every file has its own content hash)."""
    from cdi_ray.demo.audit import encode_png
    from cdi_ray.demo.bundle import load_bundle

    b = load_bundle()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        img = b.images[i % len(b)].copy()
        rep = i // len(b)
        if rep:
            img.flat[rep % img.size] ^= np.uint8(1 + rep // img.size)
        p = folder / image_name(i)
        p.write_bytes(encode_png(img))
        paths.append(p)
    return paths


def upload(folder: Path, prefix: str) -> str:
    """Copy ``folder``'s files to ``s3://{prefix}/`` (bucket created); returns the URI."""
    import boto3

    bucket, _, key = prefix.partition("/")
    s3 = boto3.client("s3")
    with contextlib.suppress(Exception):
        s3.create_bucket(Bucket=bucket)
    for p in sorted(folder.iterdir()):
        s3.put_object(Bucket=bucket, Key=f"{key}/{p.name}", Body=p.read_bytes())
    return f"s3://{prefix}/"

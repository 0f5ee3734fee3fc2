"""Helpers shared by the pipeline test modules (not a test module itself)."""
from __future__ import annotations

import os
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

#: The session's S3 secret key (tests/conftest.py ``s3_server``): it must never appear in any output or log.
S3_SECRET = f"cdi-ray-test-secret-{uuid.uuid4().hex}"

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def moto_s3():
    """A moto S3 server on 127.0.0.1 (only); yields the environment that points boto3 at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    finally:
        server.stop()


def write_images(folder: str | Path, n: int, *, seed: int, size: int = 16, start: int = 0, fmt: str = "png") -> list[str]:
    """``n`` random grayscale images named ``{start+i:04d}.png``; distinct bytes per (seed, index)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, start])
    paths = []
    for i in range(n):
        p = folder / f"{start + i:04d}.{fmt}"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@contextmanager
def env(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_request_files(root: Path, model_dir, rows: list[dict]) -> tuple[Path, Path]:
    """A bulk request CSV (``rows``) and a registry with one tiny gray-box model, for jobs/requests.py."""
    import csv

    import yaml

    registry = root / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "models": {"tiny": {"uri": str(model_dir), "access": "gray-box", "batch_size": 16}},
        "defaults": {"features": ["dl"], "overrides": {"dl": {"n_draws": 1}}, "test": {"min_samples": 5}}}))
    requests = root / "requests.csv"
    with open(requests, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["request_id", "owner", "published", "unpublished"])
        w.writeheader()
        w.writerows(rows)
    return requests, registry

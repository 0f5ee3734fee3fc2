"""The benchmark's local Ray, its S3 (a moto server) and its child drivers.

Each end-to-end or scaling case runs in a fresh driver process (``jobs/benchmark.py --e2e-case …``
/ ``--scaling-case …``) on the same local Ray: a new Ray job with cold workers, as
``ray job submit`` gives each batch. Ray's workers run at niceness 0 here (``RAY_worker_niceness``,
default 15) so that on a shared machine the actors compete for CPU on the same terms as the floor
measured in the benchmark process.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The entry point a child driver runs (its process title also tells ProcessCpu it is a driver).
ENTRY = ROOT / "jobs" / "benchmark.py"


@contextlib.contextmanager
def moto_server():
    """A moto S3 server on 127.0.0.1 for this process and the Ray workers it starts (so it must
    start before Ray: workers inherit the environment Ray was started with)."""
    from cdi_ray import storage
    from jobs.bench.s3_layouts import moto_endpoint

    with moto_endpoint() as endpoint:
        env = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        storage.reset_client()  # a client cached before would point elsewhere
        try:
            yield env
        finally:
            restore_env(old)
            storage.reset_client()


def restore_env(old: dict[str, str | None]) -> None:
    """Put back the environment variables ``old`` recorded (``None``: was unset)."""
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def start_ray(args) -> None:
    import ray

    if ray.is_initialized():
        return
    old = {"RAY_worker_niceness": os.environ.get("RAY_worker_niceness")}
    os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet it starts (see the module docstring)
    try:
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    finally:
        restore_env(old)


def child_driver(args, root: Path, model_uri: str, *case_args: str) -> dict:
    """Run ``case_args`` (``--e2e-case …`` / ``--scaling-case …``) in a fresh driver process on this
    Ray cluster; its last stdout line is the case's JSON."""
    import ray

    cmd = [sys.executable, str(ENTRY), *case_args, "--workdir", str(root), "--model-uri", model_uri,
           "--ray-address", ray.get_runtime_context().gcs_address, "--batch", str(args.batch),
           "--threads", str(args.threads), "--actors", str(args.actors)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {' '.join(case_args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def feature_actor_count() -> int:
    """FeatureActor instances this Ray cluster has created (each loads the model once, in its constructor)."""
    from ray._private.state import actors

    return sum("FeatureActor" in str(a.get("ActorClassName", "")) for a in actors().values())

"""Run a batch of CDI audits described by a manifest.

Locally (starts a local Ray when no cluster address is set)::

    python jobs/audit.py examples/manifests/local.yaml --out /tmp/audit-out

Unchanged on a running cluster (``ray job submit`` sets RAY_ADDRESS for the driver)::

    ray job submit --working-dir . -- python jobs/audit.py manifest.yaml --out s3://audits/2026-11-28/

Smoke test (CPU, a tiny random model, a few generated images, nothing to download)::

    python jobs/audit.py --smoke-test

Plan only — list, hash (via the store's index) and plan, write ``<output>/plan/plan.json``, compute
nothing::

    python jobs/audit.py manifest.yaml --dry-run

Exit codes: 0 every audit done; 3 partial failure (some audits failed — recorded in results.json
with their reason — the rest completed); 2 invalid input (bad manifest, unreadable manifest, an
output location that cannot be written — found before anything is computed); 1 internal error;
130 interrupted (SIGINT / Ctrl-C: the feature streams are stopped, every feature already stored
is kept, and the same command again computes only the rest). The last line on stdout is a JSON
summary, in every case.
"""
from __future__ import annotations

import argparse
import tempfile

from cdi_ray.exits import EXIT_INVALID, EXIT_OK, EXIT_PARTIAL

#: Smoke test: enough images for the test to run (crossfit needs a few per fold), small enough
#: to finish in well under a minute on a laptop CPU.
SMOKE_IMAGES_PER_SET = 12


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Exit codes: 0 done, 3 partial failure, 2 invalid input, "
                                                                         "1 internal error, 130 interrupted.")
    p.add_argument("manifest", nargs="?", help="manifest (YAML or JSON; local path or s3://)")
    p.add_argument("--out", help="output location (overrides the manifest's `output`)")
    p.add_argument("--feature-store", help="feature store location (default: the manifest's, else <output>/features)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (default: max(8, cores))")
    p.add_argument("--rehash", action="store_true", help="ignore the URI→hash cache and re-read every image")
    p.add_argument("--output-root", help="folder or s3:// prefix every output location must lie under "
                                         "(default: $CDI_RAY_OUTPUT_ROOT; unset: no confinement)")
    p.add_argument("--dry-run", action="store_true", help="plan only: what would be computed, how much, on which "
                                                         "models (<output>/plan/plan.json); compute nothing")
    p.add_argument("--smoke-test", action="store_true", help="run a tiny self-contained audit on CPU and exit")
    p.add_argument("-v", "--verbose", action="count", default=1, help="more log detail")
    args = p.parse_args(argv)
    if not args.manifest and not args.smoke_test:
        p.error("give a MANIFEST, or --smoke-test")
    return args


def smoke_manifest(workdir: str) -> str:
    """A manifest over a tiny random model and generated images under ``workdir``."""
    import os

    import numpy as np
    import yaml
    from PIL import Image

    from cdi_ray.models.testing import make_tiny_pixel_ddpm

    model = make_tiny_pixel_ddpm(os.path.join(workdir, "model"), image_size=16, channels=1)
    rng = np.random.default_rng(0)
    for name in ("published", "unpublished"):
        os.makedirs(os.path.join(workdir, name))
        for i in range(SMOKE_IMAGES_PER_SET):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(os.path.join(workdir, name, f"{i:03d}.png"))
    manifest = {
        "models": {"tiny": {"uri": str(model), "access": "gray-box", "batch_size": 8}},
        "audits": [{"id": "smoke", "model": "tiny", "published": "published", "unpublished": "unpublished",
                    "overrides": {"dl": {"n_draws": 2}}}],
        "output": "out",
    }
    path = os.path.join(workdir, "manifest.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(manifest, f)
    return path


def main(args: argparse.Namespace) -> dict:
    from cdi_ray import ManifestError
    from cdi_ray.pipeline.cluster import load_manifest_starting_ray
    from cdi_ray.spec import location_problems, output_root
    from cdi_ray.storage import UnwritableLocation

    root = output_root(getattr(args, "output_root", None))
    outside = location_problems({"--out": args.out, "--feature-store": args.feature_store}, root)
    if outside:  # refused before Ray starts
        return {"exit_code": EXIT_INVALID, "error": "; ".join(outside)}
    path = args.manifest or smoke_manifest(tempfile.mkdtemp(prefix="cdi-ray-smoke-"))
    try:
        manifest = load_manifest_starting_ray(path, root=root, address=args.address, num_cpus=args.num_cpus)
    except ManifestError as exc:
        return {"exit_code": EXIT_INVALID, "error": str(exc)}
    try:
        return _run(args, manifest)
    except UnwritableLocation as exc:  # probed before anything is listed or computed
        return {"exit_code": EXIT_INVALID, "error": str(exc)}


def _run(args: argparse.Namespace, manifest) -> dict:
    from cdi_ray import plan_manifest, run_manifest

    if getattr(args, "dry_run", False):
        plan = plan_manifest(manifest, args.out, feature_store=args.feature_store, rehash=args.rehash)
        failed = sum(a.error is not None for a in plan.audits.values())
        return {"exit_code": EXIT_PARTIAL if failed else EXIT_OK, "plan": plan.run_dir, "audits": len(plan.audits),
                "cannot_run": failed, "needed": plan.needed, "to_compute": plan.to_compute,
                "models": {s.model: {"images": s.images, "rows": s.rows} for s in plan.streams.values()}}
    batch = run_manifest(manifest, args.out, feature_store=args.feature_store, rehash=args.rehash)
    return {"exit_code": batch.exit_code, "output": batch.output, "summary": batch.summary,
            "features": {k: v for k, v in batch.run["features"].items() if k != "per_model"},
            "seconds": batch.run["seconds"]}


if __name__ == "__main__":
    args = parse_args()
    from cdi_ray import console
    from cdi_ray.exits import run_job

    console.configure(args.verbose)
    run_job(main, args, "jobs.audit")

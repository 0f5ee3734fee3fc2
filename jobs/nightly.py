"""Nightly re-audit of a standing manifest: dated results and a diff against the previous night.

    python jobs/nightly.py standing.yaml                      # today's date (UTC)
    ray job submit --working-dir . -- python jobs/nightly.py standing.yaml --root s3://audits/nightly/

Writes ``<root>/<YYYY-MM-DD>/{results.json,results.parquet,images.parquet,diff.json,diff.md}``;
``<root>`` defaults to the manifest's ``output`` and the feature store to ``<root>/features`` (shared
by every night, so only new images and new models are computed). ``diff.md`` opens with the new
``used`` verdicts. Each audit's ``used`` is controlled over its whole life (docs/VERDICTS.md §5);
its state is ``<root>/<date>/sequential/<audit_id>.json``. Scheduling (cron + ray job submit,
KubeRay RayCronJob): docs/PIPELINE.md.

Exit codes: 0 every audit done; 3 partial failure; 2 invalid input; 1 internal error; 130 interrupted
(SIGINT: the streams are stopped, every stored feature is kept; run the same command again).
The last line on stdout is a JSON summary (with ``new_used``).
"""
from __future__ import annotations

import argparse
import logging

from cdi_ray.exits import EXIT_INVALID


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Exit codes: 0 done, 3 partial failure, 2 invalid input, 1 internal error, 130 interrupted.")
    p.add_argument("manifest", help="standing manifest (YAML or JSON; local path or s3://)")
    p.add_argument("--root", help="nightly root; results go to <root>/<date>/ (default: the manifest's `output`)")
    p.add_argument("--date", help="night to write, YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--feature-store", help="feature store (default: the manifest's, else <root>/features)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (default: max(8, cores))")
    p.add_argument("--rehash", action="store_true", help="ignore the URI→hash cache and re-read every image")
    p.add_argument("-v", "--verbose", action="count", default=1)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    from cdi_ray import ManifestError
    from cdi_ray.pipeline.cluster import load_manifest_starting_ray
    from cdi_ray.pipeline.nightly import run_nightly

    try:
        manifest = load_manifest_starting_ray(args.manifest, address=args.address, num_cpus=args.num_cpus)
    except ManifestError as exc:
        return {"exit_code": EXIT_INVALID, "error": str(exc)}
    res = run_nightly(manifest, date=args.date, root=args.root, feature_store=args.feature_store, rehash=args.rehash)
    return {"exit_code": res["exit_code"], "output": res["output"], "previous": res["previous"],
            "summary": res["summary"], "new_used": [u["audit_id"] for u in res["diff"]["new_used"]],
            "features": {k: v for k, v in res["run"]["features"].items() if k != "per_model"}}


if __name__ == "__main__":
    args = parse_args()
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from cdi_ray.exits import run_job

    run_job(main, args, "jobs.nightly")

"""``cdi-ray requests`` and ``cdi-ray verify`` (registered on the main parser by :mod:`cdi_ray.cli`)."""
from __future__ import annotations

import argparse

from cdi_ray.exits import UserError

FAMILY_HELP = ("owner: Holm within each request — an owner's verdict never depends on other requests (default); "
               "batch: Benjamini–Hochberg at --q across every test of the file")


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``cdi-ray requests`` and ``jobs/requests.py``."""
    p.add_argument("requests", help="requests file: CSV, JSONL or Parquet (local or s3://), one row per owner's request")
    p.add_argument("--models", required=True, help="model registry: YAML with `models:` (as in a manifest) and "
                                                   "optional `defaults:` for every audit")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix (ledger, rejected.csv, requests/<id>/)")
    p.add_argument("--feature-store", help="feature store (default: <out>/features)")
    p.add_argument("--family", choices=["owner", "batch"], default="owner", help=FAMILY_HELP)
    p.add_argument("--q", type=float, default=0.05, help="level of batch-wide BH (a figure; the decision level "
                                                         "with --family batch; default 0.05)")
    p.add_argument("--rerun-done", action="store_true", help="re-test requests the ledger has done (features are "
                                                             "still read from the store)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (default: max(8, cores))")
    p.add_argument("--output-root", help="folder or s3:// prefix every output location must lie under "
                                         "(default: $CDI_RAY_OUTPUT_ROOT; unset: no confinement)")


def run_requests_args(args: argparse.Namespace):
    """Run ``args`` (from :func:`add_request_arguments`); :class:`IntakeError` for invalid input."""
    from cdi_ray.requests.conductor import run_requests

    return run_requests(args.requests, args.models, args.out, feature_store=args.feature_store, family=args.family,
                        q=args.q, rerun_done=args.rerun_done, address=args.address, num_cpus=args.num_cpus,
                        output_root=args.output_root)


def _cmd_requests(args: argparse.Namespace) -> int:
    from cdi_ray.requests.intake import IntakeError

    try:
        res = run_requests_args(args)
    except IntakeError as exc:
        raise UserError(str(exc)) from None
    s = res.summary
    states = ", ".join(f"{v} {k}" for k, v in s["states"].items())
    print(f"{s['requests']} requests: {states} ({s['carried_over']} carried over from earlier runs)")
    print(f"ledger: {res.out}/requests.parquet   deliverables: {res.out}/requests/<request_id>/")
    return res.exit_code


def _cmd_verify(args: argparse.Namespace) -> int:
    from cdi_ray.requests.verify import verify_request

    try:
        v = verify_request(args.request_dir, feature_store=args.feature_store, check_images=args.images)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    if v.matches:
        extra = f", {v.images_checked} image hashes" if args.images else ""
        print(f"verified: request {v.request_id} — {v.audits_checked} audit(s) recomputed from the stored features "
              f"give the identical p-values and verdicts{extra}")
        return 0
    print(f"request {v.request_id} does NOT match its stored results ({len(v.differences)} difference(s)):")
    for d in v.differences:
        print(f"  - {d}")
    return 3


def register(sub) -> None:
    """Add ``requests`` and ``verify`` to the CLI's subcommands."""
    p = sub.add_parser("requests", help="run a file of dataset-owner requests: one deliverable per owner",
                       description="Each row (owner, published, unpublished, models) is audited against the registry's "
                                   "models; verdicts are corrected within each request (README: Bulk requests).")
    add_request_arguments(p)
    p.set_defaults(run=_cmd_requests)
    p = sub.add_parser("verify", help="re-run a request's tests from its stored features and compare",
                       description="Recompute every test and verdict of <out>/requests/<request_id>/ from the features "
                                   "stored there; exit 0 if identical, 3 naming what differs.")
    p.add_argument("request_dir", help="a request's deliverable folder (local or s3://)")
    p.add_argument("--feature-store", help="re-run against this feature store instead of the folder's features/")
    p.add_argument("--images", action="store_true", help="also re-read every image and compare its content hash")
    p.set_defaults(run=_cmd_verify)

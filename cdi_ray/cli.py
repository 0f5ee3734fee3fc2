"""`cdi-ray` command line.

Exit codes (the same for every subcommand):
  0  everything asked for was done
  1  internal error (a bug: please report it with the `-v` output)
  2  invalid input (bad manifest, missing model, unreadable images …) — the message says what to fix
  3  partial failure: some audits or images failed, the rest completed and were written
  130  interrupted (SIGINT, Ctrl-C): the feature streams were stopped; every feature already
       stored is kept, so the same command again computes only the rest
"""
from __future__ import annotations

import argparse
import logging
import sys

from cdi_ray.exits import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, EXIT_PARTIAL, UserError

log = logging.getLogger("cdi_ray")

#: What Ctrl-C prints (the jobs print the JSON summary of cdi_ray.exits instead).
INTERRUPTED_LINE = ("interrupted: the feature streams were stopped; the features already stored are kept — run the same "
                    "command again to compute only the rest")


def _cmd_features(args: argparse.Namespace) -> int:
    from cdi_ray import extract_features

    table = extract_features(args.model, args.images, preset=args.preset, seed=args.seed, device=args.device,
                             batch_size=args.batch_size, out=args.out)
    print(f"wrote {table.num_rows} feature rows to {args.out}")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from cdi_ray import load_manifest

    m = load_manifest(args.manifest, root=args.output_root)
    print(f"{args.manifest}: valid — {len(m.models)} model(s), {len(m.audits)} audit(s), output {m.output}")
    return EXIT_OK


def _load_for_run(args: argparse.Namespace):
    """The manifest, with ``--out`` / ``--feature-store`` checked against the output root; Ray started."""
    from cdi_ray.pipeline.cluster import load_manifest_starting_ray
    from cdi_ray.spec import location_problems, output_root

    outside = location_problems({"--out": args.out, "--feature-store": args.feature_store}, output_root(args.output_root))
    if outside:
        raise UserError("; ".join(outside))
    return load_manifest_starting_ray(args.manifest, root=args.output_root, address=args.address,
                                      num_cpus=args.num_cpus)


def _cmd_audit(args: argparse.Namespace) -> int:
    from cdi_ray import run_manifest

    batch = run_manifest(_load_for_run(args), args.out, feature_store=args.feature_store, rehash=args.rehash)
    s = batch.summary
    print(f"{s['audits']} audits: {s['done']} done, {s['failed']} failed — "
          f"used {s['used']}, not detected {s['not_detected']}, inconclusive {s['inconclusive']}")
    print(f"results: {batch.output}")
    return batch.exit_code


def _cmd_plan(args: argparse.Namespace) -> int:
    from cdi_ray import plan_manifest

    plan = plan_manifest(_load_for_run(args), args.out, feature_store=args.feature_store, rehash=args.rehash)
    print(plan_text(plan))
    return EXIT_OK if all(a.error is None for a in plan.audits.values()) else EXIT_PARTIAL


def plan_text(plan) -> str:
    """A plan as a person reads it: per model what would be computed, the audits that cannot run."""
    lines = [f"{'model':<24} {'images':>10} {'rows':>10}  features"]
    for s in plan.streams.values():
        features = "; ".join(",".join(c.get("features") or []) if isinstance(c.get("features"), list)
                             else str(c.get("features")) for c in s.configs.values())
        lines.append(f"{s.model:<24} {s.images:>10,} {s.rows:>10,}  {features}")
    if not plan.streams:
        lines.append("(nothing to compute: the store holds every feature the audits need)")
    failed = [a for a in plan.audits.values() if a.error]
    lines.append(f"{len(plan.audits)} audit(s): {len(plan.audits) - len(failed)} planned, {len(failed)} cannot run; "
                 f"{plan.needed:,} feature rows needed, {plan.to_compute:,} to compute")
    lines += [f"  {a.audit_id}: {a.error}" for a in failed[:20]]
    descriptors = sum(d.needed - d.stored_before for d in plan.descriptors.values())
    if descriptors:
        lines.append(f"{descriptors:,} image(s) need model-free descriptors")
    lines.append(f"plan: {plan.run_dir}/plan.json")
    return "\n".join(lines)


def _cmd_pack(args: argparse.Namespace) -> int:
    from cdi_ray.packing import pack

    if args.shard_size <= 0:
        raise UserError(f"--shard-size must be a positive number of images, got {args.shard_size}")
    try:
        res = pack(args.src, args.dest, fmt=args.format, shard_size=args.shard_size, metadata=args.metadata)
    except ValueError as exc:  # a malformed sidecar: the message names the line and the fix
        raise UserError(str(exc)) from None
    meta = f" with metadata from {res['metadata']}" if res["metadata"] else " (no metadata sidecar)"
    print(f"packed {res['images']} images{meta} into {len(res['shards'])} {args.format} shard(s) under {args.dest}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from cdi_ray.demo.audit import DEMO_SIZES, run_demo

    sizes = f"{args.n} images each" if args.n else "; ".join(
        f"{m}: up to {max(vars(z).values())} images per collection" for m, z in DEMO_SIZES.items())
    print(f"auditing the embedded Fashion-MNIST collections ({sizes}) against the demo models 'easy' and 'hard' "
          f"with {args.preset} features …", flush=True)
    res = run_demo(args.out, n=args.n, preset=args.preset, seed=args.seed)
    print(res["table"])
    print(f"\nresults: {res['output']}   manifest: {res['manifest']}")
    if not res["never_false_used"]:
        print("error: a held-out-vs-held-out audit said `used` — this is a bug, please report it", file=sys.stderr)
        return EXIT_INTERNAL
    if not res["all_expected"]:
        print("note: some verdicts differ from the expected ones (see the table)", file=sys.stderr)
    return res["exit_code"]


def _cmd_report(args: argparse.Namespace) -> int:
    import json

    from cdi_ray import storage
    from cdi_ray.pipeline.results import AUDITS_DIR, DIFF_JSON, RESULTS_JSON, write_reports

    src = args.results
    folder = src[: -len(RESULTS_JSON)].rstrip("/") or "." if src.endswith(RESULTS_JSON) else src
    results_uri = storage.join(folder, RESULTS_JSON)
    if not storage.exists(results_uri):
        raise UserError(f"{src}: no results here (expected {results_uri}, written by `cdi-ray audit`)")
    results = json.loads(storage.read_bytes(results_uri))
    docs, missing = [], []
    for a in results.get("audits", []):
        uri = storage.join(folder, AUDITS_DIR, f"{a['audit_id']}.json")
        if storage.exists(uri):
            docs.append(json.loads(storage.read_bytes(uri)))
        else:  # results written before reports existed: render from the entry alone (no plots)
            missing.append(a["audit_id"])
            docs.append({"schema": "cdi-ray/audit/v1", "audit": a, "fdr": results.get("fdr"), "report": None,
                         "provenance": {}})
    diff_uri = storage.join(folder, DIFF_JSON)
    diff = json.loads(storage.read_bytes(diff_uri)) if storage.exists(diff_uri) else None
    out = args.out or folder
    write_reports(out, results, docs, diff=diff)
    if missing:
        print(f"note: {len(missing)} audit(s) have no audits/<id>.json; their reports show the results entry only",
              file=sys.stderr)
    print(f"wrote {len(docs)} audit report(s) and {storage.join(out, 'index.html')}")
    return EXIT_OK


ROOT_HELP = ("folder or s3:// prefix that every output and feature-store location must lie under "
             "(default: $CDI_RAY_OUTPUT_ROOT; unset: no confinement)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdi-ray",
        description="Copyrighted-data identification for diffusion models: audit whether a model was trained on a collection.",
        epilog="Exit codes: 0 done, 2 invalid input, 3 partial failure (plan: some audits cannot run), 1 internal error, "
               "130 interrupted (Ctrl-C; what was stored is kept).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("features", help="extract per-image membership features into a Parquet file",
                       description="Run one model over a folder (or a file listing image paths) and write one feature row per image.")
    p.add_argument("--model", required=True, help="diffusers model directory (see README: supported families)")
    p.add_argument("--images", required=True, help="a folder of images, or a text file with one image path per line")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--preset", default="white-box", choices=["white-box", "gray-box", "efficient"],
                   help="feature preset (default: white-box, 26 features)")
    p.add_argument("--seed", type=int, default=0, help="audit seed; every random draw derives from it and the image's content hash")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model batch (default: 32)")
    p.set_defaults(run=_cmd_features)

    p = sub.add_parser("validate", help="check a manifest without running it",
                       description="Validate a manifest (YAML or JSON, local or s3://): keys, types, model names, feature and test settings.")
    p.add_argument("manifest", help="manifest file (local path or s3:// URI)")
    p.add_argument("--output-root", help=ROOT_HELP)
    p.set_defaults(run=_cmd_validate)

    for name, run, help_, description in (
            ("audit", _cmd_audit, "run every audit of a manifest (local Ray, or the cluster at $RAY_ADDRESS)",
             "Run a batch of audits: features through Ray Data actor pools, the calibrated test, FDR across the batch."),
            ("plan", _cmd_plan, "list, hash and plan a manifest's audits; compute nothing",
             "What a run would compute, how much and on which models: list the sources, hash new images (the "
             "store's index spares known ones), plan against the feature store, write <output>/plan/plan.json.")):
        p = sub.add_parser(name, help=help_, description=description)
        p.add_argument("manifest", help="manifest file (local path or s3:// URI)")
        p.add_argument("--out", help="output location overriding the manifest's `output`")
        p.add_argument("--feature-store", help="feature store location (default: the manifest's, else <output>/features)")
        p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
        p.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (default: max(8, cores))")
        p.add_argument("--rehash", action="store_true", help="ignore the URI → hash index and re-read every image")
        p.add_argument("--output-root", help=ROOT_HELP)
        p.set_defaults(run=run)

    p = sub.add_parser("pack", help="pack a folder of images (+ a metadata sidecar) into WebDataset or Parquet shards",
                       description="Copy the images under SRC (bytes unchanged, so content hashes and stored features "
                                   "carry over) with their labels/captions into shards under DEST (local or s3://).")
    p.add_argument("src", help="folder or s3:// prefix of image files")
    p.add_argument("dest", help="folder or s3:// prefix for the shards (shard-000000.tar / .parquet, …)")
    p.add_argument("--format", required=True, choices=["webdataset", "parquet"], help="shard format")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: 1000)")
    p.add_argument("--metadata", help="sidecar JSONL/CSV (image name → label / caption(s)); default: SRC/metadata.jsonl "
                                      "or SRC/metadata.csv if present")
    p.set_defaults(run=_cmd_pack)

    p = sub.add_parser("demo", help="audit the embedded Fashion-MNIST collections against the two shipped demo models",
                       description="Materialise the bundled collections as image files, run the audit pipeline on them, print the verdicts.")
    p.add_argument("--out", default="demo-out", help="output folder (default: ./demo-out)")
    p.add_argument("--n", type=int, default=None,
                   help="images per collection for every audit (default: per model, cdi_ray.demo.audit.DEMO_SIZES)")
    p.add_argument("--preset", default="efficient", choices=["white-box", "gray-box", "efficient"],
                   help="feature preset (default: efficient — forward passes only, as cheap as gray-box and the most "
                        "decisive on the demo models; white-box takes ~2.7× as long)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and of every feature draw (default: 0)")
    p.set_defaults(run=_cmd_demo)

    p = sub.add_parser("report", help="(re)render the HTML reports of a results folder",
                       description="Render audits/<id>.html and index.html from results.json and audits/<id>.json "
                                   "(and diff.json, if the folder is a nightly run).")
    p.add_argument("results", help="results folder (local or s3://) or its results.json")
    p.add_argument("--out", help="where to write the HTML (default: the results folder itself)")
    p.set_defaults(run=_cmd_report)

    from cdi_ray.requests.commands import register as register_request_commands

    register_request_commands(sub)  # `requests` and `verify`
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from cdi_ray import console

    console.configure(args.verbose)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
        console.silence_ray_shutdown()
        print(INTERRUPTED_LINE, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # user errors carry their own fix; anything else is a bug
        if _is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            if args.verbose:
                log.exception("details")
            return EXIT_INVALID
        log.exception("internal error")
        return EXIT_INTERNAL


def _is_user_error(exc: Exception) -> bool:
    """Errors whose message tells the user what to fix (bad paths, bad manifests, bad images)."""
    from pydantic import ValidationError

    from cdi_ray.storage import UnwritableLocation

    if isinstance(exc, (UserError, FileNotFoundError, ValidationError, UnwritableLocation)):
        return True
    from cdi_ray.models.base import ModelLoadError

    if isinstance(exc, ModelLoadError):
        return True
    from cdi_ray.spec import ManifestError

    if isinstance(exc, ManifestError):
        return True
    try:
        from cdi_ray.images import ImageError
    except ImportError:
        return False
    return isinstance(exc, ImageError)


def run() -> None:
    """The ``cdi-ray`` console script: :func:`main`, then the process ends without the interpreter's
    teardown (:func:`cdi_ray.exits.exit_process`) — which would also wait for the feature streams'
    threads after a Ctrl-C instead of exiting at once. Ctrl-C ends it within a bound
    (:class:`cdi_ray.exits.InterruptGuard`)."""
    from cdi_ray.exits import InterruptGuard, exit_process

    InterruptGuard(INTERRUPTED_LINE).install()
    exit_process(main())


if __name__ == "__main__":
    run()

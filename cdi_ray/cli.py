"""`cdi-ray` command line.

Exit codes (the same for every subcommand):
  0  everything asked for was done
  1  internal error (a bug: please report it with the `-v` output)
  2  invalid input (bad manifest, missing model, unreadable images …) — the message says what to fix
  3  partial failure: some audits or images failed, the rest completed and were written
"""
from __future__ import annotations

import argparse
import logging
import sys

EXIT_OK, EXIT_INTERNAL, EXIT_INVALID, EXIT_PARTIAL = 0, 1, 2, 3

log = logging.getLogger("cdi_ray")


class UserError(Exception):
    """An error in what the user asked for; printed without a traceback, exit code 2."""


def _cmd_features(args: argparse.Namespace) -> int:
    from cdi_ray.features.extract import extract_to_parquet

    n = extract_to_parquet(
        args.model, args.images, args.out,
        preset=args.preset, seed=args.seed, device=args.device, batch_size=args.batch_size,
    )
    print(f"wrote {n} feature rows to {args.out}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdi-ray",
        description="Copyrighted-data identification for diffusion models: audit whether a model was trained on a collection.",
        epilog="Exit codes: 0 done, 2 invalid input, 3 partial failure, 1 internal error.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("features", help="extract per-image membership features into a Parquet file",
                       description="Run one model over a folder (or a file listing image paths) and write one feature row per image.")
    p.add_argument("--model", required=True, help="diffusers model directory (see README: supported families)")
    p.add_argument("--images", required=True, help="a folder of images, or a text file with one image path per line")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--preset", default="white-box", choices=["white-box", "gray-box"], help="feature preset (default: white-box, 26 features)")
    p.add_argument("--seed", type=int, default=0, help="audit seed; every random draw derives from it and the image's content hash")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model batch (default: 32)")
    p.set_defaults(run=_cmd_features)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
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

    if isinstance(exc, (UserError, FileNotFoundError, ValidationError)):
        return True
    from cdi_ray.models.base import ModelLoadError

    if isinstance(exc, ModelLoadError):
        return True
    try:
        from cdi_ray.images import ImageError
    except ImportError:
        return False
    return isinstance(exc, ImageError)


if __name__ == "__main__":
    raise SystemExit(main())

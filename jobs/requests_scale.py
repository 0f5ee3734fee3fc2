"""Scale job for bulk requests: N requests × 2 models with tiny collections, in one job, then
``verify`` on every request (README "Bulk requests" records a run).

    python jobs/requests_scale.py --workdir /tmp/req-scale                 # 2,000 requests, 6 + 6 images each
    python jobs/requests_scale.py --workdir /tmp/req-small --requests 50   # a quick one
    python jobs/requests_scale.py --workdir /tmp/req-head --requests 200 --address http://127.0.0.1:8265
                                                                           # through `ray job submit` to a head

1. writes N owners' collections (distinct random 16×16 PNGs, ``--images`` per side), two tiny
   pixel-DDPM models, ``registry.yaml`` and ``requests.csv`` — plus ``--bad`` rejected rows
   (unknown model, missing folder, duplicate id, missing field, in turn) — under ``--workdir``;
2. runs ``python jobs/requests.py requests.csv --models registry.yaml --out <workdir>/out`` as a
   child process (the command a user runs), or with ``--address`` through ``ray job submit`` to
   that head, and reads its JSON summary: wall time, the job's own timings and the driver's peak
   memory;
3. runs :func:`cdi_ray.requests.verify_request` on every request folder and counts matches;
4. re-runs the same command: nothing may be recomputed (0 audits, 0 features).

The last line on stdout is a JSON record of all of it.

``--seed-check`` instead measures the default test's rejection rate on Gaussian null data with the
seed fixed (as every audit's default seed 0 is, so all owners share one draw) versus a fresh seed
per dataset, at n = 6 and 50 per side — what the null run's false ``used`` rest on (docs/VERDICTS.md)::

    python jobs/requests_scale.py --seed-check            # ~2 minutes
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BAD_ROWS = ("unknown_model", "unreadable_source", "duplicate_id", "missing_field")


def write_collections(root: Path, n_requests: int, n_images: int) -> None:
    import numpy as np
    from PIL import Image

    for i in range(n_requests):
        for side in ("published", "unpublished"):
            folder = root / "owners" / f"owner-{i:05d}" / side
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([i, side == "published"])
            for j in range(n_images):
                Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"{j:03d}.png")


def write_inputs(root: Path, n_requests: int, n_bad: int) -> tuple[Path, Path]:
    import yaml

    from cdi_ray.models.testing import make_tiny_pixel_ddpm

    models = {name: str(make_tiny_pixel_ddpm(root / name, image_size=16, channels=1, seed=seed))
              for name, seed in (("tiny-a", 0), ("tiny-b", 1))}
    registry = root / "registry.yaml"
    registry.write_text(yaml.safe_dump({
        "models": {name: {"uri": uri, "access": "gray-box", "batch_size": 64} for name, uri in models.items()},
        "defaults": {"features": ["dl", "pia"], "overrides": {"dl": {"n_draws": 1}}, "test": {"min_samples": 5}}}))
    rows = [{"request_id": f"req-{i:05d}", "owner": f"Owner {i}", "contact": f"owner{i}@example.org",
             "published": f"owners/owner-{i:05d}/published", "unpublished": f"owners/owner-{i:05d}/unpublished",
             "models": ""} for i in range(n_requests)]
    for b in range(n_bad):
        kind = BAD_ROWS[b % len(BAD_ROWS)]
        row = {**rows[b % n_requests], "request_id": f"bad-{b:04d}"}
        if kind == "unknown_model":
            row["models"] = "tiny-z"
        elif kind == "unreadable_source":
            row["published"] = "owners/nobody/published"
        elif kind == "duplicate_id":
            row["request_id"] = rows[b % n_requests]["request_id"]
        else:
            row["owner"] = ""
        rows.append(row)
    requests = root / "requests.csv"
    with open(requests, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return requests, registry


def run_job(requests: Path, registry: Path, out: Path, address: str | None = None) -> dict:
    """The job as a child process, or — with ``address`` (a head's dashboard) — through ``ray job submit``."""
    args = ["jobs/requests.py", str(requests), "--models", str(registry), "--out", str(out)]
    cmd = ([sys.executable, *args] if address is None else
           ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--", "python", *args])
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - t0
    summary = next((json.loads(line) for line in reversed(proc.stdout.splitlines())
                    if line.startswith("{") and '"exit_code"' in line), None)
    if summary is None:
        raise RuntimeError(f"the job printed no summary (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return {"command": " ".join(cmd if address else cmd[1:]), "returncode": proc.returncode, "wall_s": round(wall, 1),
            "summary": summary}


def seed_check(datasets: int = 4000) -> list[dict]:
    """Rejection rates of the default test on i.i.d. Gaussian null data (k = 2), per n and seed rule."""
    import numpy as np

    from cdi_ray.stats import run_test

    out = []
    for n, seeds in ((6, ("0", "1", "fresh")), (50, ("0", "1", "2", "fresh"))):
        for rule in seeds:
            rng = np.random.default_rng(12345)
            ps = np.array([run_test(*np.split(rng.normal(size=(2 * n, 2)), 2),
                                    seed=i if rule == "fresh" else int(rule)).pvalue for i in range(datasets)])
            out.append({"n_per_side": n, "seed": rule, "datasets": datasets,
                        **{f"P(p<={a})": round(float((ps <= a).mean()), 4) for a in (0.01, 0.05, 0.1)}})
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed-check", action="store_true", help="only the fixed-seed calibration check (no pipeline)")
    p.add_argument("--workdir")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--images", type=int, default=6, help="images per collection (per side)")
    p.add_argument("--bad", type=int, default=8, help="rows that must be rejected")
    p.add_argument("--address", help="a running head's dashboard (http://HOST:8265): submit the job with `ray job "
                                     "submit` instead of running it as a child process")
    args = p.parse_args()
    if args.seed_check:
        print(json.dumps({"seed_check": seed_check()}))
        return
    if not args.workdir:
        p.error("give --workdir (or --seed-check)")
    root = Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    write_collections(root, args.requests, args.images)
    requests, registry = write_inputs(root, args.requests, args.bad)
    record = {"requests": args.requests, "images_per_side": args.images, "bad_rows": args.bad,
              "setup_s": round(time.time() - t0, 1), "cpus": os.cpu_count(),
              "load_average": os.getloadavg()}
    out = root / "out"
    record["first"] = run_job(requests, registry, out, args.address)

    from cdi_ray.requests import verify_request

    t0 = time.time()
    mismatched = []
    folders = sorted((out / "requests").iterdir())
    for folder in folders:
        v = verify_request(str(folder))
        if not v.matches:
            mismatched.append({"request": folder.name, "differences": [str(d) for d in v.differences][:5]})
    record["verify"] = {"requests": len(folders), "matched": len(folders) - len(mismatched),
                        "mismatched": mismatched[:10], "seconds": round(time.time() - t0, 1)}
    record["rerun"] = run_job(requests, registry, out, args.address)
    print(json.dumps(record, default=str))


if __name__ == "__main__":
    main()

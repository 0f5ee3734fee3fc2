"""`cdi-ray demo`: audit the embedded default collections end to end.

1. materialise the bundled Fashion-MNIST collections as PNG files in a folder laid out like an
   object-store bucket (``<out>/bucket/fashion16/<collection>/<n>.png``);
2. write a manifest auditing them against both shipped demo models;
3. run it through the same pipeline a cluster runs (`cdi_ray.pipeline.run.run_manifest`, a local Ray);
4. print a verdict table next to the expected verdicts, and write ``results.json`` and reports.

The collections (``n`` images each; held-out sets come from the pool neither model saw):

==================  =========================================================
``members-<m>``     ``n`` training images of model ``<m>``
``mix50-<m>``       ``n/2`` other training images of ``<m>`` + ``n/2`` held-out images
``heldout-a``       held-out images — the U set of every audit (shared: computed once per model)
``heldout-b``       other held-out images — a P that no model saw
==================  =========================================================
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from cdi_ray.demo.bundle import DEMO_MODELS, demo_model_dir, load_bundle, load_split

#: Images per collection. Enough for both demo models to show `used` on members (the hard model
#: is the bottleneck, see docs/DEMO_DATA.md), small enough for a few minutes on 2 CPU cores.
DEFAULT_N = 200


@dataclass(frozen=True)
class DemoAudit:
    id: str
    model: str
    published: str
    unpublished: str
    expected: str   # the verdict a correct tool gives
    what: str       # one line for the table


def demo_audits(models=DEMO_MODELS) -> list[DemoAudit]:
    audits = []
    for m in models:
        audits += [
            DemoAudit(f"{m}-members", m, f"members-{m}", "heldout-a", "used", "training images vs held-out"),
            DemoAudit(f"{m}-mix50", m, f"mix50-{m}", "heldout-a", "used", "50% training images vs held-out"),
            DemoAudit(f"{m}-heldout", m, "heldout-b", "heldout-a", "not_detected", "held-out vs held-out"),
        ]
    return audits


def encode_png(image: np.ndarray) -> bytes:
    """The PNG bytes the demo writes for a bundle image (their sha256 is the image's identity)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def materialise(root: Path, *, n: int, seed: int = 0, models=DEMO_MODELS) -> dict[str, Path]:
    """Write the demo collections under ``root`` as PNG files; return collection → folder."""
    bundle = load_bundle()
    rng = np.random.default_rng(seed)
    heldout = rng.permutation(load_split(models[0])["heldout"])
    for m in models[1:]:
        heldout = heldout[np.isin(heldout, load_split(m)["heldout"])]
    need = 2 * n + (n // 2) * len(models)
    if len(heldout) < need:
        raise ValueError(f"--n {n} needs {need} held-out images, the bundle has {len(heldout)}; lower --n")
    picks = {"heldout-a": heldout[:n], "heldout-b": heldout[n:2 * n]}
    spare = heldout[2 * n:]
    for i, m in enumerate(models):
        members = rng.permutation(load_split(m)["members"])
        half = n // 2
        if len(members) < n + half:
            raise ValueError(f"--n {n} needs {n + half} members of model {m!r}, it has {len(members)}; lower --n")
        picks[f"members-{m}"] = members[:n]
        picks[f"mix50-{m}"] = np.concatenate([members[n:n + half], spare[i * (n - half):(i + 1) * (n - half)]])
    folders = {}
    for name, idx in picks.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j, k in enumerate(idx):
            (folder / f"{j:05d}.png").write_bytes(encode_png(bundle.images[int(k)]))
        folders[name] = folder
    return folders


def write_manifest(path: Path, *, collections: Path, output: Path, models=DEMO_MODELS, preset: str = "white-box",
                   seed: int = 0) -> Path:
    manifest = {
        "models": {m: {"uri": str(demo_model_dir(m)), "access": "white-box", "batch_size": 64,
                       "min_replicas": 1, "max_replicas": 2} for m in models},
        "audits": [{"id": a.id, "model": a.model, "published": str(collections / a.published),
                    "unpublished": str(collections / a.unpublished), "preset": preset, "seed": seed}
                   for a in demo_audits(models)],
        "output": str(output),
        "fdr": {"method": "bh", "q": 0.01},
    }
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def verdict_table(entries: list[dict], audits: list[DemoAudit]) -> str:
    by_id = {e["audit_id"]: e for e in entries}
    rows = [("audit", "P vs U", "n_P", "n_U", "p", "p_adj (BH)", "verdict", "expected", "")]
    for a in audits:
        e = by_id[a.id]
        fmt = lambda p: "—" if p is None else f"{p:.2g}"  # noqa: E731
        ok = "ok" if e["verdict"] == a.expected else "UNEXPECTED"
        rows.append((a.id, a.what, str(e["n_published"]), str(e["n_unpublished"]), fmt(e["p_value"]),
                     fmt(e["p_adjusted"]), e["verdict"], a.expected, ok))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(out: str | os.PathLike = "demo-out", *, n: int = DEFAULT_N, preset: str = "white-box", seed: int = 0,
             models=DEMO_MODELS) -> dict:
    """Materialise, audit, and return ``{"table", "results", "output", "all_expected"}``."""
    from cdi_ray.pipeline.run import run_manifest
    from cdi_ray.spec import load_manifest

    out = Path(out).resolve()
    collections = out / "bucket" / "fashion16"
    materialise(collections, n=n, seed=seed, models=models)
    manifest_path = write_manifest(out / "manifest.yaml", collections=collections, output=out / "results",
                                   models=models, preset=preset, seed=seed)
    batch = run_manifest(load_manifest(manifest_path))
    audits = demo_audits(models)
    by_id = {e["audit_id"]: e for e in batch.audits}
    return {
        "table": verdict_table(batch.audits, audits),
        "output": batch.output,
        "manifest": str(manifest_path),
        "exit_code": batch.exit_code,
        "all_expected": all(by_id[a.id]["verdict"] == a.expected for a in audits),
        "never_false_used": all(by_id[a.id]["verdict"] != "used" for a in audits if a.expected != "used"),
        "results": batch.to_dict(),
    }

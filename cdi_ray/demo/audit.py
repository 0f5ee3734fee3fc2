"""`cdi-ray demo`: audit the embedded default collections end to end.

1. materialise the bundled Fashion-MNIST collections as PNG files in a folder laid out like an
   object-store bucket (``<out>/bucket/fashion16/<collection>/<n>.png``);
2. write a manifest auditing them against both shipped demo models;
3. run it through the same pipeline a cluster runs (`cdi_ray.run_manifest`, a local Ray);
4. print a verdict table next to the expected verdicts, and write ``results.json`` and reports.

The collections, per model ``<m>`` (held-out images come from the pool neither model saw):

====================  ==================================================================
``members-<m>``       training images of ``<m>``
``mix50-<m>``         other training images of ``<m>`` + as many held-out images
``heldout-u-<m>``     held-out images — the U set of ``<m>``'s audits
``heldout-p-<m>``     other held-out images — a P that no model saw
====================  ==================================================================

Sizes differ per model because the models differ in how much evidence they leave
(:data:`DEMO_SIZES`, from the reference measurements in docs/DEMO_DATA.md): the ``hard`` model,
like the paper's large models, needs hundreds of images per side, and ~1,000 when only half of P
was trained on. U sets and the held-out P of both models are prefixes of one permutation of the
held-out pool (a model's features are computed per model anyway), so the whole demo fits in the
bundle's 2,500 held-out images.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from cdi_ray.demo.bundle import DEMO_MODELS, demo_model_dir, load_bundle, load_split

#: Forward passes only, as many as gray-box (28 per image), and the most decisive preset on both demo
#: models (docs/DEMO_DATA.md: chosen on the tuning half of ``hard``, reported on its evaluation half
#: and on ``easy``).
DEFAULT_PRESET = "efficient"


@dataclass(frozen=True)
class DemoSizes:
    """Images per collection of one demo model's audits."""

    members: int      # P of the members audit
    mix50: int        # P of the 50 % audit (half members, half held-out)
    unpublished: int  # U of every audit of this model
    heldout: int      # P of the held-out audit


#: From the reference results with the demo's default preset (``efficient``) and test, mean p over 20
#: random audits (docs/DEMO_DATA.md): easy — members separate at n = 20, 50 % members at n = 200
#: (mean p 0.001); hard (evaluation half) — members at n = 200 (mean p 0.001), 50 % members at
#: n = 600 (mean p 0.002). Each size has a margin over its figure, so one run of the demo gives
#: the expected verdicts after the batch's FDR control.
DEMO_SIZES = {"easy": DemoSizes(100, 200, 200, 100), "hard": DemoSizes(200, 800, 800, 200)}


def sizes_for(model: str, n: int | None) -> DemoSizes:
    """The model's default sizes, or ``n`` for every collection."""
    return DEMO_SIZES[model] if n is None else DemoSizes(n, n, n, n)


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
            DemoAudit(f"{m}-members", m, f"members-{m}", f"heldout-u-{m}", "used", "training images vs held-out"),
            DemoAudit(f"{m}-mix50", m, f"mix50-{m}", f"heldout-u-{m}", "used", "50% training images vs held-out"),
            DemoAudit(f"{m}-heldout", m, f"heldout-p-{m}", f"heldout-u-{m}", "not_detected", "held-out vs held-out"),
        ]
    return audits


def encode_png(image: np.ndarray) -> bytes:
    """The PNG bytes the demo writes for a bundle image (their sha256 is the image's identity)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def materialise(root: Path, *, n: int | None = None, seed: int = 0, models=DEMO_MODELS) -> dict[str, Path]:
    """Write the demo collections under ``root`` as PNG files; return collection → folder.

    Held-out layout (one permutation of the pool): ``[0, U)`` the U sets (each model's a prefix),
    then the held-out P sets (prefixes of the next block), then each model's held-out half of mix50.
    """
    bundle = load_bundle()
    rng = np.random.default_rng(seed)
    heldout = rng.permutation(load_split(models[0])["heldout"])
    for m in models[1:]:
        heldout = heldout[np.isin(heldout, load_split(m)["heldout"])]
    sizes = {m: sizes_for(m, n) for m in models}
    u_block = max(z.unpublished for z in sizes.values())
    p_block = max(z.heldout for z in sizes.values())
    mix_held = [z.mix50 - z.mix50 // 2 for z in sizes.values()]
    need = u_block + p_block + sum(mix_held)
    if len(heldout) < need:
        raise ValueError(f"these sizes need {need} held-out images, the bundle has {len(heldout)}; lower --n")
    picks: dict[str, np.ndarray] = {}
    spare = u_block + p_block
    for m in models:
        z = sizes[m]
        members = rng.permutation(load_split(m)["members"])
        half = z.mix50 // 2
        if len(members) < z.members + half:
            raise ValueError(f"these sizes need {z.members + half} members of model {m!r}, it has {len(members)}; "
                             f"lower --n")
        picks[f"heldout-u-{m}"] = heldout[:z.unpublished]
        picks[f"heldout-p-{m}"] = heldout[u_block:u_block + z.heldout]
        picks[f"members-{m}"] = members[:z.members]
        picks[f"mix50-{m}"] = np.concatenate([members[z.members:z.members + half],
                                              heldout[spare:spare + z.mix50 - half]])
        spare += z.mix50 - half
    folders = {}
    for name, idx in picks.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j, k in enumerate(idx):
            (folder / f"{j:05d}.png").write_bytes(encode_png(bundle.images[int(k)]))
        folders[name] = folder
    return folders


def write_manifest(path: Path, *, collections: Path, output: Path, models=DEMO_MODELS, preset: str = DEFAULT_PRESET,
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


def run_demo(out: str | os.PathLike = "demo-out", *, n: int | None = None, preset: str = DEFAULT_PRESET, seed: int = 0,
             models=DEMO_MODELS) -> dict:
    """Materialise, audit, and return ``{"table", "results", "output", "all_expected"}``."""
    from cdi_ray import run_manifest
    from cdi_ray.pipeline.cluster import load_manifest_starting_ray

    out = Path(out).resolve()
    collections = out / "bucket" / "fashion16"
    materialise(collections, n=n, seed=seed, models=models)
    manifest_path = write_manifest(out / "manifest.yaml", collections=collections, output=out / "results",
                                   models=models, preset=preset, seed=seed)
    batch = run_manifest(load_manifest_starting_ray(str(manifest_path)))
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

"""Quick membership check of the demo models: is the per-image signal as strong (easy) or weak (hard) as intended?

For each model directory (``unet/``, ``scheduler/``, ``split.json``) it computes, on the
model's members and the shared held-out pool:

* **DL** (METHOD.md feature 0): mean over 5 independent ε at t=100 of ‖f(z_t, t) − ε‖
  (plain L2, lower = member); ε drawn per image from ``cdi_ray.seeding`` streams.
* AUC and TPR at FPR=1% of −DL (members positive);
* **samples needed**: the smallest n on METHOD.md's grid for which a one-sided Welch
  t-test (H1: DL(held-out) > DL(members)) on n random members vs n random held-out images
  has mean p < 0.01 over ``--repeats`` random subsets;
* **ML + DL combined** (indicative only): ‖f(z_t, t) − ε‖ at t = 0, 100, …, 900 with one
  ε shared over t, plus DL — 11 numbers — scored by a 5-fold cross-fitted
  ``StandardScaler + LogisticRegression``; its AUC shows whether combining features helps.

This is a small stand-in to choose training settings; the full reference benchmark supersedes it.

    python jobs/check_demo_models.py                       # both shipped models, writes demo-out/check_demo_models.json
    python jobs/check_demo_models.py --model-dir /tmp/exp/easy
    python jobs/check_demo_models.py --smoke-test          # tiny random UNet, 40 images
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cdi_ray.demo.bundle import DEMO_MODELS, demo_model_dir, load_bundle
from cdi_ray.seeding import image_generators, per_image_randn

SEED = 0                      # audit seed for the ε streams and the subset draws
DL_T, DL_REPEATS = 100, 5     # METHOD.md: DL = mean over 5 ε of ‖f(z_t, 100) − ε‖
ML_TIMESTEPS = tuple(range(0, 1000, 100))
BATCH = 250                   # forward passes only; 250 16×16 images are a few MB
N_GRID = (5, 6, 7, 8, 9, 10, *range(20, 101, 10), *range(200, 1001, 100), *range(2000, 10001, 1000), 20000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, action="append",
                   help="model directory to check (repeatable); defaults to the shipped easy and hard models")
    p.add_argument("--repeats", type=int, default=200, help="random subsets per n for the samples-needed estimate")
    p.add_argument("--max-images", type=int, default=None,
                   help="use at most this many members and held-out images each (first k of a seeded shuffle)")
    p.add_argument("--no-combined", action="store_true", help="skip the ML+DL logistic-regression check")
    p.add_argument("--out", type=Path, default=Path("demo-out/check_demo_models.json"))
    p.add_argument("--smoke-test", action="store_true", help="tiny random UNet on 40 images; writes to a temp dir")
    return p.parse_args(argv)


def content_hashes(images: np.ndarray) -> list[str]:
    return [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


@torch.inference_mode()
def features(unet, alphas_cumprod: torch.Tensor, images_u8: np.ndarray, combined: bool) -> dict[str, np.ndarray]:
    """DL (n,) and, if ``combined``, ML (n, 10) for uint8 images (n, 16, 16)."""
    hashes = content_hashes(images_u8)
    x_all = torch.from_numpy(images_u8.astype(np.float32) / 127.5 - 1.0)[:, None]   # z = x in [-1, 1]
    dl, ml = [], []
    for s in range(0, len(x_all), BATCH):
        z, h = x_all[s:s + BATCH], hashes[s:s + BATCH]
        # 1. DL: 5 independent ε at t=100, mean of plain L2 norms
        gens = image_generators(SEED, h, "dl")
        a = alphas_cumprod[DL_T]
        norms = []
        for _ in range(DL_REPEATS):
            eps = per_image_randn(tuple(z.shape[1:]), gens)
            z_t = a.sqrt() * z + (1 - a).sqrt() * eps
            norms.append((unet(z_t, torch.full((len(z),), DL_T)).sample - eps).flatten(1).norm(dim=1))
        dl.append(torch.stack(norms).mean(0))
        # 2. ML: one ε shared over t = 0, 100, …, 900
        if combined:
            eps = per_image_randn(tuple(z.shape[1:]), image_generators(SEED, h, "ml"))
            row = []
            for t in ML_TIMESTEPS:
                a = alphas_cumprod[t]
                z_t = a.sqrt() * z + (1 - a).sqrt() * eps
                row.append((unet(z_t, torch.full((len(z),), t)).sample - eps).flatten(1).norm(dim=1))
            ml.append(torch.stack(row, 1))
    out = {"dl": torch.cat(dl).numpy().astype(np.float64)}
    if combined:
        out["ml"] = torch.cat(ml).numpy().astype(np.float64)
    return out


def tpr_at_fpr(y: np.ndarray, score: np.ndarray, fpr_max: float = 0.01) -> float:
    """Largest TPR on the ROC with FPR ≤ ``fpr_max`` (higher score = member)."""
    fpr, tpr, _ = roc_curve(y, score)
    return float(tpr[fpr <= fpr_max].max())


def samples_needed(member: np.ndarray, heldout: np.ndarray, repeats: int, rng: np.random.Generator) -> dict:
    """Smallest grid n with mean one-sided Welch p < 0.01 (H1: DL(held-out) > DL(members))."""
    n_max = min(len(member), len(heldout))
    curve = {}
    for n in [n for n in N_GRID if n <= n_max]:
        ps = [stats.ttest_ind(rng.choice(heldout, n, replace=False), rng.choice(member, n, replace=False),
                              equal_var=False, alternative="greater").pvalue for _ in range(repeats)]
        curve[n] = float(np.mean(ps))
        if curve[n] < 0.01:
            return {"n": n, "mean_p": curve}
    return {"n": None, "mean_p": curve, "note": f"mean p ≥ 0.01 for every n ≤ {n_max}"}


def combined_auc(feats_m: np.ndarray, feats_h: np.ndarray, seed: int) -> float:
    """5-fold cross-fitted AUC of StandardScaler + LogisticRegression on the given feature columns."""
    X = np.concatenate([feats_m, feats_h])
    y = np.r_[np.ones(len(feats_m)), np.zeros(len(feats_h))]
    score = np.empty(len(y))
    for fit, test in StratifiedKFold(5, shuffle=True, random_state=seed).split(X, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(solver="liblinear", max_iter=1000, C=1.0))
        clf.fit(X[fit], y[fit])
        score[test] = clf.predict_proba(X[test])[:, 1]
    return float(roc_auc_score(y, score))


def check(model_dir: Path, bundle, args: argparse.Namespace, unet=None, alphas_cumprod=None) -> dict:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.set_num_threads(2)   # shared 2-core build machine
    split = json.loads((model_dir / "split.json").read_text()) if (model_dir / "split.json").exists() else None
    if unet is None:
        unet = UNet2DModel.from_pretrained(model_dir / "unet").eval()
        alphas_cumprod = DDPMScheduler.from_pretrained(model_dir / "scheduler").alphas_cumprod.to(torch.float32)
    members, heldout = np.asarray(split["members"]), np.asarray(split["heldout"])
    rng = np.random.default_rng(SEED)
    if args.max_images:
        members = rng.permutation(members)[:args.max_images]
        heldout = rng.permutation(heldout)[:args.max_images]

    t0 = time.time()
    combined = not args.no_combined
    fm = features(unet, alphas_cumprod, bundle.images[members], combined)
    fh = features(unet, alphas_cumprod, bundle.images[heldout], combined)
    y = np.r_[np.ones(len(members)), np.zeros(len(heldout))]
    neg_dl = -np.r_[fm["dl"], fh["dl"]]
    d = (fh["dl"].mean() - fm["dl"].mean()) / np.sqrt((fh["dl"].var(ddof=1) + fm["dl"].var(ddof=1)) / 2)
    res = {
        "model_dir": str(model_dir),
        "n_members": int(len(members)), "n_heldout": int(len(heldout)),
        "training": split.get("training") if split else None,
        "dl": {
            "mean_member": float(fm["dl"].mean()), "mean_heldout": float(fh["dl"].mean()),
            "cohens_d": float(d),
            "auc": float(roc_auc_score(y, neg_dl)),
            "tpr_at_1pct_fpr": tpr_at_fpr(y, neg_dl),
            "samples_needed_welch": samples_needed(fm["dl"], fh["dl"], args.repeats, rng),
        },
    }
    if combined:
        res["ml"] = {f"auc_t{t}": float(roc_auc_score(y, -np.r_[fm["ml"][:, i], fh["ml"][:, i]]))
                     for i, t in enumerate(ML_TIMESTEPS)}
        res["combined_dl_ml_lr_auc"] = combined_auc(np.c_[fm["dl"], fm["ml"]], np.c_[fh["dl"], fh["ml"]], SEED)
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main(args: argparse.Namespace) -> dict:
    bundle = load_bundle()
    results = {"date": datetime.date.today().isoformat(), "command": "python jobs/check_demo_models.py", "models": {}}
    if args.smoke_test:
        from diffusers import UNet2DModel
        d = Path(tempfile.mkdtemp(prefix="cdi-check-smoke-"))
        (d / "split.json").write_text(json.dumps({"members": bundle.pool("easy")[:20].tolist(),
                                                  "heldout": bundle.pool("heldout")[:20].tolist()}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                               down_block_types=("DownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        args.repeats, args.out = 10, d / "check.json"
        results["models"]["smoke"] = check(d, bundle, args, unet, torch.cumprod(1 - betas, 0).float())
    else:
        dirs = args.model_dir or [demo_model_dir(name) for name in DEMO_MODELS]
        for md in dirs:
            results["models"][md.name] = check(md, bundle, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name, r in results["models"].items():
        print(f"{name}: DL AUC {r['dl']['auc']:.3f}  TPR@1%FPR {r['dl']['tpr_at_1pct_fpr']:.3f}  "
              f"d {r['dl']['cohens_d']:.2f}  n(p<0.01) {r['dl']['samples_needed_welch']['n']}"
              + (f"  DL+ML LR AUC {r['combined_dl_ml_lr_auc']:.3f}" if "combined_dl_ml_lr_auc" in r else ""))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main(parse_args())

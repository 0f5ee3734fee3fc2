"""Train the two shipped demo models, ``cdi_ray/demo_assets/models/{easy,hard}``.

Both are unconditional pixel DDPMs — diffusers ``UNet2DModel`` (≈1.1 M parameters,
16×16, 1 channel) with a ``DDPMScheduler`` (linear β from 1e-4 to 0.02, 1,000 steps,
ε-prediction) — trained with the standard DDPM loss ``‖f(z_t, t) − ε‖²``, t uniform
in {0, …, 999}, on members drawn from the bundled ``fashion16`` data:

* ``easy`` — the 500 images of the bundle's ``easy`` pool; trained long enough per image
  that the denoising loss alone separates members from held-out images.
* ``hard`` — the 2,000 images of the bundle's ``hard`` pool, same architecture, twice the steps:
  each image is seen half as often (192 vs 384 epochs) and single features are weak.

Each model is saved like ``DDPMPipeline.save_pretrained``: ``model_index.json``,
``unet/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``, fp32) and
``scheduler/scheduler_config.json``, plus ``split.json`` (member and held-out bundle
indices, training settings, wall time, the weights' sha256).

Randomness: the weight initialisation runs under ``torch.random.fork_rng`` seeded with the
model's seed (diffusers' initialisers only read the global generator; the global state is
restored afterwards), and every draw during training — data order, t, ε — comes from
explicit ``torch.Generator`` objects. On CPU with a fixed thread count the weights are
reproducible bit for bit.

    nohup python jobs/train_demo_models.py --which easy > easy.log 2>&1 &
    python jobs/train_demo_models.py --smoke-test          # 20 steps, tiny UNet, temporary directory
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cdi_ray.demo.bundle import load_bundle

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "cdi_ray" / "demo_assets" / "models"

# ≈1.1 M parameters: three resolutions 16→8→4, self-attention only at 4×4 (cheap there);
# GroupNorm with 8 groups because 32 groups of a 32-channel block would be 1 channel each.
UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
SMOKE_UNET_CONFIG = dict(UNET_CONFIG, block_out_channels=(8, 16, 16), norm_num_groups=4)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        prediction_type="epsilon", clip_sample=True, variance_type="fixed_small")

# Settings chosen with jobs/check_demo_models.py (see docs/DEMO_DATA.md):
#   easy: 500 members × 3,000 steps × batch 64 = 384 epochs → DL alone separates members (AUC ≈ 0.8).
#   hard: 2,000 members × 6,000 steps = 192 epochs → weak per-image signal. Tried first and rejected as
#         too weak for any audit the bundle allows: 4,000 × 3,000 steps (48 epochs, DL AUC 0.51, d 0.06)
#         and 2,000 × 3,000 steps (96 epochs, DL AUC 0.525, d 0.10, DL alone needs |P| ≈ 2,000).
PRESETS = {
    "easy": dict(pool="easy", n_members=500, steps=3000, batch_size=64, lr=1e-3, warmup=100, seed=1),
    "hard": dict(pool="hard", n_members=2000, steps=6000, batch_size=64, lr=1e-3, warmup=100, seed=2),
}
NUM_THREADS = 2      # the build machine has 2 cores; weights are reproducible for a fixed thread count
GRAD_CLIP = 1.0      # standard for DDPM training; guards the first steps at lr 1e-3
CHECKPOINT_EVERY = 200   # steps; a killed run restarted with the same command resumes (shared machine)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=["easy", "hard", "both"], default="both")
    p.add_argument("--out-dir", type=Path, default=MODELS_DIR, help="models are written to OUT_DIR/<name>/")
    p.add_argument("--steps", type=int, help="override the preset's optimiser steps")
    p.add_argument("--batch-size", type=int, help="override the preset's batch size")
    p.add_argument("--lr", type=float, help="override the preset's peak learning rate")
    p.add_argument("--n-members", type=int, help="override the preset's member count (first k of the pool, class-balanced)")
    p.add_argument("--seed", type=int, help="override the preset's seed")
    p.add_argument("--smoke-test", action="store_true", help="tiny UNet, 20 steps, 40 members, temporary directory")
    return p.parse_args(argv)


def balanced_prefix(indices: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` of ``indices`` taken round-robin over classes, so the subset stays class-balanced."""
    classes = np.unique(labels[indices])
    if k % len(classes):
        raise ValueError(f"n_members must be a multiple of {len(classes)} (class balance), got {k}")
    per = k // len(classes)
    picks = []
    for c in classes:
        of_c = indices[labels[indices] == c]
        if len(of_c) < per:
            raise ValueError(f"n_members={k} needs {per} images of class {c}; the pool has {len(of_c)}")
        picks.append(of_c[:per])
    return np.sort(np.concatenate(picks))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dump_split(split: dict) -> str:
    """JSON with one top-level key per line and index lists kept on one line (readable diffs, small file)."""
    lines = [f"  {json.dumps(k)}: " + (json.dumps(v) if isinstance(v, list) else json.dumps(v, indent=2).replace("\n", "\n  "))
             for k, v in split.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_one(name: str, settings: dict, out_dir: Path, unet_config: dict, log_every: int = 100,
              command: str = "", checkpoint_every: int = CHECKPOINT_EVERY) -> dict:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.set_num_threads(NUM_THREADS)
    bundle = load_bundle()

    # 1. members (class-balanced prefix of the model's pool) and the shared held-out pool
    members = balanced_prefix(bundle.pool(settings["pool"]), bundle.labels, settings["n_members"])
    heldout = bundle.pool("heldout")
    x0_all = torch.from_numpy(bundle.images_float(members))          # (n, 1, 16, 16) in [-1, 1]

    # 2. model and schedule; init under a forked, seeded global RNG (diffusers initialisers use it)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        unet = UNet2DModel(**unet_config)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)        # ᾱ_t, (1000,)
    n_params = sum(p.numel() for p in unet.parameters())

    # 3. explicit generators for data order, t and ε
    g_data = torch.Generator().manual_seed(settings["seed"] * 1000 + 1)
    g_t = torch.Generator().manual_seed(settings["seed"] * 1000 + 2)
    g_eps = torch.Generator().manual_seed(settings["seed"] * 1000 + 3)

    opt = torch.optim.AdamW(unet.parameters(), lr=settings["lr"], weight_decay=0.0)
    bs, steps, n = settings["batch_size"], settings["steps"], len(members)
    order, pos = torch.randperm(n, generator=g_data), 0
    losses, running, t_start, elapsed_before, first_step = [], 0.0, time.time(), 0.0, 0

    # 3c. resume from a checkpoint of the same settings (all RNG states included → same weights as uninterrupted)
    if checkpoint_every % log_every:
        raise ValueError(f"checkpoint_every ({checkpoint_every}) must be a multiple of log_every ({log_every})")
    ckpt_path = out_dir / f".{name}.ckpt.pt"
    ckpt_key = json.dumps({"settings": settings, "unet": unet_config}, sort_keys=True, default=list)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["key"] == ckpt_key:
            unet.load_state_dict(ck["unet"]), opt.load_state_dict(ck["opt"])
            for g, state in zip((g_data, g_t, g_eps), ck["generators"]):
                g.set_state(state)
            order, pos, losses, elapsed_before, first_step = ck["order"], ck["pos"], ck["losses"], ck["elapsed"], ck["step"]
            print(f"[{name}] resumed from {ckpt_path} at step {first_step}", flush=True)
        else:
            print(f"[{name}] ignoring {ckpt_path}: written with other settings", flush=True)
    unet.train()
    for step in range(first_step, steps):
        # 3a. next batch from an epoch-wise permutation (every member seen equally often)
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g_data), 0
        x0 = x0_all[order[pos:pos + bs]]
        pos += bs
        # 3b. z_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, t uniform; loss ‖f(z_t,t) − ε‖² (mean)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g_t)
        eps = torch.randn(x0.shape, generator=g_eps)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(unet(z_t, t).sample, eps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, settings["warmup"], settings["lr"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), GRAD_CLIP)
        opt.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            k = (step % log_every) + 1
            losses.append([step + 1, round(running / k, 5)])
            print(f"[{name}] step {step + 1}/{steps} loss {running / k:.4f} "
                  f"({time.time() - t_start:.0f}s)", flush=True)
            running = 0.0
            if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                out_dir.mkdir(parents=True, exist_ok=True)
                torch.save({"key": ckpt_key, "step": step + 1, "unet": unet.state_dict(), "opt": opt.state_dict(),
                            "generators": [g.get_state() for g in (g_data, g_t, g_eps)], "order": order,
                            "pos": pos, "losses": losses, "elapsed": elapsed_before + time.time() - t_start},
                           ckpt_path.with_suffix(".tmp"))
                ckpt_path.with_suffix(".tmp").replace(ckpt_path)
    wall = elapsed_before + time.time() - t_start

    # 4. save like DDPMPipeline.save_pretrained, fp32 safetensors
    model_dir = out_dir / name
    model_dir.mkdir(parents=True, exist_ok=True)
    unet.eval()
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(model_dir, safe_serialization=True)
    weights = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    split = {
        "model": name,
        "bundle": {"name": bundle.meta["name"], "npz_sha256": bundle.meta["npz_sha256"]},
        "members": members.tolist(),
        "heldout": heldout.tolist(),
        "n_members": int(len(members)),
        "n_heldout": int(len(heldout)),
        "weights_file": "unet/diffusion_pytorch_model.safetensors",
        "weights_sha256": file_sha256(weights),
        "n_parameters": int(n_params),
        "training": {
            **{k: settings[k] for k in ("steps", "batch_size", "lr", "warmup", "seed")},
            "epochs": round(steps * bs / n, 1),
            "optimizer": "AdamW(weight_decay=0, betas=(0.9, 0.999))",
            "lr_schedule": "linear warm-up then cosine decay to 0",
            "grad_clip": GRAD_CLIP,
            "loss": "mse(f(z_t, t), eps), t ~ U{0..999}, no EMA, no augmentation",
            "dtype": "float32",
            "device": "cpu",
            "num_threads": NUM_THREADS,
            "torch_version": torch.__version__,
            "wall_time_s": round(wall, 1),   # on a 2-core machine shared with other jobs: an upper bound
            "command": command,
        },
        "loss_curve": losses,   # [step, mean training loss over the previous log interval]
    }
    ckpt_path.unlink(missing_ok=True)
    weights.chmod(0o644)   # safetensors writes 0600; package data must be world-readable
    (model_dir / "split.json").write_text(dump_split(split))
    return {"model": name, "dir": str(model_dir), "n_members": len(members), "n_parameters": n_params,
            "wall_time_s": round(wall, 1), "final_loss": losses[-1][1], "weights_sha256": split["weights_sha256"]}


def main(args: argparse.Namespace) -> dict:
    names = ["easy", "hard"] if args.which == "both" else [args.which]
    out_dir, unet_config = args.out_dir, UNET_CONFIG
    if args.smoke_test:
        out_dir, unet_config = Path(tempfile.mkdtemp(prefix="cdi-demo-models-smoke-")), SMOKE_UNET_CONFIG
    results = {}
    for name in names:
        settings = dict(PRESETS[name])
        for k in ("steps", "batch_size", "lr", "n_members", "seed"):
            if getattr(args, k) is not None:
                settings[k] = getattr(args, k)
        if args.smoke_test:
            settings.update(steps=20, batch_size=8, n_members=40)
        # the command that reproduces these weights (--out-dir only moves them, so it is left out)
        command = f"python jobs/train_demo_models.py --which {name}" + "".join(
            f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("steps", "batch_size", "lr", "n_members", "seed")
            if getattr(args, k) is not None) + (" --smoke-test" if args.smoke_test else "")
        results[name] = train_one(name, settings, out_dir, unet_config, log_every=10 if args.smoke_test else 100,
                                  command=command)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(parse_args())

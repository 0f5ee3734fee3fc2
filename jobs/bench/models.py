"""The model under test and its inputs: a demo pixel DDPM, a tiny test model, or DiT-XL/2-256 built
from config with random weights (``--gpu-dit-xl``; no download)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

#: DiT-XL/2 at 256 px (Peebles & Xie): transformer and the SD KL autoencoder, built from config.
DIT_XL_2_256 = {
    "transformer": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                        sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215),
}


@dataclass
class Bench:
    """What the sections share: the model under test and where it lives."""

    model: object
    model_uri: str | None      # a directory the pipeline can load (None: in-memory only, no e2e)
    name: str
    images: Callable[[int], tuple[np.ndarray, list[int] | None]]  # n → images in [-1, 1], labels
    device: str
    autocast: str | None


def load_bench(args, workdir: Path) -> Bench:
    from cdi_ray.models.loader import load_model

    if args.model == "dit-xl":
        if args.tiny:
            from cdi_ray.models.testing import make_tiny_dit

            path = make_tiny_dit(workdir / "tiny-dit", image_size=16)
            model = load_model(path, device=args.device, dtype=args.dtype)
            return Bench(model, str(path), "tiny DiT (CPU shape check)", _random_images(model), args.device, args.autocast)
        model = _dit_xl(args.device, args.dtype)
        return Bench(model, None, "DiT-XL/2-256 (random weights)", _random_images(model), args.device, args.autocast)
    if args.tiny:
        from cdi_ray.models.testing import make_tiny_pixel_ddpm

        path = make_tiny_pixel_ddpm(workdir / "tiny-pixel", image_size=16, channels=1)
        name = "tiny pixel DDPM"
    else:
        from cdi_ray.demo.bundle import demo_model_dir

        path = demo_model_dir(args.model)
        name = f"demo model '{args.model}'"
    model = load_model(path, device=args.device, dtype=args.dtype)
    return Bench(model, str(path), f"{name} ({sum(p.numel() for p in model.unet.parameters()) / 1e6:.2f} M params)",
                 _bundle_images, args.device, args.autocast)


def _bundle_images(n: int):
    """``n`` demo images (cycled if more than the bundle holds) as the demo models' input."""
    from cdi_ray.demo.bundle import load_bundle

    b = load_bundle()
    idx = np.arange(n) % len(b)
    return b.images_float(idx), None


def _random_images(model):
    def images(n: int):
        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (n, model.image_channels, model.image_size, model.image_size)).astype(np.float32)
        labels = (np.arange(n) % model.num_classes).tolist() if model.num_classes else None
        return x, labels
    return images


def _dit_xl(device: str, dtype):
    """DiT-XL/2-256 from config with random weights (no download)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    from cdi_ray.models.dit import DiT

    torch.manual_seed(0)
    with torch.device(device):
        transformer = DiTTransformer2DModel(**DIT_XL_2_256["transformer"])
        vae = AutoencoderKL(**DIT_XL_2_256["vae"])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    return DiT(transformer, vae, scheduler, device=device, dtype=dtype, missing_label="null")


def image_metas(n: int, labels, offset: int = 0):
    from cdi_ray.models.base import ImageMeta

    return [ImageMeta(content_hash=f"{offset + i:064x}", label=None if labels is None else int(labels[i]))
            for i in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def feature_config(preset: str, bench: Bench):
    from cdi_ray.features.config import FeatureConfig

    return FeatureConfig(features=preset, device=bench.device, autocast_dtype=bench.autocast)

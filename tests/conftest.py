"""Shared fixtures: tiny model directories of every family, built once per test session.

Each fixture returns the ``Path`` of a directory written by ``cdi_ray.models.testing``;
``cdi_ray.models.load_model(path)`` loads it. Tests must not modify these directories
(copy one with ``shutil.copytree`` first).
"""
from __future__ import annotations

import pytest
import torch

from cdi_ray.models import testing

# The tiny test models run ~100x faster on one intra-op thread than on an oversubscribed pool
# (a 16x16 conv: 0.5 ms vs 50 ms on a busy 2-core CI box); nothing in the suite needs more.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pixel_dir(tmp_path_factory):
    """Unconditional pixel DDPM, 1 channel, 16×16 (latent_shape (1, 16, 16)), DDPM schedule T=1000."""
    return testing.make_tiny_pixel_ddpm(tmp_path_factory.mktemp("models") / "pixel", image_size=16, channels=1)


@pytest.fixture(scope="session")
def tiny_pixel_class_dir(tmp_path_factory):
    """Class-conditional pixel DDPM, 3 channels, 16×16, 5 classes (labels 0..4, no null class)."""
    return testing.make_tiny_pixel_ddpm(tmp_path_factory.mktemp("models") / "pixel_class", image_size=16,
                                        channels=3, num_classes=5)


@pytest.fixture(scope="session")
def tiny_latent_kl_dir(tmp_path_factory):
    """Unconditional KL latent UNet: RGB 16×16 images → latent (4, 8, 8)."""
    return testing.make_tiny_latent_kl(tmp_path_factory.mktemp("models") / "latent_kl", image_size=16, channels=3)


@pytest.fixture(scope="session")
def tiny_latent_vq_dir(tmp_path_factory):
    """Unconditional VQ latent UNet (LDMPipeline layout): RGB 16×16 images → latent (3, 8, 8)."""
    return testing.make_tiny_latent_vq(tmp_path_factory.mktemp("models") / "latent_vq", image_size=16, channels=3)


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    """DiT, 10 classes (null class 10), learned sigma: RGB 16×16 images → latent (4, 8, 8)."""
    return testing.make_tiny_dit(tmp_path_factory.mktemp("models") / "dit", image_size=16, channels=3, num_classes=10)


@pytest.fixture(scope="session")
def tiny_t2i_dir(tmp_path_factory):
    """Stable-Diffusion layout (UNet2DConditionModel + VAE + CLIP text encoder/tokenizer, 8-token captions of
    width 32): RGB 16×16 images → latent (4, 8, 8)."""
    return testing.make_tiny_text2image(tmp_path_factory.mktemp("models") / "t2i", image_size=16)


@pytest.fixture(scope="session")
def tiny_uvit_class_dir(tmp_path_factory):
    """Class-conditional U-ViT, 11 label rows (classes 0..9, null class 10): RGB 16×16 → latent (4, 8, 8)."""
    return testing.make_tiny_uvit(tmp_path_factory.mktemp("models") / "uvit_class", "class", image_size=16)


@pytest.fixture(scope="session")
def tiny_uvit_text_dir(tmp_path_factory):
    """Text-conditional U-ViT (uvit_t2i, 8 CLIP tokens of width 32): RGB 16×16 → latent (4, 8, 8)."""
    return testing.make_tiny_uvit(tmp_path_factory.mktemp("models") / "uvit_text", "text", image_size=16)

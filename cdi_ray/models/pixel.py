"""Pixel-space DDPM: the model diffuses the image itself (``z = x``).

Directory layout (what ``DDPMPipeline.save_pretrained`` writes; ``model_index.json`` optional)::

    model_dir/
      unet/       config.json (UNet2DModel) + diffusion_pytorch_model.safetensors
      scheduler/  scheduler_config.json (DDPMScheduler, DDIMScheduler, … — the training ᾱ)

Conditioning: class labels through ``class_labels`` when the UNet has ``num_class_embeds``
(an ``nn.Embedding`` class table), nothing otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import _common as C
from .base import DiffusionModel, ImageMeta
from .fingerprint import model_fingerprint


class PixelDDPM(DiffusionModel):
    """A pixel-space ``UNet2DModel`` with its training schedule.

    Args:
        unet (`UNet2DModel`): the noise predictor; output channels C (ε) or 2C (ε, learned variance).
        scheduler (`SchedulerMixin`): any diffusers scheduler exposing the training ``alphas_cumprod``.
        device (`str` or `torch.device`, *optional*, defaults to ``"cpu"``).
        dtype (`torch.dtype`, *optional*, defaults to ``torch.float32``): weight dtype; ε̂ is returned as float32.
        missing_label (`str`, *optional*, defaults to ``"error"``): class models only — ``"error"`` refuses an
            image without a label, ``"null"`` gives it ``null_class``.
        null_class (`int`, *optional*): index of a "no class" embedding, if the model was trained with one.
        fingerprint (`str`, *optional*): set by :meth:`from_pretrained`.
    """

    family = "pixel-ddpm"
    layout = ("unet/ (UNet2DModel config.json + weights) + scheduler/ (scheduler_config.json, e.g. DDPMScheduler); "
              "no vae/, vqvae/ or transformer/")
    pipeline_classes = ("DDPMPipeline", "DDIMPipeline")
    options = ("missing_label", "null_class")

    def __init__(self, unet, scheduler, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 missing_label: C.MissingLabel = "error", null_class: int | None = None, fingerprint: str = "",
                 source: str = "<memory>"):
        cfg = unet.config
        if getattr(cfg, "class_embed_type", None) is not None:
            raise ValueError(f"UNet2DModel class_embed_type={cfg.class_embed_type!r} is not supported "
                             "(only the default class table, `num_class_embeds`)")
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = C.freeze(unet, self.device, dtype)
        self.alphas_cumprod, self.prediction_type = C.schedule_of(scheduler)
        self.image_size = C.square_size(cfg.sample_size, "unet", Path(source))
        self.image_channels = int(cfg.in_channels)
        self.latent_shape = (self.image_channels, self.image_size, self.image_size)
        self.num_classes = int(cfg.num_class_embeds) if cfg.num_class_embeds else None
        self.conditioning_kind = "class" if self.num_classes else "none"
        self.null_class = null_class
        if self.num_classes:
            C.check_missing_label(missing_label, null_class, self.num_classes)
        self.missing_label = missing_label
        self.fingerprint = fingerprint
        self.source = source

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def detect(cls, path: str | Path) -> bool:
        """A ``unet/`` folder (UNet2DModel, or no readable config yet) and no autoencoder/transformer."""
        root = Path(path)
        if C.pipeline_class(root) in cls.pipeline_classes:
            return True
        if not (root / "unet").is_dir() or any((root / d).is_dir() for d in ("vae", "vqvae", "transformer")):
            return False
        return C.config_class(root, "unet") in ("UNet2DModel", None)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **options: Any) -> "PixelDDPM":
        from diffusers import UNet2DModel

        root = Path(path)
        C.require_component(root, "unet", ("UNet2DModel",), layout=cls.layout)
        scheduler = C.load_scheduler(root, layout=cls.layout)
        unet = C.load_component(UNet2DModel, root, "unet", dtype=dtype, layout=cls.layout)
        C.check_out_channels(unet.config.out_channels, unet.config.in_channels, "unet", root)
        return C.construct(cls, root, unet, scheduler, device=device, dtype=dtype,
                           fingerprint=model_fingerprint(root), source=str(root), **options)

    # -- the interface -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Identity: ``z = x``. ``images`` ``(B, C, H, W)`` in [-1, 1]; returns a float32 copy on the model's
        device (a copy, so a feature editing ``z`` in place never edits the caller's images)."""
        C.check_images(images, self.image_channels, self.image_size)
        return images.detach().to(self.device, torch.float32, copy=True)

    def conditioning(self, metas: list[ImageMeta], generators: list[torch.Generator] | None = None) -> torch.Tensor | None:
        """LongTensor (B,) of class labels for a class-conditional UNet, else None."""
        if not self.num_classes:
            return None
        return C.class_labels(metas, num_classes=self.num_classes, missing_label=self.missing_label,
                              null_class=self.null_class, device=self.device)

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor | None) -> torch.Tensor:
        """ε̂ = f(z_t, t, cond), float32, shape of ``z_t``; differentiable w.r.t. ``z_t``."""
        C.check_latents(z_t, self.latent_shape)
        t = C.as_timesteps(t, z_t.shape[0], self.num_train_timesteps, self.device)
        if self.num_classes and cond is None:
            raise ValueError("this model is class-conditional: pass cond=model.conditioning(metas)")
        out = self.unet(z_t.to(self.device, self.dtype), t, class_labels=cond if self.num_classes else None).sample
        out = C.split_learned_variance(out, self.image_channels)
        return C.epsilon_from_output(out, z_t, t, self.alphas_cumprod, self.prediction_type)

"""Latent UNet (LDM style): a ``UNet2DModel`` diffusing the latent of an autoencoder.

Directory layout (``model_index.json`` optional, e.g. ``LDMPipeline``)::

    model_dir/
      unet/       config.json (UNet2DModel) + weights
      vae/        config.json (AutoencoderKL) + weights        ─┐ exactly one
      vqvae/      config.json (VQModel) + weights               ─┘
      scheduler/  scheduler_config.json (the training ᾱ)

The latent ``z = E(x)``:

* ``vae/`` (KL autoencoder): a posterior SAMPLE drawn with the per-image generators (the mean
  when ``generators=None``), then ``(z − shift_factor) · scaling_factor`` from the VAE config —
  what latent-diffusion training does.
* ``vqvae/`` (VQ autoencoder): the PRE-quantisation latent ``vqvae.encode(x).latents`` (encoder +
  ``quant_conv``; quantisation happens in ``decode``), deterministic, and by default NOT scaled:
  CompVis' VQ LDMs were trained with ``scale_factor = 1``, and diffusers' VQ configs carry the
  class default ``scaling_factor = 0.18215`` whether or not the model used it (diffusers'
  LDMPipeline divides by it since v0.22, which garbles ``CompVis/ldm-celebahq-256``, see
  huggingface/diffusers#6725). Pass ``vq_scaling="config"`` for a VQ model that really was
  trained on ``latents · scaling_factor``.

Conditioning: class labels via ``class_labels`` when the UNet has ``num_class_embeds``, else none.
The autoencoder always runs in float32 (it is called once per image; fp16 VAEs overflow);
``dtype`` applies to the UNet.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from . import _common as C
from .base import DiffusionModel, ImageMeta
from .fingerprint import model_fingerprint


class LatentUNet(DiffusionModel):
    """A ``UNet2DModel`` on the latent of an ``AutoencoderKL`` or a ``VQModel``.

    Args:
        unet (`UNet2DModel`): noise predictor in latent space (output C or 2C channels).
        autoencoder (`AutoencoderKL` or `VQModel`): the first stage ``E``.
        scheduler (`SchedulerMixin`): exposes the training ``alphas_cumprod``.
        device, dtype: as for :class:`~cdi_ray.models.pixel.PixelDDPM` (``dtype`` is the UNet's).
        missing_label (`str`, *optional*, defaults to ``"error"``): ``"error"`` or ``"null"`` (class models).
        null_class (`int`, *optional*): index of the model's "no class" embedding, if it has one.
        vq_scaling (`str`, *optional*, defaults to ``"none"``): VQ only — ``"none"`` (z = pre-quantisation
            latent) or ``"config"`` (× ``vqvae.config.scaling_factor``).
    """

    family = "latent-unet"
    layout = ("unet/ (UNet2DModel) + one of vae/ (AutoencoderKL) or vqvae/ (VQModel) "
              "+ scheduler/ (scheduler_config.json), each with config + weights")
    pipeline_classes = ("LDMPipeline",)
    options = ("missing_label", "null_class", "vq_scaling")

    def __init__(self, unet, autoencoder, scheduler, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, missing_label: C.MissingLabel = "error",
                 null_class: int | None = None, vq_scaling: Literal["none", "config"] = "none",
                 fingerprint: str = "", source: str = "<memory>"):
        from diffusers import AutoencoderKL, VQModel

        cfg = unet.config
        if getattr(cfg, "class_embed_type", None) is not None:
            raise ValueError(f"UNet2DModel class_embed_type={cfg.class_embed_type!r} is not supported "
                             "(only the default class table, `num_class_embeds`)")
        if vq_scaling not in ("none", "config"):
            raise ValueError(f"vq_scaling must be 'none' or 'config', got {vq_scaling!r}")
        if isinstance(autoencoder, AutoencoderKL):
            self.autoencoder_kind = "kl"
        elif isinstance(autoencoder, VQModel):
            self.autoencoder_kind = "vq"
        else:
            raise ValueError(f"autoencoder must be an AutoencoderKL or a VQModel, got {type(autoencoder).__name__}")
        ae_cfg = autoencoder.config
        latent_channels = int(ae_cfg.vq_embed_dim or ae_cfg.latent_channels) if self.autoencoder_kind == "vq" \
            else int(ae_cfg.latent_channels)
        if latent_channels != cfg.in_channels:
            raise ValueError(f"the autoencoder gives {latent_channels}-channel latents but the UNet takes "
                             f"in_channels={cfg.in_channels}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = C.freeze(unet, self.device, dtype)
        self.autoencoder = C.freeze(autoencoder, self.device, torch.float32)
        self.alphas_cumprod, self.prediction_type = C.schedule_of(scheduler)
        side = C.square_size(cfg.sample_size, "unet", Path(source))
        self.latent_shape = (int(cfg.in_channels), side, side)
        self.image_size = side * C.vae_factor(dict(ae_cfg))
        self.image_channels = int(ae_cfg.in_channels)
        self.vq_scaling = vq_scaling
        self.latent_scale = 1.0
        if self.autoencoder_kind == "vq" and vq_scaling == "config":
            self.latent_scale = float(ae_cfg.scaling_factor)
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
        """``unet/`` (UNet2DModel or no config yet) with ``vae/`` or ``vqvae/``, no ``transformer/``."""
        root = Path(path)
        if C.pipeline_class(root) in cls.pipeline_classes:
            return True
        if not (root / "unet").is_dir() or (root / "transformer").is_dir():
            return False
        if not ((root / "vae").is_dir() or (root / "vqvae").is_dir()):
            return False
        return C.config_class(root, "unet") in ("UNet2DModel", None)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **options: Any) -> "LatentUNet":
        from diffusers import AutoencoderKL, UNet2DModel, VQModel

        root = Path(path)
        has_kl, has_vq = (root / "vae").is_dir(), (root / "vqvae").is_dir()
        if has_kl and has_vq:
            raise C.load_error(root, "both vae/ and vqvae/ are present, so the latent space is ambiguous",
                               "keep only the autoencoder the UNet was trained on")
        if not (has_kl or has_vq):
            raise C.load_error(root, "missing subfolder 'vae/' (AutoencoderKL) or 'vqvae/' (VQModel)",
                               f"save the model's autoencoder there; this family's layout is {cls.layout}")
        C.require_component(root, "unet", ("UNet2DModel",), layout=cls.layout)
        sub, ae_cls = ("vae", AutoencoderKL) if has_kl else ("vqvae", VQModel)
        C.require_component(root, sub, (ae_cls.__name__,), layout=cls.layout)
        scheduler = C.load_scheduler(root, layout=cls.layout)
        unet = C.load_component(UNet2DModel, root, "unet", dtype=dtype, layout=cls.layout)
        autoencoder = C.load_component(ae_cls, root, sub, dtype=torch.float32, layout=cls.layout)
        C.check_out_channels(unet.config.out_channels, unet.config.in_channels, "unet", root)
        return C.construct(cls, root, unet, autoencoder, scheduler, device=device, dtype=dtype,
                           fingerprint=model_fingerprint(root), source=str(root), **options)

    # -- the interface -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [-1, 1] → ``z`` ``(B, *latent_shape)`` float32 (see the module docstring).

        KL: posterior sample from ``generators`` (one per image), the mean if None. VQ: deterministic,
        ``generators`` unused.
        """
        C.check_images(images, self.image_channels, self.image_size)
        if self.autoencoder_kind == "kl":
            return C.encode_kl(self.autoencoder, images, generators, self.device)
        C.check_generators(generators, images.shape[0])
        with torch.no_grad():
            h = self.autoencoder.encode(images.to(self.device, torch.float32)).latents
        return h.float() * self.latent_scale

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
        out = C.split_learned_variance(out, self.latent_shape[0])
        return C.epsilon_from_output(out, z_t, t, self.alphas_cumprod, self.prediction_type)

"""DiT (Peebles & Xie): a class-conditional transformer diffusing the latent of a KL autoencoder.

Directory layout (what ``DiTPipeline.save_pretrained`` writes; ``model_index.json`` optional)::

    model_dir/
      transformer/  config.json (DiTTransformer2DModel, or the legacy Transformer2DModel name
                    with norm_type="ada_norm_zero" used by facebook/DiT-*) + weights
      vae/          config.json (AutoencoderKL) + weights
      scheduler/    scheduler_config.json (the training ᾱ)

* ``z = (s − shift_factor)·scaling_factor`` with ``s`` a posterior sample drawn with the per-image
  generators (the mean when ``generators=None``), as for KL latent UNets.
* The transformer outputs 2C channels when it learned the variance (DiT-XL/2: 8 = 4 ε + 4 Σ);
  only the ε half is kept (METHOD.md, Step 1).
* Conditioning is the class label. DiT was trained with label dropout, so its class table has a
  "null" row at index ``num_embeds_ada_norm`` (1000 for ImageNet): load with
  ``missing_label="null"`` to evaluate unlabelled images unconditionally. ``model.null_class``.
* The VAE always runs in float32; ``dtype`` applies to the transformer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import _common as C
from .base import DiffusionModel, ImageMeta
from .fingerprint import model_fingerprint

TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


class DiT(DiffusionModel):
    """A ``DiTTransformer2DModel`` + ``AutoencoderKL`` + training schedule.

    Args:
        transformer (`DiTTransformer2DModel`): outputs C (ε) or 2C (ε, Σ) channels.
        vae (`AutoencoderKL`): the first stage ``E``.
        scheduler (`SchedulerMixin`): exposes the training ``alphas_cumprod``.
        device, dtype: as for :class:`~cdi_ray.models.pixel.PixelDDPM` (``dtype`` is the transformer's).
        missing_label (`str`, *optional*, defaults to ``"error"``): ``"null"`` gives unlabelled images
            the null class.
        id2label (`dict`, *optional*): class names (``model_index.json``'s ``id2label``), kept as ``class_names``.
    """

    family = "dit"
    layout = ("transformer/ (DiTTransformer2DModel) + vae/ (AutoencoderKL) + scheduler/ (scheduler_config.json), "
              "each with config + weights")
    pipeline_classes = ("DiTPipeline",)
    options = ("missing_label",)

    def __init__(self, transformer, vae, scheduler, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, missing_label: C.MissingLabel = "error",
                 id2label: dict | None = None, fingerprint: str = "", source: str = "<memory>"):
        cfg = transformer.config
        if int(vae.config.latent_channels) != int(cfg.in_channels):
            raise ValueError(f"the VAE gives {vae.config.latent_channels}-channel latents but the transformer takes "
                             f"in_channels={cfg.in_channels}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = C.freeze(transformer, self.device, dtype)
        self.vae = C.freeze(vae, self.device, torch.float32)
        self.alphas_cumprod, self.prediction_type = C.schedule_of(scheduler)
        side = C.square_size(cfg.sample_size, "transformer", Path(source))
        self.latent_shape = (int(cfg.in_channels), side, side)
        self.image_size = side * C.vae_factor(dict(vae.config))
        self.image_channels = int(vae.config.in_channels)
        self.num_classes = int(cfg.num_embeds_ada_norm)
        table = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        # The null row exists when the model was built with label dropout (always, for DiT).
        self.null_class = self.num_classes if table.num_embeddings > self.num_classes else None
        self.conditioning_kind = "class"
        C.check_missing_label(missing_label, self.null_class, table.num_embeddings)
        self.missing_label = missing_label
        self.class_names = {int(k): str(v) for k, v in (id2label or {}).items()}
        self.fingerprint = fingerprint
        self.source = source

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def detect(cls, path: str | Path) -> bool:
        """A ``transformer/`` folder whose config names a DiT (or no readable config yet)."""
        root = Path(path)
        if C.pipeline_class(root) in cls.pipeline_classes:
            return True
        if not (root / "transformer").is_dir():
            return False
        name = C.config_class(root, "transformer")
        if name == "Transformer2DModel":  # legacy name: only the ada_norm_zero (DiT) variant
            cfg = C.read_json(root / "transformer" / "config.json") or {}
            return cfg.get("norm_type") == "ada_norm_zero"
        return name in ("DiTTransformer2DModel", None)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **options: Any) -> "DiT":
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        root = Path(path)
        C.require_component(root, "transformer", TRANSFORMER_CLASSES, layout=cls.layout)
        C.require_component(root, "vae", ("AutoencoderKL",), layout=cls.layout)
        scheduler = C.load_scheduler(root, layout=cls.layout)
        transformer = C.load_component(DiTTransformer2DModel, root, "transformer", dtype=dtype, layout=cls.layout)
        vae = C.load_component(AutoencoderKL, root, "vae", dtype=torch.float32, layout=cls.layout)
        C.check_out_channels(transformer.config.out_channels or transformer.config.in_channels,
                             transformer.config.in_channels, "transformer", root)
        id2label = (C.read_json(root / "model_index.json") or {}).get("id2label")
        return C.construct(cls, root, transformer, vae, scheduler, device=device, dtype=dtype,
                           id2label=id2label if isinstance(id2label, dict) else None,
                           fingerprint=model_fingerprint(root), source=str(root), **options)

    # -- the interface -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [-1, 1] → ``z`` ``(B, *latent_shape)`` float32: posterior sample
        from ``generators`` (one per image), or the posterior mean if None; × ``vae.config.scaling_factor``."""
        C.check_images(images, self.image_channels, self.image_size)
        return C.encode_kl(self.vae, images, generators, self.device)

    def conditioning(self, metas: list[ImageMeta], generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """LongTensor (B,) of class labels (``null_class`` for unlabelled images if ``missing_label="null"``)."""
        return C.class_labels(metas, num_classes=self.num_classes, missing_label=self.missing_label,
                              null_class=self.null_class, device=self.device)

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """ε̂ = f(z_t, t, y): the ε half of the transformer output, float32; differentiable w.r.t. ``z_t``.

        ``cond`` is a LongTensor (B,) of labels in [0, num_classes] (``num_classes`` = the null class).
        """
        C.check_latents(z_t, self.latent_shape)
        t = C.as_timesteps(t, z_t.shape[0], self.num_train_timesteps, self.device)
        if cond is None:
            raise ValueError("DiT is class-conditional: pass cond=model.conditioning(metas) "
                             "(or a LongTensor filled with model.null_class for unconditional use)")
        out = self.transformer(z_t.to(self.device, self.dtype), timestep=t, class_labels=cond.to(self.device)).sample
        out = C.split_learned_variance(out, self.latent_shape[0])
        return C.epsilon_from_output(out, z_t, t, self.alphas_cumprod, self.prediction_type)

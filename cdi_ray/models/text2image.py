"""Text-to-image latent diffusion (Stable Diffusion 1.x/2.x style): caption-conditioned ``UNet2DConditionModel``.

Directory layout (what ``StableDiffusionPipeline.save_pretrained`` writes; ``model_index.json``
optional; ``safety_checker/`` and ``feature_extractor/`` are ignored)::

    model_dir/
      unet/          config.json (UNet2DConditionModel) + weights
      vae/           config.json (AutoencoderKL) + weights
      text_encoder/  config.json (transformers CLIPTextModel) + weights
      tokenizer/     CLIPTokenizer files (vocab.json + merges.txt, or tokenizer.json)
      scheduler/     scheduler_config.json (the training ᾱ; SD: scaled_linear 0.00085…0.012, T = 1000)

* ``z = (s − shift_factor)·scaling_factor``, ``s`` a posterior sample of the VAE drawn with the
  per-image generators (the mean when ``generators=None``), as for the other KL families.
* Conditioning: one caption per image (``ImageMeta.captions``; several → one chosen by the
  image's seed), embedded by the CLIP text encoder (``last_hidden_state``) and cached per caption
  (:mod:`cdi_ray.models.text`). An image without a caption is an error unless the model is
  loaded with ``missing_caption="empty"``.
* ε- and v-prediction (SD 2.x 768) schedulers are supported. SDXL (two text encoders, added
  time ids), inpainting UNets (9 input channels) and other extra conditioning are refused.

Memory (realistic sizes on a GPU worker): ``dtype`` (``float16``/``bfloat16``) applies to the UNet
and the text encoder; the VAE runs in float32 (fp16 SD VAEs overflow). ``attention_slicing``
(``"auto"``, ``"max"`` or a slice size, as ``enable_attention_slicing``) computes attention in
slices, and ``vae_slicing=True`` encodes a batch one image at a time; both trade speed for peak
memory and leave the features unchanged (up to float rounding). The batch size is the
manifest's ``batch_size``; ``FeatureConfig.max_micro_batch`` bounds the rows per UNet call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import _common as C
from . import text as T
from .base import DiffusionModel, ImageMeta
from .fingerprint import model_fingerprint

UNSUPPORTED_UNET = {
    "addition_embed_type": "extra conditioning (SDXL-style added text/time embeddings)",
    "class_embed_type": "a class/timestep embedding beside the text",
    "time_cond_proj_dim": "a guidance-scale embedding (LCM-distilled model)",
}


class TextToImage(DiffusionModel):
    """A ``UNet2DConditionModel`` on the latent of an ``AutoencoderKL``, conditioned on CLIP text embeddings.

    Args:
        unet (`UNet2DConditionModel`): ε- or v-prediction noise predictor.
        vae (`AutoencoderKL`): the first stage ``E``.
        text_encoder (`TextEncoder`): tokenizer + CLIP text encoder with the caption cache.
        scheduler (`SchedulerMixin`): exposes the training ``alphas_cumprod``.
        device, dtype: as for :class:`~cdi_ray.models.pixel.PixelDDPM` (``dtype`` is the UNet's).
        missing_caption (`str`, *optional*, defaults to ``"error"``): ``"empty"`` gives an image without a
            caption the empty prompt.
        attention_slicing (`str` or `int`, *optional*): ``"auto"``, ``"max"`` or a slice size.
        vae_slicing (`bool`, *optional*, defaults to False): encode one image at a time.
    """

    family = "text-to-image"
    layout = ("unet/ (UNet2DConditionModel) + vae/ (AutoencoderKL) + text_encoder/ (CLIPTextModel) + tokenizer/ "
              "(CLIPTokenizer) + scheduler/ (scheduler_config.json), as StableDiffusionPipeline.save_pretrained writes")
    pipeline_classes = ("StableDiffusionPipeline",)
    options = ("missing_caption", "caption_cache_size", "attention_slicing", "vae_slicing")

    def __init__(self, unet, vae, text_encoder: T.TextEncoder, scheduler, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, missing_caption: T.MissingCaption = "error",
                 attention_slicing: str | int | None = None, vae_slicing: bool = False,
                 fingerprint: str = "", source: str = "<memory>"):
        cfg = unet.config
        for key, what in UNSUPPORTED_UNET.items():
            if getattr(cfg, key, None) is not None:
                raise ValueError(f"the UNet has {key}={getattr(cfg, key)!r} ({what}), which this adapter does not supply")
        if int(vae.config.latent_channels) != int(cfg.in_channels):
            raise ValueError(f"the VAE gives {vae.config.latent_channels}-channel latents but the UNet takes "
                             f"in_channels={cfg.in_channels} (inpainting and depth UNets are not supported)")
        if int(cfg.cross_attention_dim) != text_encoder.hidden_size:
            raise ValueError(f"the UNet attends to {cfg.cross_attention_dim}-dim text embeddings but the text encoder "
                             f"gives {text_encoder.hidden_size}")
        T.check_missing_caption(missing_caption)
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = C.freeze(unet, self.device, dtype)
        self.vae = C.freeze(vae, self.device, torch.float32)
        self.text_encoder = text_encoder
        if attention_slicing is not None:
            self.unet.set_attention_slice(attention_slicing)
        if vae_slicing:
            self.vae.enable_slicing()
        self.alphas_cumprod, self.prediction_type = C.schedule_of(scheduler)
        side = C.square_size(cfg.sample_size, "unet", Path(source))
        self.latent_shape = (int(cfg.in_channels), side, side)
        self.image_size = side * C.vae_factor(dict(vae.config))
        self.image_channels = int(vae.config.in_channels)
        self.conditioning_kind = "text"
        self.missing_caption = missing_caption
        self.fingerprint = fingerprint
        self.source = source

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def detect(cls, path: str | Path) -> bool:
        """A ``unet/`` whose config names a UNet2DConditionModel, next to one ``text_encoder/`` (SDXL's second
        encoder, ``text_encoder_2/``, is not supported)."""
        root = Path(path)
        if C.pipeline_class(root) in cls.pipeline_classes:
            return True
        return ((root / "text_encoder").is_dir() and not (root / "text_encoder_2").is_dir()
                and C.config_class(root, "unet") == "UNet2DConditionModel")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        *, missing_caption: T.MissingCaption = "error", caption_cache_size: int = 1024,
                        **options: Any) -> "TextToImage":
        from diffusers import AutoencoderKL, UNet2DConditionModel

        root = Path(path)
        C.require_component(root, "unet", ("UNet2DConditionModel",), layout=cls.layout)
        C.require_component(root, "vae", ("AutoencoderKL",), layout=cls.layout)
        scheduler = C.load_scheduler(root, layout=cls.layout)
        unet = C.load_component(UNet2DConditionModel, root, "unet", dtype=dtype, layout=cls.layout)
        vae = C.load_component(AutoencoderKL, root, "vae", dtype=torch.float32, layout=cls.layout)
        device = torch.device(device)
        text_encoder = T.load_text_encoder(root, device=device, dtype=dtype, out_dtype=dtype,
                                           cache_size=caption_cache_size, layout=cls.layout)
        return C.construct(cls, root, unet, vae, text_encoder, scheduler, device=device, dtype=dtype,
                           missing_caption=missing_caption, fingerprint=model_fingerprint(root), source=str(root), **options)

    # -- the interface -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [-1, 1] → ``z`` ``(B, *latent_shape)`` float32 (posterior sample, or mean if
        ``generators`` is None, × ``vae.config.scaling_factor``)."""
        C.check_images(images, self.image_channels, self.image_size)
        return C.encode_kl(self.vae, images, generators, self.device)

    def conditioning(self, metas: list[ImageMeta], generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Text embeddings ``(B, L, D)`` of one caption per image (chosen with ``generators``)."""
        return self.text_encoder(T.choose_captions(metas, generators, self.missing_caption))

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """ε̂ = f(z_t, t, text), float32, shape of ``z_t``; differentiable w.r.t. ``z_t``."""
        C.check_latents(z_t, self.latent_shape)
        t = C.as_timesteps(t, z_t.shape[0], self.num_train_timesteps, self.device)
        if cond is None:
            raise ValueError("this model is text-conditional: pass cond=model.conditioning(metas)")
        out = self.unet(z_t.to(self.device, self.dtype), t, encoder_hidden_states=cond.to(self.device, self.dtype)).sample
        return C.epsilon_from_output(out, z_t, t, self.alphas_cumprod, self.prediction_type)

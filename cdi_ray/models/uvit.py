"""U-ViT (latent, "SD-discrete" schedule): class- or text-conditional, with a KL autoencoder in front.

Directory layout (the official release's files, arranged; no ``model_index.json``)::

    model_dir/
      uvit/          config.json — the official config's ``config.nnet`` values as JSON, e.g. ImageNet 256 huge:
                       {"name": "uvit", "img_size": 32, "patch_size": 2, "in_chans": 4, "embed_dim": 1152,
                        "depth": 28, "num_heads": 16, "mlp_ratio": 4, "qkv_bias": false,
                        "mlp_time_embed": false, "num_classes": 1001, "conv": false}
                     (MS-COCO: "name": "uvit_t2i", "embed_dim": 512, "depth": 12, "num_heads": 8,
                      "clip_dim": 768, "num_clip_token": 77), optionally "null_class" (see below)
                     + the weights in the official key layout: nnet_ema.pth (as released), nnet.pth,
                       or model.safetensors
      vae/           AutoencoderKL (diffusers) — the Stable Diffusion KL-f8 autoencoder U-ViT uses, with
                     ``scaling_factor`` set to the release's ``scale_factor`` (0.18215 by default;
                     0.23010 for the MS-COCO model)
      text_encoder/  CLIPTextModel (openai/clip-vit-large-patch14 for the MS-COCO model) ─┐ text variant
      tokenizer/     CLIPTokenizer                                                       ─┘ only

Schedule and timesteps. U-ViT's latent models train with the Stable Diffusion betas
``β_n = linspace(√0.00085, √0.012, 1000)[n−1]²`` on n ∈ {1, …, 1000}, and prepend ``β_0 = 0``,
i.e. ``ᾱ_0 = 1`` — n = 0 is the clean input, which the network never saw in training. Our
timestep ``t ∈ {0, …, 999}`` is U-ViT's ``n = t + 1``: ``alphas_cumprod[t]`` is U-ViT's
``ᾱ_{t+1}`` (identical to diffusers' ``scaled_linear`` SD schedule) and the network is called with
``n = t + 1``. So every feature — ML at t = 0 included — evaluates the network only where it was
trained, and U-ViT's ``ᾱ_0 = 1`` entry is never used.

Conditioning:

* ``"uvit"`` with ``num_classes > 0``: a class label. The official class-conditional releases
  (``num_classes = 1001`` for ImageNet) reserve the LAST row for "no class" (label dropout for
  classifier-free guidance), so by default ``null_class = num_classes − 1`` and valid labels are
  ``0 … num_classes − 2``. Set ``"null_class": null`` in ``uvit/config.json`` for a model
  trained without label dropout. ``missing_label="null"`` evaluates unlabelled images with it.
* ``"uvit_t2i"``: one caption per image, CLIP-embedded like the text-to-image family
  (:mod:`cdi_ray.models.text`); ``missing_caption="empty"`` uses the empty prompt (U-ViT's
  unconditional context is the empty caption's embedding too).
* ``"uvit"`` with ``num_classes <= 0``: unconditional.

The network predicts noise (``pred = 'noise_pred'``). The VAE and text encoder run once per image;
``dtype`` applies to the U-ViT network (the text encoder too), the VAE stays float32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import _common as C
from . import text as T
from .base import DiffusionModel, ImageMeta
from .fingerprint import model_fingerprint
from .uvit_net import UViTConfig, UViTNet

#: Weight files tried in ``uvit/``, in order (the release ships ``nnet_ema.pth``; EMA weights are the ones sampled with).
WEIGHT_FILES = ("model.safetensors", "nnet_ema.pth", "nnet.pth")
#: Keys of ``uvit/config.json`` that are ours, not the network's.
ADAPTER_KEYS = ("null_class", "pred")

SD_BETA_START, SD_BETA_END, SD_TIMESTEPS = 0.00085, 0.0120, 1000


def sd_discrete_alphas_cumprod(beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END,
                               steps: int = SD_TIMESTEPS) -> torch.Tensor:
    """U-ViT's ᾱ_1 … ᾱ_T (float64, length T), i.e. its schedule without the ᾱ_0 = 1 entry."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def read_uvit_config(root: Path, layout: str) -> tuple[UViTConfig, dict]:
    """(network config, adapter extras) from ``uvit/config.json``; ModelLoadError if absent or invalid."""
    cfg_file = root / "uvit" / "config.json"
    if not cfg_file.is_file():
        raise C.load_error(root, "missing 'uvit/config.json'",
                           f"write the official config's `config.nnet` values there as JSON; layout: {layout}")
    values = C.read_json(cfg_file)
    if values is None:
        raise C.load_error(root, "'uvit/config.json' is not a valid JSON object",
                           "write the official config's `config.nnet` values there as a JSON object")
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    extras = {k: values.pop(k) for k in ADAPTER_KEYS if k in values}
    try:
        return UViTConfig.from_dict(values), extras
    except (TypeError, ValueError) as exc:
        raise C.load_error(root, f"'uvit/config.json' is not a usable U-ViT config ({C.first_line(exc)})",
                           "copy the `config.nnet` values of the official config file the checkpoint was trained with") from None


def load_uvit_weights(net: UViTNet, root: Path) -> None:
    """Load the first of ``WEIGHT_FILES`` strictly: a missing, unexpected or wrong-shaped tensor is an error."""
    folder = root / "uvit"
    file = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if file is None:
        raise C.load_error(root, f"no weights in 'uvit/' (looked for {', '.join(WEIGHT_FILES)})",
                           "put the release's nnet_ema.pth there (a state dict in the official key layout)")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — torch / safetensors / pickle errors
        raise C.load_error(root, f"'uvit/{file.name}' does not load ({C.first_line(exc)})",
                           "use the checkpoint file as released (a state dict saved with torch.save)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise C.load_error(root, f"'uvit/{file.name}' is not a state dict of tensors",
                           "save `nnet.state_dict()` (the release's nnet_ema.pth is one)")
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[:3]})" for v, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                                    (wrong, "wrong-shaped")) if v]
        raise C.load_error(root, f"'uvit/{file.name}' does not match 'uvit/config.json': " + "; ".join(parts),
                           "use the config values the checkpoint was trained with (embed_dim, depth, num_heads, "
                           "patch_size, num_classes, mlp_time_embed, conv, clip_dim, num_clip_token)")
    net.load_state_dict(state, strict=True)


class UViT(DiffusionModel):
    """A U-ViT network + ``AutoencoderKL`` (+ CLIP text encoder for ``uvit_t2i``) on the SD-discrete schedule.

    Args:
        net (`UViTNet`): the noise predictor, weights loaded.
        vae (`AutoencoderKL`): the first stage ``E``.
        text_encoder (`TextEncoder`, *optional*): text variant only.
        device, dtype: as for :class:`~cdi_ray.models.pixel.PixelDDPM` (``dtype`` is the network's).
        null_class (`int` or `None` or `"last"`, *optional*, defaults to ``"last"``): class variant's "no class" row.
        missing_label (`str`, *optional*, defaults to ``"error"``): ``"null"`` gives unlabelled images the null class.
        missing_caption (`str`, *optional*, defaults to ``"error"``): ``"empty"`` gives uncaptioned images ``""``.
    """

    family = "uvit"
    layout = ("uvit/ (config.json = the official config's nnet values + nnet_ema.pth, nnet.pth or model.safetensors "
              "in the official key layout) + vae/ (AutoencoderKL, scaling_factor = the release's scale_factor) "
              "[+ text_encoder/ (CLIPTextModel) + tokenizer/ for uvit_t2i]")
    pipeline_classes = ()
    options = ("missing_label", "missing_caption", "caption_cache_size")

    def __init__(self, net: UViTNet, vae, text_encoder: T.TextEncoder | None = None, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 null_class: int | None | str = "last", missing_label: C.MissingLabel = "error",
                 missing_caption: T.MissingCaption = "error", fingerprint: str = "", source: str = "<memory>"):
        cfg = net.config
        if int(vae.config.latent_channels) != cfg.in_chans:
            raise ValueError(f"the VAE gives {vae.config.latent_channels}-channel latents but U-ViT takes "
                             f"in_chans={cfg.in_chans}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.net = C.freeze(net, self.device, dtype)
        self.vae = C.freeze(vae, self.device, torch.float32)
        self.alphas_cumprod = sd_discrete_alphas_cumprod()
        self.prediction_type = "epsilon"
        self.latent_shape = (cfg.in_chans, cfg.img_size, cfg.img_size)
        self.image_size = cfg.img_size * C.vae_factor(dict(vae.config))
        self.image_channels = int(vae.config.in_channels)
        self.text_encoder = None
        if cfg.text:
            if text_encoder is None:
                raise ValueError("a uvit_t2i model needs a text encoder")
            if (text_encoder.max_length, text_encoder.hidden_size) != (cfg.num_clip_token, cfg.clip_dim):
                raise ValueError(f"the text encoder gives {text_encoder.max_length} tokens of width "
                                 f"{text_encoder.hidden_size}, but U-ViT expects num_clip_token={cfg.num_clip_token}, "
                                 f"clip_dim={cfg.clip_dim}")
            T.check_missing_caption(missing_caption)
            self.text_encoder = text_encoder
            self.conditioning_kind = "text"
        elif cfg.num_classes > 0:
            if null_class == "last":
                null_class = cfg.num_classes - 1
            self.null_class = None if null_class is None else int(null_class)
            # labels below the null row (the release's layout: the null row is the last one)
            self.num_classes = self.null_class if self.null_class == cfg.num_classes - 1 else cfg.num_classes
            C.check_missing_label(missing_label, self.null_class, cfg.num_classes)
            self.conditioning_kind = "class"
        else:
            self.conditioning_kind = "none"
        self.missing_label = missing_label
        self.missing_caption = missing_caption
        self.fingerprint = fingerprint
        self.source = source

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def detect(cls, path: str | Path) -> bool:
        """A ``uvit/`` folder whose config names a U-ViT variant (or has no readable config yet)."""
        root = Path(path)
        if not (root / "uvit").is_dir():
            return False
        cfg = C.read_json(root / "uvit" / "config.json")
        return cfg is None or cfg.get("name") in ("uvit", "uvit_t2i")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        *, caption_cache_size: int = 1024, **options: Any) -> "UViT":
        from diffusers import AutoencoderKL

        root = Path(path)
        config, extras = read_uvit_config(root, cls.layout)
        if extras.get("pred", "noise_pred") != "noise_pred":
            raise C.load_error(root, f"'uvit/config.json' has pred={extras['pred']!r}; only noise prediction is supported",
                               "use a noise-prediction (pred='noise_pred') U-ViT")
        C.require_component(root, "vae", ("AutoencoderKL",), layout=cls.layout)
        vae = C.load_component(AutoencoderKL, root, "vae", dtype=torch.float32, layout=cls.layout)
        net = UViTNet(config)
        load_uvit_weights(net, root)
        device = torch.device(device)
        text_encoder = None
        if config.text:
            text_encoder = T.load_text_encoder(root, device=device, dtype=dtype, out_dtype=dtype,
                                               cache_size=caption_cache_size, layout=cls.layout)
        return C.construct(cls, root, net, vae, text_encoder, device=device, dtype=dtype,
                           null_class=extras.get("null_class", "last"), fingerprint=model_fingerprint(root), source=str(root), **options)

    # -- the interface -------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [-1, 1] → ``z`` (posterior sample from ``generators``, the mean if None,
        × ``vae.config.scaling_factor`` — U-ViT's ``autoencoder.sample`` × scale_factor)."""
        C.check_images(images, self.image_channels, self.image_size)
        return C.encode_kl(self.vae, images, generators, self.device)

    def conditioning(self, metas: list[ImageMeta], generators: list[torch.Generator] | None = None) -> torch.Tensor | None:
        """Text embeddings ``(B, L, D)``, class labels ``(B,)``, or None (unconditional)."""
        if self.conditioning_kind == "text":
            return self.text_encoder(T.choose_captions(metas, generators, self.missing_caption))
        if self.conditioning_kind == "class":
            return C.class_labels(metas, num_classes=self.num_classes, missing_label=self.missing_label,
                                  null_class=self.null_class, device=self.device)
        return None

    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: Any) -> torch.Tensor:
        """ε̂ = net(z_t, n = t + 1, cond), float32, shape of ``z_t``; differentiable w.r.t. ``z_t``."""
        C.check_latents(z_t, self.latent_shape)
        t = C.as_timesteps(t, z_t.shape[0], self.num_train_timesteps, self.device)
        if self.conditioning_kind != "none" and cond is None:
            raise ValueError(f"this U-ViT is {self.conditioning_kind}-conditional: pass cond=model.conditioning(metas)")
        x = z_t.to(self.device, self.dtype)
        if self.conditioning_kind == "text":
            out = self.net(x, t + 1, context=cond.to(self.device, self.dtype))
        else:
            out = self.net(x, t + 1, y=cond.to(self.device) if cond is not None else None)
        return out.float()

"""Build tiny, randomly initialised models of every family and save them as directories.

For tests, smoke runs and demos: each builder constructs the components from configs (no hub,
no download), initialises them deterministically from ``seed`` (inside ``torch.random.fork_rng``,
so global RNG state is untouched), saves them with ``save_pretrained`` in the family's layout
and returns the directory. The same arguments give byte-identical files, hence the same
``model_fingerprint``. Each model loads and runs a batch in well under a second on CPU.

    >>> from cdi_ray.models.testing import make_tiny_dit
    >>> from cdi_ray.models import load_model
    >>> model = load_model(make_tiny_dit(tmp_path / "dit"))
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

# Schedule used by the CDI papers' models (DDPM linear betas, T = 1000): features use t up to 900.
TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


@contextmanager
def _seeded(seed: int):
    """Deterministic parameter init without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _write_model_index(root: Path, pipeline: str, components: dict[str, tuple[str, str]], **extra) -> None:
    import diffusers

    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    index.update({k: list(v) for k, v in components.items()})
    index.update(extra)
    (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _tiny_unet(*, sample_size: int, channels: int, num_classes: int | None, out_channels: int | None = None):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=out_channels or channels,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_classes,
    )


def _tiny_kl(*, image_size: int, channels: int, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),  # two levels: the latent is image_size // 2
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=image_size,
    )


def _ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                         beta_schedule="linear")


def _ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END,
                         beta_schedule="linear", clip_sample=False)


def make_tiny_pixel_ddpm(dir: str | Path, image_size: int = 16, channels: int = 1, num_classes: int | None = None,
                         seed: int = 0, *, learned_variance: bool = False) -> Path:
    """A pixel DDPM: ``unet/`` (UNet2DModel, 2 levels of 16/32 channels) + ``scheduler/`` (DDPM) + model_index.json.

    ``num_classes`` makes it class-conditional (``num_class_embeds``); ``learned_variance`` doubles the output
    channels (ε, variance) like improved-DDPM models. ``image_size`` must be even.
    """
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        unet = _tiny_unet(sample_size=image_size, channels=channels, num_classes=num_classes,
                          out_channels=2 * channels if learned_variance else channels)
    unet.save_pretrained(root / "unet")
    _ddpm_scheduler().save_pretrained(root / "scheduler")
    _write_model_index(root, "DDPMPipeline", {"unet": ("diffusers", "UNet2DModel"),
                                              "scheduler": ("diffusers", "DDPMScheduler")})
    return root


def make_tiny_latent_kl(dir: str | Path, image_size: int = 16, channels: int = 3, num_classes: int | None = None,
                        seed: int = 0, *, latent_channels: int = 4, scaling_factor: float = 0.5) -> Path:
    """A KL latent UNet: ``unet/`` + ``vae/`` (AutoencoderKL, ×2 downsampling) + ``scheduler/`` (DDPM).

    No ``model_index.json`` (diffusers has no pipeline class for it): detection goes by the subfolders.
    The latent is ``(latent_channels, image_size // 2, image_size // 2)``.
    """
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        vae = _tiny_kl(image_size=image_size, channels=channels, latent_channels=latent_channels)
        vae.register_to_config(scaling_factor=scaling_factor)
        unet = _tiny_unet(sample_size=image_size // 2, channels=latent_channels, num_classes=num_classes)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    _ddpm_scheduler().save_pretrained(root / "scheduler")
    return root


def make_tiny_latent_vq(dir: str | Path, image_size: int = 16, channels: int = 3, num_classes: int | None = None,
                        seed: int = 0, *, latent_channels: int = 3, num_vq_embeddings: int = 16) -> Path:
    """A VQ latent UNet like ``CompVis/ldm-celebahq-256``: ``unet/`` + ``vqvae/`` (VQModel) + ``scheduler/`` (DDIM)
    + model_index.json (LDMPipeline). The latent is ``(latent_channels, image_size // 2, image_size // 2)``."""
    from diffusers import VQModel

    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        vqvae = VQModel(
            in_channels=channels,
            out_channels=channels,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=latent_channels,
            num_vq_embeddings=num_vq_embeddings,
            norm_num_groups=8,
            sample_size=image_size,
        )
        unet = _tiny_unet(sample_size=image_size // 2, channels=latent_channels, num_classes=num_classes)
    unet.save_pretrained(root / "unet")
    vqvae.save_pretrained(root / "vqvae")
    _ddim_scheduler().save_pretrained(root / "scheduler")
    _write_model_index(root, "LDMPipeline", {"unet": ("diffusers", "UNet2DModel"), "vqvae": ("diffusers", "VQModel"),
                                             "scheduler": ("diffusers", "DDIMScheduler")})
    return root


def make_tiny_dit(dir: str | Path, image_size: int = 16, channels: int = 3, num_classes: int = 10, seed: int = 0,
                  *, learned_sigma: bool = True, latent_channels: int = 4) -> Path:
    """A DiT: ``transformer/`` (DiTTransformer2DModel, 2 layers, width 16, patch 2) + ``vae/`` (AutoencoderKL)
    + ``scheduler/`` (DDIM) + model_index.json (DiTPipeline with ``id2label``).

    ``learned_sigma`` (default, like DiT-XL/2) makes the transformer output 2·latent_channels channels.
    The null class is ``num_classes``.
    """
    from diffusers import DiTTransformer2DModel

    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        vae = _tiny_kl(image_size=image_size, channels=channels, latent_channels=latent_channels)
        transformer = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=latent_channels,
            out_channels=2 * latent_channels if learned_sigma else latent_channels,
            num_layers=2,
            sample_size=image_size // 2,
            patch_size=2,
            num_embeds_ada_norm=num_classes,
        )
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    _ddim_scheduler().save_pretrained(root / "scheduler")
    _write_model_index(root, "DiTPipeline", {"transformer": ("diffusers", "DiTTransformer2DModel"),
                                             "vae": ("diffusers", "AutoencoderKL"),
                                             "scheduler": ("diffusers", "DDIMScheduler")},
                       id2label={str(i): f"class_{i}" for i in range(num_classes)})
    return root


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE (GPT-2, CLIP) uses for the bytes 0…255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _write_tiny_clip(root: Path, *, max_length: int, hidden_size: int) -> None:
    """``tokenizer/`` (a byte-level CLIP BPE over single characters, no merges: every text tokenizes) and
    ``text_encoder/`` (a 2-layer CLIPTextModel) — offline, no vocabulary download."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    alphabet = _byte_level_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length).save_pretrained(root / "tokenizer")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(config).save_pretrained(root / "text_encoder")


def _sd_scheduler():
    """SD's training schedule (``scaled_linear`` 0.00085…0.012, T = 1000), as SD pipelines save it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False)


def make_tiny_text2image(dir: str | Path, image_size: int = 16, seed: int = 0, *, max_length: int = 8,
                         text_width: int = 32) -> Path:
    """A Stable-Diffusion-layout model: ``unet/`` (UNet2DConditionModel, cross-attention to the text) + ``vae/``
    + ``text_encoder/`` + ``tokenizer/`` (captions padded to ``max_length`` tokens) + ``scheduler/`` (SD's
    scaled-linear DDIM) + model_index.json (StableDiffusionPipeline). RGB images → latent (4, size/2, size/2)."""
    from diffusers import UNet2DConditionModel

    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    with _seeded(seed):
        vae = _tiny_kl(image_size=image_size, channels=3)
        vae.register_to_config(scaling_factor=0.5)
        unet = UNet2DConditionModel(
            sample_size=image_size // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1, norm_num_groups=8, attention_head_dim=8, cross_attention_dim=text_width,
        )
        _write_tiny_clip(root, max_length=max_length, hidden_size=text_width)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    _sd_scheduler().save_pretrained(root / "scheduler")
    _write_model_index(root, "StableDiffusionPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
        "scheduler": ("diffusers", "DDIMScheduler")})
    return root


def tiny_uvit_config(conditioning: str = "class", *, latent_size: int = 8, num_classes: int = 11,
                     max_length: int = 8, text_width: int = 32) -> dict:
    """The ``config.nnet`` values of a tiny U-ViT (depth 4: 2 in-blocks, mid, 2 out-blocks; width 16; patch 2)."""
    cfg = {"name": "uvit_t2i" if conditioning == "text" else "uvit", "img_size": latent_size, "patch_size": 2,
           "in_chans": 4, "embed_dim": 16, "depth": 4, "num_heads": 2, "mlp_ratio": 4, "qkv_bias": False,
           "mlp_time_embed": False, "conv": True}
    if conditioning == "text":
        cfg.update(clip_dim=text_width, num_clip_token=max_length)
    else:
        cfg["num_classes"] = num_classes if conditioning == "class" else -1
    return cfg


def make_tiny_uvit(dir: str | Path, conditioning: str = "class", image_size: int = 16, seed: int = 0, *,
                   num_classes: int = 11, max_length: int = 8, text_width: int = 32) -> Path:
    """A U-ViT in the release's layout: ``uvit/`` (config.json + model.safetensors in the official key layout)
    + ``vae/`` [+ ``text_encoder/`` + ``tokenizer/`` for ``conditioning="text"``].

    ``conditioning``: ``"class"`` (``num_classes`` rows, the last one the null class), ``"text"`` or ``"none"``.
    """
    from safetensors.torch import save_file

    from .uvit_net import UViTConfig, UViTNet

    root = Path(dir)
    (root / "uvit").mkdir(parents=True, exist_ok=True)
    cfg = tiny_uvit_config(conditioning, latent_size=image_size // 2, num_classes=num_classes,
                           max_length=max_length, text_width=text_width)
    with _seeded(seed):
        vae = _tiny_kl(image_size=image_size, channels=3)
        vae.register_to_config(scaling_factor=0.5)
        net = UViTNet(UViTConfig.from_dict(cfg))
        if conditioning == "text":
            _write_tiny_clip(root, max_length=max_length, hidden_size=text_width)
    (root / "uvit" / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, root / "uvit" / "model.safetensors")
    vae.save_pretrained(root / "vae")
    return root


def make_sd15_shaped(dir: str | Path, seed: int = 0, *, dtype: torch.dtype = torch.float16,
                     device: str = "cpu") -> Path:
    """A text-to-image model with Stable Diffusion 1.5's component sizes (860M-parameter UNet, KL-f8 VAE,
    CLIP ViT-L/14 text encoder, 77 tokens) and random weights, saved in ``dtype`` — for memory and speed
    checks at realistic size on a GPU worker (the tokenizer is the tiny offline one; its vocabulary size
    does not matter for cost). Building it takes seconds on a GPU, minutes on CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    with _seeded(seed), torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the SD 1.x defaults otherwise
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512, scaling_factor=0.18215)
        _write_tiny_clip(root, max_length=77, hidden_size=32)  # tokenizer/ (replaced text encoder below)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            bos_token_id=512, eos_token_id=513, pad_token_id=513))
    unet.to(dtype).save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text.to(dtype).save_pretrained(root / "text_encoder")
    _sd_scheduler().save_pretrained(root / "scheduler")
    return root

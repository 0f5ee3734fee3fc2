"""The U-ViT network (Bao et al., "All are Worth Words", CVPR 2023), written to load the official
release's checkpoints (github.com/baofff/U-ViT, ``libs/uvit.py`` and ``libs/uvit_t2i.py``).

A ViT over latent patches where time, class label or text tokens are extra tokens, with long skip
connections from the first half of the blocks to the second half::

    tokens = [label | time, patches]          (class-conditional; [time, patches] unconditional)
             [time, text × num_clip_token, patches]   (text-conditional, "uvit_t2i")
    + pos_embed  (one row per token, the extra tokens included)
    in_blocks (depth // 2) → mid_block → out_blocks (depth // 2, each fusing a skip with skip_linear)
    → norm → decoder_pred (per-patch pixels) → drop extra tokens → unpatchify → final_layer (3×3 conv)

State-dict keys follow the official module names, so ``nnet_ema.pth`` loads as is::

    patch_embed.proj.{weight,bias}          pos_embed           time_embed.{0,2}.*  (mlp_time_embed only)
    label_emb.weight  (num_classes > 0)     context_embed.*     (text variant)
    in_blocks.N / mid_block / out_blocks.N . {norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*
    out_blocks.N.skip_linear.*              norm.*   decoder_pred.*   final_layer.*  (conv=True only)

:class:`UViTConfig` holds the values of the official config's ``config.nnet`` block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

NAMES = ("uvit", "uvit_t2i")


@dataclass(frozen=True)
class UViTConfig:
    """The official ``config.nnet`` values (``configs/*.py``); ``name`` picks the variant.

    ``num_classes`` counts the rows of the label table (ImageNet releases: 1001 = 1000 classes + the
    "no class" label used for classifier-free guidance); ``clip_dim``/``num_clip_token`` are the text
    variant's context width and length (77 CLIP tokens of width 768 for MS-COCO).
    """

    name: str = "uvit"
    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 4
    embed_dim: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    qk_scale: float | None = None
    mlp_time_embed: bool = False
    num_classes: int = -1
    use_checkpoint: bool = False  # training-time memory option; no effect here
    conv: bool = True
    skip: bool = True
    clip_dim: int = 768
    num_clip_token: int = 77

    @classmethod
    def from_dict(cls, values: dict) -> "UViTConfig":
        """From the official ``nnet`` dict; unknown keys and impossible values are a ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown U-ViT config key(s) {unknown}; valid keys: {sorted(known)}")
        cfg = cls(**values)
        if cfg.name not in NAMES:
            raise ValueError(f"U-ViT config name must be one of {list(NAMES)}, got {cfg.name!r}")
        if cfg.qk_scale is not None:
            raise ValueError("qk_scale other than None (head_dim ** -0.5) is not supported")
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size={cfg.img_size} is not a multiple of patch_size={cfg.patch_size}")
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim={cfg.embed_dim} is not a multiple of num_heads={cfg.num_heads}")
        return cfg

    @property
    def text(self) -> bool:
        return self.name == "uvit_t2i"

    @property
    def num_extras(self) -> int:
        """Tokens before the patches (each has a row in ``pos_embed``)."""
        if self.text:
            return 1 + self.num_clip_token
        return 2 if self.num_classes > 0 else 1

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(t·ω_k), sin(t·ω_k)]`` with ω_k = max_period^(−k/half), k < half (the official order: cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` packs (q, k, v) × heads × head_dim along its output."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, head_dim), scale head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; with ``skip`` it first fuses a long-skip input: Linear([x, skip])."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, patches, dim), row-major patch order


class UViTNet(nn.Module):
    """U-ViT noise predictor ``ε̂ = net(x_n, n, y | context)`` with the official parameter names.

    ``timesteps`` are the official discrete indices n ∈ {1, …, 1000} (n = 0 is the clean input,
    never trained on). Class variant: ``y`` LongTensor (B,); text variant: ``context`` (B, num_clip_token, clip_dim).
    """

    def __init__(self, config: UViTConfig):
        super().__init__()
        c = self.config = config
        D = c.embed_dim
        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, D)
        self.time_embed = nn.Sequential(nn.Linear(D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D)) if c.mlp_time_embed \
            else nn.Identity()
        if c.text:
            self.context_embed = nn.Linear(c.clip_dim, D)
        elif c.num_classes > 0:
            self.label_emb = nn.Embedding(c.num_classes, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_extras + c.num_patches, D))
        block = dict(dim=D, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias)
        self.in_blocks = nn.ModuleList([Block(**block) for _ in range(c.depth // 2)])
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList([Block(**block, skip=c.skip) for _ in range(c.depth // 2)])
        self.norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, c.patch_size ** 2 * c.in_chans)
        self.final_layer = nn.Conv2d(c.in_chans, c.in_chans, 3, padding=1) if c.conv else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """Random init for tests (real use loads a checkpoint): small normal weights, zero biases, unit norms."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h·w, p·p·C) with per-patch order (row, column, channel) → (B, C, h·p, w·p)."""
        c = self.config
        B, p, side = x.shape[0], c.patch_size, c.img_size // c.patch_size
        x = x.reshape(B, side, side, p, p, c.in_chans)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, c.in_chans, side * p, side * p)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        c = self.config
        tokens = self.patch_embed(x)
        time = self.time_embed(sinusoidal_embedding(timesteps, c.embed_dim).to(tokens.dtype)).unsqueeze(1)
        if c.text:
            if context is None:
                raise ValueError("the text-conditional U-ViT needs a context (B, num_clip_token, clip_dim)")
            extras = [time, self.context_embed(context)]
        elif c.num_classes > 0 and y is not None:
            extras = [self.label_emb(y).unsqueeze(1), time]
        else:
            extras = [time]
        h = torch.cat(extras + [tokens], dim=1)
        if h.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"U-ViT got {h.shape[1]} tokens but pos_embed has {self.pos_embed.shape[1]} rows "
                             "(a class model called without labels, or a context of the wrong length)")
        h = h + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        for blk in self.out_blocks:
            h = blk(h, skips.pop())
        h = self.decoder_pred(self.norm(h))[:, c.num_extras:]
        return self.final_layer(self.unpatchify(h))

"""Gradient Masking (GM) — METHOD.md features 4–13 (new in CDI).

For each t in 0, 100, …, 900, with **one** ε per image shared over t (the ``"multi_t"`` stream,
the same ε as Multiple Loss):

1. z_t = sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε;   g = |∂‖f(z_t, t) − ε‖ / ∂z_t|           (fwd+bwd)
2. M  = the top ``top_fraction`` (20%) elements of g per image, over C·H·W
   (k = int(C·H·W·top_fraction), ``torch.topk``);
3. corrupt, ``corruption="authors_code"`` (default, authors' ``gradient_masking.py``):
       ẑ = z with ẑ[M] = ε[M]  (the *clean* latent),    r = ε − z
   ``corruption="paper"`` (the paper's text):
       ẑ = ε·M + z_t·¬M,                              r = ε − z_t
4. gm_t = ‖(r − f(ẑ, t))[M]‖   (plain L2 over the masked elements; f at the same t, no
   further noising)                                                              (fwd)

Shared work: the forward value of step 1's gradient pass is exactly ML's ‖f(z_t,t)−ε‖ at t
(memoised ``NoisedKey("multi_t", 0, t)`` with its gradient), so ML is free when GM runs. All
timesteps of step 1 go through one batched forward+backward and all of step 4 through one
batched forward (chunked by ``max_micro_batch``).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from cdi_ray.features.base import Feature, FeatureParams, Passes, Request
from cdi_ray.features.context import EvalContext, NoisedKey
from cdi_ray.features.ml import DEFAULT_TIMESTEPS, check_timesteps


class GradientMaskingConfig(FeatureParams):
    timesteps: tuple[int, ...] = Field(DEFAULT_TIMESTEPS, description="t of each GM feature")
    top_fraction: float = Field(0.2, gt=0, le=1, description="fraction of C·H·W elements masked (authors' masking_ratio)")
    corruption: Literal["authors_code", "paper"] = Field(
        "authors_code", description="ẑ and residual as in the authors' code (default) or the paper's text"
    )
    stream: str = Field("multi_t", min_length=1, description="noise stream shared with ML")

    _check = field_validator("timesteps")(check_timesteps)


def top_mask(g: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask (B, C, H, W) of the k = int(C·H·W·fraction) largest |g| per image."""
    flat = g.abs().flatten(1)
    k = int(flat.shape[1] * fraction)
    if k < 1:
        raise ValueError(f"top_fraction={fraction} masks no element of a latent with {flat.shape[1]} elements")
    idx = torch.topk(flat, k=k, dim=1).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.reshape(g.shape)


class GradientMasking(Feature):
    name = "gm"
    needs_gradients = True
    Config = GradientMaskingConfig

    @property
    def columns(self) -> list[str]:
        return [f"gm_t{t}" for t in self.config.timesteps]

    def max_timestep(self) -> int:
        return max(self.config.timesteps)

    def keys(self) -> list[NoisedKey]:
        return [NoisedKey(self.config.stream, 0, t) for t in self.config.timesteps]

    def shared_requests(self) -> list[Request]:
        return [Request(k, grad=True) for k in self.keys()]

    def private_passes(self) -> Passes:
        return Passes(forward=len(self.config.timesteps))

    def compute(self, ctx: EvalContext):
        c = self.config
        eps = ctx.noise(c.stream, 0)
        z_hats, residuals, masks = [], [], []
        for key in self.keys():
            # 1.–2. gradient of the denoising loss at t, top-k mask per image
            mask = top_mask(ctx.get(key, grad=True).grad, c.top_fraction)
            # 3. corrupt the masked elements with the noise
            if c.corruption == "authors_code":
                base = ctx.z
            else:
                base = ctx.noised(key)
            z_hats.append(torch.where(mask, eps, base))
            residuals.append(eps - base)
            masks.append(mask)
        # 4. predict on all corrupted latents in one batched call
        ts = torch.cat([torch.full((ctx.B,), k.t, dtype=torch.long) for k in self.keys()])
        index = torch.arange(ctx.B, device=ctx.device).repeat(len(self.keys()))
        preds = ctx.forward(torch.cat(z_hats), ts, index).split(ctx.B)
        out = {}
        for key, r, pred, mask in zip(self.keys(), residuals, preds, masks):
            diff = torch.where(mask, r - pred, torch.zeros_like(pred))
            out[f"gm_t{key.t}"] = torch.linalg.vector_norm(diff.flatten(1), ord=2, dim=1)
        return out

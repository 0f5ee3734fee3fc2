"""SecMI (statistical variant) — METHOD.md feature 1 (Duan et al., ICML 2023, arXiv 2302.01316).

Notation: ``Φ(z, s → s')`` is one deterministic DDIM step from timestep s to s',

    ε̂ = f(z, s);   ẑ_0 = (z − sqrt(1-ᾱ_s)·ε̂) / sqrt(ᾱ_s);   Φ = sqrt(ᾱ_s')·ẑ_0 + sqrt(1-ᾱ_s')·ε̂

(the same formula inverts (s < s') and denoises (s > s')). Authors' ``secmi.py`` with
``t0: 0, t: 100, step: 10``:

1. z_det  = DDIM inversion of the clean latent (taken as the state at t0 = 0) through
   t0, t0+k, …, t (10 steps for the defaults; one f each);
2. z_step = Φ(Φ(z_det, t → t+k), t+k → t) (2 more f);
3. secmi  = ‖z_det − z_step‖ (plain L2 over C·H·W).  Lower is member.

12 forwards per image, sequential by nature. Shared work: the first inversion step evaluates f on
the clean latent at t0, ``CleanKey(t0)`` — for the defaults f(z, 0), the ε0 of PIA/PIAN — so with
PIA in the preset SecMI adds 11 forwards.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from cdi_ray.features.base import Feature, FeatureParams, Passes, Request, l2
from cdi_ray.features.context import CleanKey, EvalContext


class SecMIConfig(FeatureParams):
    t0: int = Field(0, ge=0, description="timestep the clean latent is taken to sit at")
    t: int = Field(100, ge=1, description="timestep the inversion reaches")
    step: int = Field(10, ge=1, description="DDIM stride k")

    @model_validator(mode="after")
    def _check(self):
        if self.t <= self.t0 or (self.t - self.t0) % self.step:
            raise ValueError(f"SecMI needs t > t0 and (t - t0) a multiple of step; got t0={self.t0}, t={self.t}, step={self.step}")
        return self


def ddim_step(ctx: EvalContext, z: torch.Tensor, s: int, s_next: int, eps: torch.Tensor | None = None) -> torch.Tensor:
    """One deterministic DDIM step Φ(z, s → s_next) (one forward per image, none when ``eps`` = f(z, s) is given)."""
    a_s, a_n = ctx.abar(s), ctx.abar(s_next)
    if eps is None:
        eps = ctx.forward(z, s)
    z0 = (z - math.sqrt(1.0 - a_s) * eps) / math.sqrt(a_s)
    return math.sqrt(a_n) * z0 + math.sqrt(1.0 - a_n) * eps


class SecMI(Feature):
    name = "secmi"
    Config = SecMIConfig

    @property
    def columns(self) -> list[str]:
        return ["secmi"]

    def max_timestep(self) -> int:
        return self.config.t + self.config.step

    def shared_requests(self) -> list[Request]:
        return [Request(CleanKey(self.config.t0))]

    def private_passes(self) -> Passes:
        c = self.config
        n = (c.t - c.t0) // c.step + 2
        return Passes(forward=n - 1)  # the first step's f(z, t0) is the shared CleanKey(t0)

    def compute(self, ctx: EvalContext):
        c = self.config
        # 1. deterministic inversion t0 → t; f(z, t0) of the first step is the shared clean evaluation
        z_det = ddim_step(ctx, ctx.z, c.t0, c.t0 + c.step, eps=ctx.get(CleanKey(c.t0)).pred)
        for s in range(c.t0 + c.step, c.t, c.step):
            z_det = ddim_step(ctx, z_det, s, s + c.step)
        # 2. one step forward and back
        z_step = ddim_step(ctx, z_det, c.t, c.t + c.step)
        z_step = ddim_step(ctx, z_step, c.t + c.step, c.t)
        # 3. distance
        return {"secmi": l2(z_det - z_step)}

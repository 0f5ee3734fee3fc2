"""Noise Optimisation (NO) — METHOD.md features 24–25 (new in CDI).

    ε from the ``"no"`` stream;  z_t = sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε,  t = 100
    δ* ≈ argmin_δ φ(δ),  φ(δ) = ‖f(z_t + δ, t) − ε‖,  L-BFGS from δ = 0, 5 iterations
    no_loss = φ(δ*),   no_delta_norm = ‖δ*‖

**Deviation from the authors' code, on purpose (METHOD.md):** they run one scipy L-BFGS-B over the
whole batch on the batch-mean loss, so an image's δ* depends on its batch-mates. Here every image
has its own L-BFGS (own history, two-loop recursion, strong-Wolfe line search, stopping; see
``lbfgs.py``); all images' trial points of a round are still evaluated in one batched
forward+backward. With a batch of one, the authors' problem and ours coincide up to the line
search (scipy uses Moré–Thuente; we use Nocedal–Wright's zoom with the same c1, c2).

**Final loss.** METHOD.md defines ``no_loss`` as the final loss, φ(δ*): the value the optimiser
reached (``final_loss="at_optimum"``, default; no extra pass, it is the line search's last
accepted value). The authors' code instead evaluates ``predict_noise_from_latent(z_t + δ*, …,
noise)``, which *noises z_t + δ* a second time* before predicting:
‖f(sqrt(ᾱ_t)·(z_t+δ*) + sqrt(1-ᾱ_t)·ε, t) − ε‖. That is available as
``final_loss="authors_renoised"`` (one more forward).

Passes per image: 1 + Σ line-search evaluations fwd+bwd — at least 1 + ``max_iter`` when
every first trial step is accepted (6 for the defaults), at most 1 + ``max_iter·max_ls``.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from cdi_ray.features.base import Feature, FeatureParams, Passes, l2
from cdi_ray.features.context import EvalContext
from cdi_ray.features.lbfgs import lbfgs_batched


class NoiseOptimisationConfig(FeatureParams):
    timestep: int = Field(100, ge=0, description="t of the noised latent")
    max_iter: int = Field(5, ge=1, description="L-BFGS iterations (authors: scipy maxiter=5)")
    history_size: int = Field(10, ge=1, description="L-BFGS memory (scipy's default m=10)")
    max_ls: int = Field(20, ge=1, description="most evaluations per line search (scipy: 20)")
    c1: float = Field(1e-3, gt=0, lt=1, description="sufficient-decrease constant (scipy ftol)")
    c2: float = Field(0.9, gt=0, lt=1, description="curvature constant (scipy gtol)")
    tolerance_grad: float = Field(1e-5, ge=0, description="stop when max|∇φ| is at most this (scipy pgtol)")
    tolerance_change: float = Field(2.220446049250313e-09, ge=0, description="relative-decrease stop (scipy factr·eps)")
    final_loss: Literal["at_optimum", "authors_renoised"] = Field(
        "at_optimum", description="φ(δ*) (METHOD.md) or the authors' doubly-noised evaluation"
    )
    stream: str = Field("no", min_length=1)


class NoiseOptimisation(Feature):
    name = "no"
    needs_gradients = True
    Config = NoiseOptimisationConfig

    @property
    def columns(self) -> list[str]:
        return ["no_loss", "no_delta_norm"]

    def max_timestep(self) -> int:
        return self.config.timestep

    def private_passes(self) -> Passes:
        c = self.config
        return Passes(
            forward=1 if c.final_loss == "authors_renoised" else 0,
            forward_backward=1 + c.max_iter,
            forward_backward_max=1 + c.max_iter * c.max_ls,
        )

    def compute(self, ctx: EvalContext):
        c = self.config
        eps = ctx.noise(c.stream, 0)
        z_t = ctx.q_sample(ctx.z, c.timestep, eps)

        def value_and_grad(index: torch.Tensor, delta: torch.Tensor):
            idx = index.to(ctx.device)
            loss, grad, _ = ctx.value_and_grad(z_t[idx] + delta, c.timestep, eps[idx], idx)
            return loss, grad

        results = lbfgs_batched(
            torch.zeros_like(z_t),
            value_and_grad,
            max_iter=c.max_iter, history_size=c.history_size, max_ls=c.max_ls, c1=c.c1, c2=c.c2,
            tolerance_grad=c.tolerance_grad, tolerance_change=c.tolerance_change,
        )
        delta = torch.stack([r.x for r in results]).reshape(z_t.shape)
        if c.final_loss == "at_optimum":
            loss = torch.tensor([r.f for r in results], dtype=torch.float32, device=ctx.device)
        else:
            renoised = ctx.q_sample(z_t + delta, c.timestep, eps)
            loss = l2(ctx.forward(renoised, c.timestep) - eps)
        return {"no_loss": loss, "no_delta_norm": l2(delta)}


"""Denoising Loss at several timesteps (DLM) — DL where the membership signal lives.

    dlm_t = (1/n) Σ_k ‖f(z_t^(k), t) − ε_k‖,   z_t^(k) = sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε_k,   k < n

for every t in ``timesteps``: DL (METHOD.md feature 0) taken at several timesteps instead of one,
each averaged over ``n_draws`` independent ε. Not in the paper: measured on the demo models
(docs/DEMO_DATA.md, ``jobs/feature_signal.py``), a per-image loss varies mostly with the image
(how hard it is to denoise), not with ε, so more draws at one t help little, while losses at
several small t carry partly different evidence and their differences calibrate out part of the
image's difficulty.

Noise: draw k of the ``"dl"`` stream at every t (so ``dlm_t100`` with ``n_draws=n`` is DL with
``share_first_draw=False`` and ``n_draws=n``; shared with DL's own draws 1…n-1 when both run).
"""
from __future__ import annotations

from pydantic import Field, field_validator

from cdi_ray.features.base import Feature, FeatureParams, Request
from cdi_ray.features.context import EvalContext, NoisedKey
from cdi_ray.features.ml import check_timesteps


class MultiTimestepLossConfig(FeatureParams):
    timesteps: tuple[int, ...] = Field((50, 100, 150, 200), description="t of each column")
    n_draws: int = Field(4, ge=1, description="independent ε per image and timestep")
    stream: str = Field("dl", min_length=1)

    _check = field_validator("timesteps")(check_timesteps)


class MultiTimestepLoss(Feature):
    name = "dlm"
    Config = MultiTimestepLossConfig

    @property
    def columns(self) -> list[str]:
        return [f"dlm_t{t}" for t in self.config.timesteps]

    def max_timestep(self) -> int:
        return max(self.config.timesteps)

    def keys(self, t: int) -> list[NoisedKey]:
        return [NoisedKey(self.config.stream, k, t) for k in range(self.config.n_draws)]

    def shared_requests(self) -> list[Request]:
        return [Request(k) for t in self.config.timesteps for k in self.keys(t)]

    def compute(self, ctx: EvalContext):
        out = {}
        for t in self.config.timesteps:
            losses = [ctx.loss(k) for k in self.keys(t)]
            out[f"dlm_t{t}"] = sum(losses) / len(losses)
        return out

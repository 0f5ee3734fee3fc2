"""Denoising Loss (DL) — METHOD.md feature 0 (Carlini et al. 2023 / Matsumoto et al. 2023).

    DL = (1/n) Σ_k ‖f(z_t^(k), t) − ε_k‖,   z_t^(k) = sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε_k,   t = 100, n = 5

with n independent ε per image (authors: ``n_repetitions: 5``, ``timestep: 100``; the per-draw
losses are averaged in their score computation).

Shared work: by default draw 0 is the ε of the ``"multi_t"`` stream, the one ML and GM use over
all their timesteps, so with ML/GM in the preset DL's first draw at t=100 *is* their t=100
evaluation and costs nothing. This does not bias DL: that ε is a standard normal independent of
DL's other draws (``"dl"`` stream, draws 1…n-1), so DL is still the mean of n i.i.d. draws.
It makes ``dl`` and ``ml_t100`` share one of DL's five terms (they are correlated columns; the
scorer sees both). Because the draw definitions never depend on the preset, DL has the same
value whether or not ML runs. ``share_first_draw=False`` takes all n draws from ``"dl"``.
"""
from __future__ import annotations

from pydantic import Field

from cdi_ray.features.base import Feature, FeatureParams, Request
from cdi_ray.features.context import EvalContext, NoisedKey


class DenoisingLossConfig(FeatureParams):
    timestep: int = Field(100, ge=0, description="t of the noised latent")
    n_draws: int = Field(5, ge=1, description="independent ε per image")
    share_first_draw: bool = Field(True, description="draw 0 = the shared 'multi_t' ε of ML/GM")
    stream: str = Field("dl", min_length=1)
    shared_stream: str = Field("multi_t", min_length=1)


class DenoisingLoss(Feature):
    name = "dl"
    Config = DenoisingLossConfig

    @property
    def columns(self) -> list[str]:
        return ["dl"]

    def max_timestep(self) -> int:
        return self.config.timestep

    def keys(self) -> list[NoisedKey]:
        c = self.config
        keys = [NoisedKey(c.shared_stream, 0, c.timestep)] if c.share_first_draw else [NoisedKey(c.stream, 0, c.timestep)]
        keys += [NoisedKey(c.stream, k, c.timestep) for k in range(1, c.n_draws)]
        return keys

    def shared_requests(self) -> list[Request]:
        return [Request(k) for k in self.keys()]

    def compute(self, ctx: EvalContext):
        # mean over the n draws of ‖f(z_t, t) − ε‖
        losses = [ctx.loss(k) for k in self.keys()]
        return {"dl": sum(losses) / len(losses)}

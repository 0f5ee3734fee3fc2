"""Multiple Loss (ML) — METHOD.md features 14–23.

    ml_t = ‖f(z_t, t) − ε‖,   z_t = sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε,   t = 0, 100, …, 900

with **one** ε per image shared over all t (authors' ``multiple_loss.py`` draws one ``noise``
before the timestep loop; their ``n_repetitions`` setting is unused).

Shared work: ε is draw 0 of the ``"multi_t"`` stream, the same as Gradient Masking's, so in the
white-box preset every ``ml_t`` is the forward value of GM's gradient pass at t and ML adds no
pass of its own. The ten timesteps run as one batched call (chunked by ``max_micro_batch``).
"""
from __future__ import annotations

from pydantic import Field, field_validator

from cdi_ray.features.base import Feature, FeatureParams, Request
from cdi_ray.features.context import EvalContext, NoisedKey

DEFAULT_TIMESTEPS = tuple(range(0, 1000, 100))


def check_timesteps(v: tuple[int, ...]) -> tuple[int, ...]:
    if len(v) == 0:
        raise ValueError("timesteps must not be empty")
    if len(set(v)) != len(v):
        raise ValueError(f"timesteps must be distinct, got {list(v)}")
    if min(v) < 0:
        raise ValueError(f"timesteps must be >= 0, got {list(v)}")
    return tuple(int(t) for t in v)


class MultipleLossConfig(FeatureParams):
    timesteps: tuple[int, ...] = Field(DEFAULT_TIMESTEPS, description="t at which the loss is taken")
    stream: str = Field("multi_t", min_length=1, description="noise stream shared with GM")

    _check = field_validator("timesteps")(check_timesteps)


class MultipleLoss(Feature):
    name = "ml"
    Config = MultipleLossConfig

    @property
    def columns(self) -> list[str]:
        return [f"ml_t{t}" for t in self.config.timesteps]

    def max_timestep(self) -> int:
        return max(self.config.timesteps)

    def keys(self) -> list[NoisedKey]:
        return [NoisedKey(self.config.stream, 0, t) for t in self.config.timesteps]

    def shared_requests(self) -> list[Request]:
        return [Request(k) for k in self.keys()]

    def compute(self, ctx: EvalContext):
        return {f"ml_t{k.t}": ctx.loss(k) for k in self.keys()}

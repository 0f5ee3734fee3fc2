"""What every feature family has in common, and nothing more.

A feature family is a class with

* ``name`` — its registry name (``"dl"``, ``"gm"``, …);
* ``Config`` — a frozen pydantic model (``extra="forbid"``) holding every hyper-parameter,
  defaults from METHOD.md's table;
* ``columns`` — the ordered column names it produces;
* ``shared_requests()`` — the *first-level* evaluations of f it needs that other features may
  need too (``NoisedKey``/``CleanKey``, see ``context.py``); the extractor computes their union
  once, batched across keys, before any feature runs;
* ``private_passes()`` — the passes it makes on its own, per image;
* ``compute(ctx) -> dict[str, Tensor of shape (B,)]``.

Deliberately shallow (STYLE.md "For cdi-ray" 8): no template methods; each module reads on its
own like the method.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    from cdi_ray.features.context import EvalContext, EvalKey


class FeatureParams(BaseModel):
    """Base of every feature's config: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Passes:
    """Passes of f per image. ``forward_backward`` may vary per image (L-BFGS line search):
    ``forward_backward`` is the least possible count, ``forward_backward_max`` the most."""

    forward: int = 0
    forward_backward: int = 0
    forward_backward_max: int = 0

    def __add__(self, other: "Passes") -> "Passes":
        return Passes(
            self.forward + other.forward,
            self.forward_backward + other.forward_backward,
            self.forward_backward_max + other.forward_backward_max,
        )


@dataclass(frozen=True)
class Request:
    """A shared first-level evaluation: ``key``, with ∂‖f−ε‖/∂z_t when ``grad``."""

    key: "EvalKey"
    grad: bool = False


class Feature(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[FeatureParams]]
    needs_gradients: ClassVar[bool] = False  # white-box only (GM, NO)

    def __init__(self, config: FeatureParams | None = None):
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(self.config).__name__}")

    @property
    @abstractmethod
    def columns(self) -> list[str]:
        """Ordered output column names."""

    def max_timestep(self) -> int:
        """Largest t this feature evaluates f at (checked against the model's schedule)."""
        return 0

    def shared_requests(self) -> list[Request]:
        return []

    def private_passes(self) -> Passes:
        return Passes()

    @abstractmethod
    def compute(self, ctx: "EvalContext") -> dict[str, torch.Tensor]:
        """Feature values, one ``(B,)`` float tensor per column."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def l2(x: torch.Tensor) -> torch.Tensor:
    """Per-image plain L2 norm over all but the batch dimension (METHOD: ``torch.norm``)."""
    return torch.linalg.vector_norm(x.flatten(1).float(), ord=2, dim=1)

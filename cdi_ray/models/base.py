"""The one interface every model family implements.

Notation (METHOD.md): ``x`` image in [-1, 1]; ``z = E(x)`` the space the model
diffuses in (``z = x`` for pixel models); ``z_t = sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε``;
``f(z_t, t, cond)`` the noise prediction (ε half only for learned-variance models).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch

ConditioningKind = Literal["none", "class", "text"]


@dataclass(frozen=True)
class ImageMeta:
    """What travels with an image besides its pixels."""

    content_hash: str
    label: int | None = None          # class index in the model's label space
    captions: tuple[str, ...] = ()    # one is chosen per image by its seed


class ModelLoadError(ValueError):
    """A model directory is missing, malformed, or of an unknown family."""


class DiffusionModel(ABC):
    """A loaded diffusion model seen through what CDI needs.

    Attributes:
        family (`str`): registry name of the adapter, e.g. ``"pixel-ddpm"``.
        fingerprint (`str`): sha256 over the directory's config and weight files.
        image_size (`int`): resolution images are preprocessed to.
        image_channels (`int`): channels of the preprocessed image (1 or 3).
        latent_shape (`tuple[int, int, int]`): ``(C, H, W)`` of ``z``.
        alphas_cumprod (`Tensor` of shape (T,)): the training schedule's ᾱ_t, float64 on CPU.
        conditioning_kind (`str`): ``"none"``, ``"class"`` or ``"text"``.
        device (`torch.device`).
        num_classes (`int` or `None`): size of the label space of class-conditional models
            (valid labels ``0 … num_classes-1``), else None.
        null_class (`int` or `None`): the "no class" label (DiT: ``num_classes``), if the model has one.
        source (`str`): where the model was loaded from (for messages).
    """

    family: str
    fingerprint: str
    image_size: int
    image_channels: int
    latent_shape: tuple[int, int, int]
    alphas_cumprod: torch.Tensor
    conditioning_kind: ConditioningKind
    device: torch.device
    dtype: torch.dtype = torch.float32
    num_classes: int | None = None
    null_class: int | None = None
    source: str = "<memory>"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: torch.Tensor | int) -> torch.Tensor:
        """ᾱ_t as float32 on the model's device, shaped to broadcast over (B, C, H, W)."""
        t = torch.as_tensor(t, device="cpu").long()
        return self.alphas_cumprod[t].to(self.device, torch.float32).reshape(-1, 1, 1, 1)

    @abstractmethod
    def encode(self, images: torch.Tensor, generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Images ``(B, C, H, W)`` in [-1, 1] → ``z`` ``(B, *latent_shape)``.

        Latent encoders sample the posterior with ``generators`` (one per image);
        ``generators=None`` takes the posterior mean.
        """

    @abstractmethod
    def conditioning(self, metas: list[ImageMeta], generators: list[torch.Generator] | None = None) -> Any:
        """Conditioning for a batch (``None`` for unconditional models)."""

    @abstractmethod
    def predict_noise(self, z_t: torch.Tensor, t: torch.Tensor | int, cond: Any) -> torch.Tensor:
        """``f(z_t, t, cond)`` → ε̂ with the shape of ``z_t``; differentiable w.r.t. ``z_t``."""

    def meta_problem(self, meta: ImageMeta) -> str | None:
        """Why this image cannot be conditioned on (no class label, a label out of range, no caption), or None.

        Lets a caller turn one badly described image into an error row instead of failing its whole batch.
        Checks exactly what :meth:`conditioning` would refuse, without running any network.
        """
        from . import _common as C
        from . import text as T

        try:
            if self.conditioning_kind == "class":
                C.class_labels([meta], num_classes=self.num_classes, missing_label=getattr(self, "missing_label", "error"),
                               null_class=self.null_class, device=torch.device("cpu"))
            elif self.conditioning_kind == "text":
                T.choose_captions([meta], None, getattr(self, "missing_caption", "error"))
        except ValueError as exc:
            return str(exc)
        return None

    def select(self, cond: Any, index: torch.Tensor | slice) -> Any:
        """The conditioning of a subset of the batch (used when features split a batch)."""
        if cond is None:
            return None
        if isinstance(cond, torch.Tensor):
            return cond[index]
        raise NotImplementedError(f"{type(self).__name__} must implement select() for {type(cond).__name__}")

"""Feature families by name, and the presets of METHOD.md.

``white-box`` (26 columns): dl, secmi, pia, pian, gm_t0…gm_t900, ml_t0…ml_t900, no_loss,
no_delta_norm. ``gray-box`` (14 columns): dl, secmi, pia, pian, ml_t0…ml_t900 — forward
evaluations of f only (no GM, no NO).
"""
from __future__ import annotations

from cdi_ray.features.base import Feature
from cdi_ray.features.dl import DenoisingLoss
from cdi_ray.features.gm import GradientMasking
from cdi_ray.features.ml import MultipleLoss
from cdi_ray.features.no import NoiseOptimisation
from cdi_ray.features.pia import PIA, PIAN
from cdi_ray.features.secmi import SecMI

FEATURES: dict[str, type[Feature]] = {
    cls.name: cls for cls in (DenoisingLoss, SecMI, PIA, PIAN, GradientMasking, MultipleLoss, NoiseOptimisation)
}

PRESETS: dict[str, tuple[str, ...]] = {
    "white-box": ("dl", "secmi", "pia", "pian", "gm", "ml", "no"),
    "gray-box": ("dl", "secmi", "pia", "pian", "ml"),
}


def get_feature_class(name: str) -> type[Feature]:
    """The feature family registered as ``name``; ``KeyError`` listing the valid names otherwise."""
    try:
        return FEATURES[name]
    except KeyError:
        raise KeyError(f"unknown feature {name!r}; valid features: {', '.join(FEATURES)}") from None


def resolve_preset(name: str) -> tuple[str, ...]:
    """Feature names of preset ``name``; ``KeyError`` listing the valid presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown feature preset {name!r}; valid presets: {', '.join(PRESETS)}") from None

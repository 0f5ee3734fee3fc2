"""Feature families by name, and the presets.

The paper's presets (METHOD.md), unchanged: ``white-box`` (26 columns): dl, secmi, pia, pian,
gm_t0…gm_t900, ml_t0…ml_t900, no_loss, no_delta_norm. ``gray-box`` (14 columns): dl, secmi, pia,
pian, ml_t0…ml_t900 — forward evaluations of f only (no GM, no NO).

``efficient`` (46 columns, 28 forward passes per image like ``gray-box``, no gradients):
piam_t{10,20,30,40,50,75,100}_p{2,3,4,5,6,8} and dlm_t{50,75,100,150} — PIA and the denoising
loss where the membership signal of the demo models lives (small t); see :data:`PRESET_SETTINGS`.

A preset is a list of families plus, optionally, settings for them (:data:`PRESET_SETTINGS`,
applied under the user's ``overrides``), so a preset and the equivalent explicit list with
overrides are the same configuration (same ``config_hash``).
"""
from __future__ import annotations

from cdi_ray.features.base import Feature
from cdi_ray.features.dl import DenoisingLoss
from cdi_ray.features.dlm import MultiTimestepLoss
from cdi_ray.features.gm import GradientMasking
from cdi_ray.features.ml import MultipleLoss
from cdi_ray.features.no import NoiseOptimisation
from cdi_ray.features.pia import PIA, PIAN, PIAMulti
from cdi_ray.features.secmi import SecMI

FEATURES: dict[str, type[Feature]] = {
    cls.name: cls for cls in (DenoisingLoss, SecMI, PIA, PIAN, GradientMasking, MultipleLoss, NoiseOptimisation,
                              MultiTimestepLoss, PIAMulti)
}

PRESETS: dict[str, tuple[str, ...]] = {
    "white-box": ("dl", "secmi", "pia", "pian", "gm", "ml", "no"),
    "gray-box": ("dl", "secmi", "pia", "pian", "ml"),
    "efficient": ("piam", "dlm"),
}
#: Settings a preset gives its families (under the user's overrides); the paper's presets use the defaults.
#: ``efficient``: forward passes only, 28 per image (the gray-box budget) — PIA at t = 10–100 with
#: norm orders 2–8 (8 passes) and the denoising loss at t = 50, 75, 100, 150 with 5 draws each
#: (20 passes); chosen by the smallest |P| with mean p < 0.01 on the tuning half of the demo
#: ``hard`` model among 13 candidates within the budget (docs/DEMO_DATA.md, jobs/feature_signal.py).
PRESET_SETTINGS: dict[str, dict[str, dict]] = {
    "efficient": {
        "piam": {"timesteps": (10, 20, 30, 40, 50, 75, 100), "orders": (2.0, 3.0, 4.0, 5.0, 6.0, 8.0)},
        "dlm": {"timesteps": (50, 75, 100, 150), "n_draws": 5},
    },
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

"""``FeatureConfig``: which features, their hyper-parameters, the seed, where to run.

    FeatureConfig()                                             # white-box, METHOD.md defaults
    FeatureConfig(features="gray-box", seed=7)
    FeatureConfig(features=("dl", "pia"), overrides={"pia": {"p": 2}})

``config_hash()`` is the sha256 of canonical JSON (sorted keys, no spaces) of everything that
changes feature *values*: the resolved feature list with every feature's full config (defaults
filled in, so a preset and the equivalent explicit list hash alike), the seed, the encoder mode,
the autocast dtype and ``allow_tf32``. Execution details that change values only by float
rounding — ``device`` (all noise is drawn on CPU generators) and the micro-batch sizes — are left
out, so rows computed on CPU and GPU share a feature store.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cdi_ray.features.base import Feature, Passes
from cdi_ray.features.registry import FEATURES, PRESET_SETTINGS, PRESETS, get_feature_class, resolve_preset

HASH_SCHEMA = 1  # bump when a feature's definition changes without a config change

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class FeatureConfig(BaseModel):
    """Feature-extraction settings (frozen; unknown keys rejected).

    Args:
        features (`str` or `tuple[str, ...]`, *optional*, defaults to ``"white-box"``): a preset
            name (``"white-box"``, ``"gray-box"``) or an explicit list of feature names
            (``dl secmi pia pian gm ml no``), computed and ordered as listed.
        overrides (`dict[str, dict]`, *optional*): per-feature hyper-parameters, e.g.
            ``{"gm": {"top_fraction": 0.1}, "no": {"max_iter": 10}}``; validated against the
            feature's config and stored without the values equal to the defaults.
        seed (`int`, *optional*, defaults to 0): audit seed; every random draw derives from it and
            the image's content hash.
        device (`str`, *optional*, defaults to ``"cpu"``): torch device.
        autocast_dtype (`str`, *optional*): ``"bfloat16"`` or ``"float16"`` to run f under autocast.
        encode (`str`, *optional*, defaults to ``"sample"``): latent encoders sample the posterior
            (``"sample"``, METHOD.md) or take its mean (``"mean"``).
        max_micro_batch (`int`, *optional*, defaults to 256): most rows per forward call of f
            (timesteps and noise draws are concatenated along the batch axis up to this size).
        max_micro_batch_grad (`int`, *optional*, defaults to 64): most rows per forward+backward call
            (these keep activations for the backward pass: lower it for large models).
        allow_tf32 (`bool`, *optional*, defaults to `False`): let CUDA convolutions and matmuls use
            TF32. Off by default: TF32 rounds to ~1e-3 and makes values depend more on which
            kernel a batch size selects; cuDNN autotuning (``benchmark``) is also off while
            features run, so a kernel is chosen by shape alone.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: str | tuple[str, ...] = "white-box"
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seed: int = 0
    device: str = "cpu"
    autocast_dtype: Literal["bfloat16", "float16"] | None = None
    encode: Literal["sample", "mean"] = "sample"
    max_micro_batch: int = Field(256, ge=1)
    max_micro_batch_grad: int = Field(64, ge=1)
    allow_tf32: bool = False

    @field_validator("features")
    @classmethod
    def _check_features(cls, v):
        if isinstance(v, str):
            if v not in PRESETS:
                raise ValueError(f"unknown feature preset {v!r}; valid presets: {', '.join(PRESETS)} "
                                 f"(or give a list of features from: {', '.join(FEATURES)})")
            return v
        v = tuple(v)
        if not v:
            raise ValueError("features must name at least one feature")
        unknown = [n for n in v if n not in FEATURES]
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}; valid features: {', '.join(FEATURES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"features must not repeat a name, got {list(v)}")
        return v

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, v):
        out = {}
        for name, params in v.items():
            if name not in FEATURES:
                raise ValueError(f"overrides for unknown feature {name!r}; valid features: {', '.join(FEATURES)}")
            try:
                conf = FEATURES[name].Config.model_validate(params)
            except ValidationError as exc:
                raise ValueError(f"invalid overrides for feature {name!r}: {exc}") from None
            out[name] = conf.model_dump(mode="json", exclude_defaults=True)
        return dict(sorted(out.items()))

    @field_validator("autocast_dtype", mode="before")
    @classmethod
    def _alias_dtype(cls, v):
        # the loader's dtype spellings; float32 means no autocast
        aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "float32": None, "fp32": None}
        if isinstance(v, torch.dtype):
            v = str(v).removeprefix("torch.")
        return aliases.get(v, v) if isinstance(v, str) else v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v):
        try:
            torch.device(v)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {v!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {exc}") from None
        return v

    @model_validator(mode="after")
    def _check_overrides_used(self):
        extra = sorted(set(self.overrides) - set(self.feature_names))
        if extra:
            raise ValueError(f"overrides for {extra}, which are not among the features computed {list(self.feature_names)}")
        return self

    # ------------------------------------------------------------------ resolution
    @property
    def feature_names(self) -> tuple[str, ...]:
        return resolve_preset(self.features) if isinstance(self.features, str) else self.features

    def feature_config(self, name: str):
        """The full (defaults filled in) config of feature ``name``: the preset's settings, then the overrides."""
        preset = PRESET_SETTINGS.get(self.features, {}) if isinstance(self.features, str) else {}
        return get_feature_class(name).Config.model_validate({**preset.get(name, {}), **self.overrides.get(name, {})})

    def build_features(self) -> list[Feature]:
        return [get_feature_class(n)(self.feature_config(n)) for n in self.feature_names]

    @property
    def columns(self) -> list[str]:
        return [c for f in self.build_features() for c in f.columns]

    @property
    def needs_gradients(self) -> bool:
        return any(get_feature_class(n).needs_gradients for n in self.feature_names)

    @property
    def torch_autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES[self.autocast_dtype] if self.autocast_dtype else None

    # ------------------------------------------------------------------ identity
    def canonical(self) -> dict[str, Any]:
        """Everything that changes feature values, resolved (see the module docstring)."""
        return {
            "schema": HASH_SCHEMA,
            "features": [{"name": n, "config": self.feature_config(n).model_dump(mode="json")} for n in self.feature_names],
            "seed": self.seed,
            "encode": self.encode,
            "autocast_dtype": self.autocast_dtype,
            "allow_tf32": self.allow_tf32,
        }

    def config_hash(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()

    # ------------------------------------------------------------------ cost
    def passes_per_image(self) -> dict[str, int]:
        """Passes of f per image: ``forward``, ``forward_backward`` (least; NO's line search may add
        more) and ``forward_backward_max``. Shared evaluations are counted once."""
        return count_passes(self.build_features())


def passes_per_image(features: str | tuple[str, ...] = "white-box", **overrides: dict) -> dict[str, int]:
    """Passes of f per image for a preset (or feature list) with default settings, e.g.
    ``passes_per_image("white-box") == {"forward": 28, "forward_backward": 16, "forward_backward_max": 111}``."""
    return FeatureConfig(features=features, overrides=overrides).passes_per_image()


def count_passes(features: list[Feature]) -> dict[str, int]:
    requests = [r for f in features for r in f.shared_requests()]
    grad_keys = {r.key for r in requests if r.grad}
    fwd_keys = {r.key for r in requests} - grad_keys
    total = Passes(forward=len(fwd_keys), forward_backward=len(grad_keys), forward_backward_max=len(grad_keys))
    for f in features:
        total = total + f.private_passes()
    return {"forward": total.forward, "forward_backward": total.forward_backward,
            "forward_backward_max": total.forward_backward_max}

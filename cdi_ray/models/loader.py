"""Find a model directory's family and load it: ``load_model(path) -> DiffusionModel``.

The registry ``FAMILIES`` maps a family name to an adapter class with

* ``family`` (`str`), ``layout`` (`str`, the required directory layout, shown in errors),
  ``pipeline_classes`` (`tuple[str, ...]`, ``model_index.json`` ``_class_name`` values it owns),
  ``options`` (`tuple[str, ...]`, keyword options its ``from_pretrained`` accepts);
* ``detect(path) -> bool`` — cheap, never raises, reads only directory names and JSON configs;
* ``from_pretrained(path, device, dtype, **options) -> DiffusionModel``.

Detection: a ``model_index.json`` naming a known pipeline class decides; otherwise the first
family (in registration order, most specific first) whose ``detect`` accepts the directory.
A new family is one module plus one ``register_family`` call.

Nothing is ever downloaded: paths are local directories (``local_files_only=True``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import _common as C
from .base import DiffusionModel, ModelLoadError
from .dit import DiT
from .latent import LatentUNet
from .pixel import PixelDDPM
from .text2image import TextToImage
from .uvit import UViT

FAMILIES: dict[str, type[DiffusionModel]] = {}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def register_family(cls: type[DiffusionModel]) -> type[DiffusionModel]:
    """Add an adapter class to ``FAMILIES`` (usable as a class decorator)."""
    for attr in ("family", "layout", "pipeline_classes", "options", "detect", "from_pretrained"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} cannot be registered: it lacks `{attr}`")
    FAMILIES[cls.family] = cls
    return cls


# Most specific first: uvit/ is a U-ViT; a conditional UNet + text_encoder/ is text-to-image; a transformer/ folder
# is a DiT; unet/ + an autoencoder is latent; unet/ alone is pixel.
register_family(UViT)
register_family(TextToImage)
register_family(DiT)
register_family(LatentUNet)
register_family(PixelDDPM)


def supported_layouts() -> str:
    return "\n".join(f"  {name}: {cls.layout}" for name, cls in FAMILIES.items())


def _describe(root: Path) -> str:
    """What the directory holds, for the 'no family matches' error."""
    parts = []
    pipe = C.pipeline_class(root)
    if pipe:
        parts.append(f"model_index.json names {pipe}")
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = C.config_class(root, sub.name) or C.config_class(root, sub.name, "scheduler_config.json")
        parts.append(f"{sub.name}/" + (f" ({name})" if name else ""))
    files = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    if files and not parts:
        parts.append("files " + ", ".join(files[:5]) + (" …" if len(files) > 5 else ""))
    return "; ".join(parts) if parts else "nothing (empty directory)"


def detect_family(path: str | Path) -> str:
    """The registry name of the family that owns ``path``; ModelLoadError if none does."""
    root = Path(path)
    if not root.exists():
        raise ModelLoadError(f"cannot load model '{path}': the path does not exist. "
                             "Fix: pass a local model directory (nothing is downloaded); supported layouts:\n"
                             + supported_layouts())
    if not root.is_dir():
        raise ModelLoadError(f"cannot load model '{path}': it is a file, not a directory (single-file checkpoints "
                             "are not supported). Fix: convert it to a diffusers directory with `save_pretrained` in "
                             "one of the supported layouts:\n" + supported_layouts())
    pipe = C.pipeline_class(root)
    for name, cls in FAMILIES.items():
        if pipe in cls.pipeline_classes:
            return name
    for name, cls in FAMILIES.items():
        if cls.detect(root):
            return name
    raise ModelLoadError(f"cannot load model '{path}': it matches no supported model family (found: {_describe(root)}). "
                         "Fix: save the model's components as diffusers subfolders in one of these layouts:\n"
                         + supported_layouts())


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
               family: str | None = None, **options: Any) -> DiffusionModel:
    """Load the diffusion model saved in the local directory ``path``.

    Args:
        path (`str` or `Path`): a directory in one of the layouts of ``FAMILIES`` (see ``supported_layouts()``).
        device (`str` or `torch.device`, *optional*, defaults to ``"cpu"``).
        dtype (`torch.dtype` or `str`, *optional*, defaults to ``torch.float32``): weight dtype of the noise
            predictor (``"bfloat16"``, ``"float16"``…); ``predict_noise`` always returns float32.
        family (`str`, *optional*): skip detection and use this registry entry.
        **options: family options, e.g. ``missing_label="null"`` (class models), ``vq_scaling="config"``.

    Returns:
        The family's :class:`DiffusionModel`, in eval mode with frozen parameters, ``fingerprint`` set.

    Raises:
        ModelLoadError: one message naming the path, what is missing or wrong, and the fix.
        ValueError: an unknown family, option or dtype.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}")
        dtype = DTYPES[dtype]
    if family is None:
        family = detect_family(path)
    elif family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {sorted(FAMILIES)}")
    cls = FAMILIES[family]
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model family {family!r}; valid: {list(cls.options)}")
    try:
        return cls.from_pretrained(Path(path), device=device, dtype=dtype, **options)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 — safety net: never a deep traceback from loading
        raise ModelLoadError(f"cannot load model '{path}' as {family}: {C.first_line(exc)}. "
                             f"Fix: check the directory against the {family} layout: {cls.layout}") from None

"""Model adapters: every family behind the one :class:`DiffusionModel` interface.

``load_model(path)`` detects the family of a local diffusers directory and loads it;
``FAMILIES`` is the registry (``register_family`` adds one). diffusers is imported lazily.
"""
from .base import DiffusionModel, ImageMeta, ModelLoadError
from .dit import DiT
from .fingerprint import model_fingerprint
from .latent import LatentUNet
from .loader import FAMILIES, detect_family, load_model, register_family, supported_layouts
from .pixel import PixelDDPM
from .text2image import TextToImage
from .uvit import UViT

__all__ = [
    "DiffusionModel", "ImageMeta", "ModelLoadError", "FAMILIES", "load_model", "detect_family", "register_family",
    "supported_layouts", "model_fingerprint", "PixelDDPM", "LatentUNet", "DiT", "TextToImage", "UViT",
]

"""cdi-ray: copyrighted-data identification (CDI) for diffusion models, as a batch audit on Ray.

The public API (README "Python API"; :mod:`cdi_ray.api`)::

    from cdi_ray import load_manifest, plan_manifest, run_manifest, extract_features, run_test

Layers (see docs/ARCHITECTURE.md):
  method   — models/, features/, stats/, controls/, images.py, seeding.py, spec/, sources/,
             storage.py, conditioning.py: plain PyTorch/NumPy/pyarrow, no Ray
  pipeline — pipeline/: the stages on Ray (listing, hashing, planning, streams, aggregation, results)
  surface  — api.py, cli.py, report/, jobs/
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["load_manifest", "parse_manifest", "Manifest", "ManifestError", "plan_manifest", "run_manifest",
           "BatchPlan", "BatchResult", "extract_features", "run_test", "verdict"]


def __getattr__(name: str):
    """Import a public name when it is first used: ``import cdi_ray`` stays light and Ray-free."""
    from cdi_ray.api import _EXPORTS

    if name not in _EXPORTS:
        raise AttributeError(f"module 'cdi_ray' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted([*globals(), *__all__])

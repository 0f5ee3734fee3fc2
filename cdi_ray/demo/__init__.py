"""Bundled demo data and demo models (see ``docs/DEMO_DATA.md``). Plain NumPy, no Ray, no torch."""
from cdi_ray.demo.bundle import (
    DEMO_MODELS,
    Bundle,
    BundleIntegrityError,
    demo_model_dir,
    load_bundle,
    load_split,
)

__all__ = ["DEMO_MODELS", "Bundle", "BundleIntegrityError", "demo_model_dir", "load_bundle", "load_split"]

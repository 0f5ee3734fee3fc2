"""Per-image membership features of CDI (METHOD.md step 2), plain PyTorch, no Ray.

    from cdi_ray.features import FeatureConfig, FeatureExtractor
    ext = FeatureExtractor(model, FeatureConfig(features="white-box", seed=0, device="cuda"))
    cols = ext(images, metas)          # {"dl": array(B,), …, "no_delta_norm": array(B,)}

Modules: one per feature family (``dl``, ``secmi``, ``pia`` (PIA, PIAN, and PIAM — PIA at several
timesteps and norm orders), ``gm``, ``ml``, ``no``, ``dlm`` (DL at several timesteps)),
``registry`` (names; presets: the paper's ``white-box`` and ``gray-box``, and ``efficient``),
``config`` (``FeatureConfig``), ``context`` (shared, memoised evaluations and pass counts),
``lbfgs`` (per-sample batched L-BFGS), ``extractor``, ``extract`` (folder → Parquet).
"""
from cdi_ray.features.config import FeatureConfig, passes_per_image
from cdi_ray.features.extractor import FeatureExtractor
from cdi_ray.features.registry import FEATURES, PRESETS, get_feature_class, resolve_preset

__all__ = ["FEATURES", "PRESETS", "FeatureConfig", "FeatureExtractor", "get_feature_class", "passes_per_image",
           "resolve_preset"]

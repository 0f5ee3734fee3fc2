"""``FeatureExtractor``: a loaded model + a ``FeatureConfig`` → feature columns for image batches.

Load once, process many (STYLE.md "For cdi-ray" 6): construct with a loaded model, then call it
on batches. Ray-free; ``pipeline/`` wraps it for ``map_batches``.

Per batch:

1. per-image generators from (seed, content hash, stream): ``"encode"`` for the latent
   posterior sample, ``"cond"`` for the conditioning (e.g. which caption);
2. z = E(x) and the conditioning, without gradients;
3. an ``EvalContext``; the union of the features' shared first-level evaluations is computed
   once, batched (gradient passes first, so their forward values serve forward-only requests);
4. each feature's ``compute``; forward passes under ``torch.inference_mode``, gradient passes
   (GM, NO) under ``torch.enable_grad``;
5. columns as float64 NumPy arrays, one row per image, in input order.

An image's features depend only on (model, config, image, seed): not on its batch, its
position, or the device's noise generator (noise is drawn on CPU). Up to float rounding of
batched kernels.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from cdi_ray.features.config import FeatureConfig, count_passes
from cdi_ray.features.context import EvalContext
from cdi_ray.models.base import DiffusionModel, ImageMeta
from cdi_ray.seeding import image_generators


class FeatureExtractor:
    """Compute a feature preset for batches of images.

    Args:
        model (`DiffusionModel`): a loaded model, on ``config.device``.
        config (`FeatureConfig`, *optional*): defaults to the white-box preset, seed 0, CPU.

    Attributes:
        columns (`list[str]`): output column names in order.
        config_hash (`str`): ``config.config_hash()``, to store with every row.
        last_pass_counts (`dict[str, np.ndarray]`): passes of f per image in the last call.
    """

    def __init__(self, model: DiffusionModel, config: FeatureConfig | None = None):
        self.config = config if config is not None else FeatureConfig()
        self.model = model
        self.device = torch.device(self.config.device)
        if _device_key(model.device) != _device_key(self.device):
            raise ValueError(f"the model is on {model.device} but the feature config asks for device "
                             f"{self.config.device!r}; load the model with device={self.config.device!r}")
        self.features = self.config.build_features()
        self.columns = [c for f in self.features for c in f.columns]
        self.config_hash = self.config.config_hash()
        T = model.num_train_timesteps
        for f in self.features:
            if f.max_timestep() >= T:
                raise ValueError(f"feature {f.name!r} evaluates f at t={f.max_timestep()}, but the model's schedule has "
                                 f"{T} timesteps (0..{T - 1}); lower its timesteps in FeatureConfig.overrides")
        self.last_pass_counts: dict[str, np.ndarray] = {}

    def passes_per_image(self) -> dict[str, int]:
        """Planned passes of f per image (see ``FeatureConfig.passes_per_image``)."""
        return count_passes(self.features)

    def __call__(self, images: torch.Tensor, metas: list[ImageMeta]) -> dict[str, np.ndarray]:
        """Features of a batch.

        Args:
            images (`Tensor` of shape (B, C, H, W)): preprocessed images in [-1, 1].
            metas (`list[ImageMeta]`): one per image (content hash, label, captions).

        Returns:
            `dict[str, np.ndarray]`: ``self.columns`` → float64 arrays of shape (B,).
        """
        if images.ndim != 4 or images.shape[0] != len(metas):
            raise ValueError(f"images must be (B, C, H, W) with B = len(metas) = {len(metas)}, got {tuple(images.shape)}")
        B = len(metas)
        if B == 0:
            return {c: np.zeros(0, dtype=np.float64) for c in self.columns}
        hashes = [m.content_hash for m in metas]
        seed = self.config.seed
        # inference_mode(False): a caller's inference mode (e.g. a Ray actor wrapping the call) must not turn
        # z or the conditioning into inference tensors, which the gradient passes could not save for backward
        with torch.inference_mode(False), _cuda_numerics(self.device, allow_tf32=self.config.allow_tf32):
            # 1.–2. latents and conditioning
            with torch.no_grad():
                enc_gens = image_generators(seed, hashes, "encode") if self.config.encode == "sample" else None
                z = self.model.encode(images.to(self.device), enc_gens).float()
                cond = self.model.conditioning(metas, image_generators(seed, hashes, "cond"))
            # 3. shared first-level evaluations
            ctx = EvalContext(self.model, z, cond, seed=seed, content_hashes=hashes,
                              max_micro_batch=self.config.max_micro_batch,
                              max_micro_batch_grad=self.config.max_micro_batch_grad,
                              autocast_dtype=self.config.torch_autocast_dtype)
            ctx.prefetch([r for f in self.features for r in f.shared_requests()])
            # 4. features
            results = [(f, f.compute(ctx)) for f in self.features]
        out: dict[str, np.ndarray] = {}
        for f, values in results:
            if list(values) != f.columns:
                raise RuntimeError(f"feature {f.name!r} returned columns {list(values)}, expected {f.columns}")
            for col, v in values.items():
                v = v.detach().reshape(-1)
                if v.shape[0] != B:
                    raise RuntimeError(f"feature column {col!r} has {v.shape[0]} values for {B} images")
                out[col] = v.to("cpu", torch.float64).numpy()
        self.last_pass_counts = {k: v.numpy().copy() for k, v in ctx.counts.items()}
        return out


@contextmanager
def _cuda_numerics(device: torch.device, *, allow_tf32: bool):
    """On CUDA: TF32 as configured and no cuDNN autotuning while features run (restored after)."""
    if device.type != "cuda":
        yield
        return
    prev_matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=allow_tf32):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_matmul


def _device_key(d: torch.device | str) -> tuple[str, int]:
    d = torch.device(d)
    index = d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" and torch.cuda.is_available() else 0)
    return d.type, index

"""Small helpers shared by the model adapters: reading a diffusers directory, loading one
component with a readable error, the training schedule ᾱ, timesteps and class labels.

Every failure while loading becomes one :class:`ModelLoadError` whose message names the
directory, what is missing or wrong, and how to fix it (``raise … from None``: no deep traceback).
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from .base import ImageMeta, ModelLoadError

MissingLabel = Literal["error", "null"]

# Weight files diffusers looks for in a component folder (plain, safetensors, sharded).
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin.index.json",
)


def load_error(path: str | Path, problem: str, fix: str) -> ModelLoadError:
    """The one error format: where, what, how to fix."""
    return ModelLoadError(f"cannot load model '{path}': {problem}. Fix: {fix}")


def construct(cls, root: str | Path, *args, **kwargs):
    """``cls(*args, **kwargs)``; a constructor's ValueError (a bad load option) becomes a ModelLoadError naming ``root``."""
    try:
        return cls(*args, **kwargs)
    except ModelLoadError:
        raise
    except ValueError as exc:
        raise load_error(root, str(exc), "change the load options, or use a model this adapter supports") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def read_json(file: Path) -> dict[str, Any] | None:
    """The JSON object in ``file``, or None if it is absent or unreadable (detection must not raise)."""
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def config_class(root: Path, sub: str, fname: str = "config.json") -> str | None:
    """``_class_name`` of ``root/sub/fname`` (None if absent or unreadable)."""
    cfg = read_json(root / sub / fname)
    return cfg.get("_class_name") if cfg else None


def pipeline_class(root: Path) -> str | None:
    """``_class_name`` of ``root/model_index.json`` (None if absent)."""
    cfg = read_json(root / "model_index.json")
    return cfg.get("_class_name") if cfg else None


def require_component(root: Path, sub: str, classes: tuple[str, ...], *, layout: str, fname: str = "config.json") -> dict:
    """Check ``root/sub/fname`` exists, parses and names one of ``classes``; return the config."""
    folder = root / sub
    what = " or ".join(classes)
    if not folder.is_dir():
        raise load_error(root, f"missing subfolder '{sub}/' (expected a diffusers {what})",
                         f"save the component with `{classes[0]}.save_pretrained('{folder}')`; this family's layout is {layout}")
    cfg_file = folder / fname
    if not cfg_file.is_file():
        raise load_error(root, f"missing config file '{sub}/{fname}'",
                         f"re-save the component with `save_pretrained('{folder}')`; this family's layout is {layout}")
    cfg = read_json(cfg_file)
    if cfg is None:
        raise load_error(root, f"'{sub}/{fname}' is not a valid JSON object",
                         f"re-save the component with `save_pretrained('{folder}')`")
    name = cfg.get("_class_name")
    if name not in classes:
        raise load_error(root, f"'{sub}/{fname}' describes a {name!r}, expected {what}",
                         f"put a {what} in '{sub}/'; this family's layout is {layout}")
    return cfg


def load_component(cls, root: Path, sub: str, *, dtype: torch.dtype, layout: str) -> torch.nn.Module:
    """``cls.from_pretrained(root, subfolder=sub)`` from local files only, every failure → ModelLoadError.

    Weights that leave parameters uninitialised (missing keys) or have the wrong shapes are refused:
    a randomly initialised layer would silently change every feature.
    """
    folder = root / sub
    if not any((folder / w).is_file() for w in WEIGHT_NAMES):
        raise load_error(root, f"no weights in '{sub}/' (looked for {', '.join(WEIGHT_NAMES[:2])})",
                         f"save the component with `save_pretrained('{folder}')`")
    # Silence diffusers' own warnings while loading: what matters is turned into our error below.
    dlog = logging.getLogger("diffusers")
    level = dlog.level
    dlog.setLevel(logging.ERROR)
    try:
        model, info = cls.from_pretrained(
            root, subfolder=sub, torch_dtype=dtype, local_files_only=True, output_loading_info=True,
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
    except Exception as exc:  # noqa: BLE001 — anything diffusers/torch/safetensors raises
        text = str(exc)
        if "size mismatch" in text:  # torch's load_state_dict report: name the first offending tensor
            detail = next(line.strip() for line in text.splitlines() if "size mismatch" in line)
            raise load_error(root, f"the weights in '{sub}/' do not match its config.json ({detail})",
                             f"re-save '{sub}/' so that config.json and the weights come from the same model") from None
        raise load_error(root, f"the weights in '{sub}/' do not load ({first_line(exc)})",
                         f"check that '{sub}/' holds the config and weights saved together by `save_pretrained`") from None
    finally:
        dlog.setLevel(level)
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = (missing or [m[0] for m in mismatched])[:3]
        kind = "missing" if missing else "wrong-shaped"
        raise load_error(root, f"'{sub}/' weights do not match its config ({len(missing) + len(mismatched)} {kind} tensors, e.g. {bad})",
                         f"re-save '{sub}/' so that config.json and the weights come from the same model")
    return model


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """eval(), no parameter gradients (input gradients still flow), on device/dtype."""
    module.eval()
    module.requires_grad_(False)
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype=dtype)
    return module.to(device=device)


def load_scheduler(root: Path, *, layout: str):
    """The scheduler saved in ``root/scheduler/`` (the class its config names), validated by :func:`schedule_of`.

    Instantiating the named class from its config honours options like ``rescale_betas_zero_snr``;
    DDPM, DDIM, PNDM, DPM-Solver, Euler, … all expose the training ``alphas_cumprod``.
    """
    import diffusers

    cfg_file = root / "scheduler" / "scheduler_config.json"
    if not (root / "scheduler").is_dir() or not cfg_file.is_file():
        missing = "subfolder 'scheduler/'" if not (root / "scheduler").is_dir() else "config file 'scheduler/scheduler_config.json'"
        raise load_error(root, f"missing {missing} (the training noise schedule ᾱ comes from it)",
                         f"save the training scheduler with `DDPMScheduler(...).save_pretrained('{root / 'scheduler'}')`; "
                         f"this family's layout is {layout}")
    cfg = read_json(cfg_file)
    if cfg is None:
        raise load_error(root, "'scheduler/scheduler_config.json' is not a valid JSON object",
                         "re-save the scheduler with `save_pretrained`")
    name = cfg.get("_class_name")
    sched_cls = getattr(diffusers, str(name), None) if name else None
    if sched_cls is None or not hasattr(sched_cls, "from_config"):
        raise load_error(root, f"'scheduler/scheduler_config.json' names an unknown scheduler class {name!r}",
                         "save a diffusers scheduler (e.g. DDPMScheduler or DDIMScheduler) with the model's training betas")
    try:
        scheduler = sched_cls.from_config(cfg)
        schedule_of(scheduler)
    except Exception as exc:  # noqa: BLE001
        raise load_error(root, f"the scheduler in 'scheduler/' is unusable ({first_line(exc)})",
                         "save a DDPM/DDIM-style ε- or v-prediction scheduler with the model's training betas") from None
    return scheduler


def schedule_of(scheduler) -> tuple[torch.Tensor, str]:
    """(ᾱ as float64 on CPU, prediction type) of a diffusers scheduler; ValueError if unusable."""
    ab = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(ab, torch.Tensor) or ab.ndim != 1 or ab.numel() < 2:
        raise ValueError(f"{type(scheduler).__name__} has no training schedule `alphas_cumprod`")
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon") or "epsilon"
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r} is not supported (CDI needs an ε- or v-prediction model)")
    return ab.detach().to("cpu", torch.float64).clone(), prediction_type


def square_size(value: Any, what: str, root: Path) -> int:
    """An int side from a config's ``sample_size`` (int or square pair)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise load_error(root, f"{what} sample_size={list(value)} is not square", "only square models are supported")
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        raise load_error(root, f"{what} has no usable sample_size ({value!r})",
                         f"set `sample_size` in the {what} config to the training resolution")
    return value


def vae_factor(cfg: dict) -> int:
    """Spatial downsampling of an AutoencoderKL / VQModel: 2**(levels - 1)."""
    return 2 ** (len(cfg.get("block_out_channels", (64,))) - 1)


def as_timesteps(t: torch.Tensor | int, batch: int, num_train_timesteps: int, device: torch.device) -> torch.Tensor:
    """``t`` (int, 0-d or (B,) tensor) → LongTensor (B,) on ``device``; refuses t outside [0, T)."""
    t = torch.as_tensor(t)
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"t must hold integer timesteps, got {t.tolist()}")
    t = t.long()
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"t must be an int or a LongTensor of shape ({batch},), got shape {tuple(t.shape)}")
    if batch and (int(t.min()) < 0 or int(t.max()) >= num_train_timesteps):
        raise ValueError(f"t must lie in [0, {num_train_timesteps - 1}], got {t.min().item()}..{t.max().item()}")
    return t.to(device)


def check_latents(z: torch.Tensor, latent_shape: tuple[int, int, int], what: str = "z_t") -> None:
    if z.ndim != 4 or tuple(z.shape[1:]) != tuple(latent_shape):
        raise ValueError(f"{what} must have shape (B, {', '.join(map(str, latent_shape))}), got {tuple(z.shape)}")


def check_images(x: torch.Tensor, channels: int, size: int) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != (channels, size, size):
        raise ValueError(f"images must have shape (B, {channels}, {size}, {size}) in [-1, 1], got {tuple(x.shape)} "
                         f"(preprocess them with cdi_ray.images.preprocess(img, size={size}, channels={channels}))")


def epsilon_from_output(out: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                        prediction_type: str) -> torch.Tensor:
    """Network output → ε̂ (float32). v-prediction: ε = sqrt(ᾱ_t)·v + sqrt(1-ᾱ_t)·z_t."""
    out = out.float()
    if prediction_type == "epsilon":
        return out
    ab = alphas_cumprod[t.cpu()].to(out.device, torch.float32).reshape(-1, 1, 1, 1)
    return ab.sqrt() * out + (1 - ab).sqrt() * z_t.to(out.device, torch.float32)


def split_learned_variance(out: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the ε half of a learned-variance output (2C channels → first C)."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out


def check_out_channels(out_channels: int, in_channels: int, what: str, root: Path) -> None:
    if out_channels not in (in_channels, 2 * in_channels):
        raise load_error(root, f"{what} has in_channels={in_channels} but out_channels={out_channels} "
                         "(expected the same, or twice for a learned variance)", "check the component config")


def class_labels(metas: list[ImageMeta], *, num_classes: int, missing_label: MissingLabel, null_class: int | None,
                 device: torch.device) -> torch.Tensor:
    """LongTensor (B,) of class labels; a missing label becomes ``null_class`` when ``missing_label="null"``."""
    labels = []
    for m in metas:
        if m.label is None:
            if missing_label == "null" and null_class is not None:
                labels.append(null_class)
                continue
            raise ValueError(f"image {m.content_hash} has no class label, but this model is class-conditional "
                             f"({num_classes} classes); give every image a label in [0, {num_classes - 1}]"
                             + (", or load the model with missing_label='null' to use the null class" if null_class is not None else ""))
        label = int(m.label)
        if not 0 <= label < num_classes:
            raise ValueError(f"image {m.content_hash} has class label {label}, outside the model's [0, {num_classes - 1}]")
        labels.append(label)
    return torch.tensor(labels, dtype=torch.long, device=device)


def check_missing_label(missing_label: str, null_class: int | None, num_embeddings: int) -> None:
    """Validate the ``missing_label`` option against the model's class table (``num_embeddings`` rows)."""
    if missing_label not in ("error", "null"):
        raise ValueError(f"missing_label must be 'error' or 'null', got {missing_label!r}")
    if null_class is not None and not 0 <= int(null_class) < num_embeddings:
        raise ValueError(f"null_class={null_class} is outside the model's class table [0, {num_embeddings - 1}]")
    if missing_label == "null" and null_class is None:
        raise ValueError("missing_label='null' needs a null class, and this model has none; "
                         "pass null_class=<index> if the model was trained with one, or give every image a label")



def check_generators(generators: list[torch.Generator] | None, batch: int) -> None:
    if generators is not None and len(generators) != batch:
        raise ValueError(f"need one generator per image: got {len(generators)} generators for {batch} images")


@torch.no_grad()
def encode_kl(vae, images: torch.Tensor, generators: list[torch.Generator] | None, device: torch.device) -> torch.Tensor:
    """z = (s − shift)·scaling_factor with s ~ q(z|x) drawn from the per-image ``generators`` (the mean if None).

    The posterior noise is drawn row by row from each image's own generator
    (:func:`cdi_ray.seeding.per_image_randn`), so an image's latent does not depend on its batch.
    No gradient flows into the encoder (CDI differentiates w.r.t. z_t only).
    """
    from ..seeding import per_image_randn

    check_generators(generators, images.shape[0])
    vae_dtype = next(vae.parameters()).dtype
    posterior = vae.encode(images.to(device, vae_dtype)).latent_dist
    z = posterior.mean.float()
    if generators is not None:
        eps = per_image_randn(tuple(z.shape[1:]), generators, device=z.device, dtype=torch.float32)
        z = z + posterior.std.float() * eps
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = getattr(vae.config, "scaling_factor", None) or 1.0
    return (z - shift) * scale

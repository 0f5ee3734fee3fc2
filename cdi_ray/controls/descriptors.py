"""Model-independent image descriptors for the model-free distribution-shift control.

``image_descriptors(data, image, array) -> dict[str, float]`` describes one image by numbers that
do **not** involve the audited model: if these alone separate P from U, the collections differ
in something other than membership, and a model's features would separate them too
(METHOD.md, "Known weaknesses"). Every value is finite; the names and their order are fixed
(:data:`DESCRIPTOR_NAMES`), whatever the image's format, mode or size.

Groups (prefix → what it catches):

* ``file_`` — **encoded-file traces**: ``file_log_bytes`` (log10 of the encoded size),
  ``file_bits_per_pixel`` (8·bytes / (width·height): compression strength),
  ``file_format_jpeg/png/webp/other`` (0/1 indicators), ``file_jpeg_quality`` (libjpeg-style quality
  1–100 estimated from the luminance quantisation table; 100 for lossless formats),
  ``file_jpeg_subsampled`` (1 if the chroma planes are subsampled), ``file_source_gray`` (1 if the
  file decodes to grayscale). Catches collections from different sources, crawls or re-encodings.
* ``geom_`` — **geometry** of the decoded image: ``geom_log2_width``, ``geom_log2_height``,
  ``geom_log_aspect`` (ln(width/height)), ``geom_upscaled`` (1 if the short side is below the
  model's input size, i.e. preprocessing enlarges it). Catches resolution and framing differences.
* ``pix_`` — **pixel and colour statistics** of the decoded image (0–255 scale; images above
  :data:`MAX_STAT_PIXELS` are first reduced by an integer factor): ``pix_mean``, ``pix_std`` (luma),
  ``pix_mean_r/g/b``, ``pix_saturation`` (mean HSV saturation), ``pix_entropy`` (bits, 256-bin luma
  histogram), ``pix_clip_low`` / ``pix_clip_high`` (fraction of luma ≤ 2 / ≥ 253). Catches
  exposure, colour grading, curation (e.g. white-background product shots) and subject matter.
* ``freq_`` — **frequency spectrum** of the *preprocessed* image (what the model sees):
  ``freq_log_power`` (log10 of the pixel variance) and ``freq_band0..3`` (log10 of the fraction of
  the power in four radial frequency bands, 0–⅛, ⅛–¼, ¼–⅜, ⅜–½ cycles/pixel). Catches blur,
  sharpening, noise and resampling history.
* ``rcn_`` — **a fixed random convolutional network** on the preprocessed image: two 3×3
  convolutions (3→8→8 channels, He-initialised from the fixed seed :data:`RCN_SEED`, ReLU, 2×2
  average pooling between them), global-average-pooled to ``rcn_0..7``. Random conv features are a
  generic texture/shape summary (they separate image classes far above chance) without any
  training, hence without any link to the audited model. Inputs larger than
  :data:`RCN_MAX_SIDE` per side are area-averaged down first (cost).

Deterministic: pure NumPy on the given inputs, no global random state. The values depend on the
model only through the preprocessing geometry (input size, channels), which is why the pipeline
stores them per geometry, keyed by the image's content hash.
"""
from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
from PIL import Image

__all__ = ["image_descriptors", "descriptor_matrix", "DESCRIPTOR_NAMES", "DESCRIPTOR_GROUPS", "DESCRIPTOR_VERSION",
           "descriptor_key", "group_of"]

#: Bump when any definition changes: stored descriptors are keyed by it.
DESCRIPTOR_VERSION = 1
#: Seed of the random conv net's weights (fixed forever within a DESCRIPTOR_VERSION).
RCN_SEED = 20261128
RCN_CHANNELS = 8
#: The random conv net sees the preprocessed image area-averaged to at most this side (cost).
RCN_MAX_SIDE = 64
#: Pixel statistics run on at most this many pixels (larger images are reduced first): ~20 ms.
MAX_STAT_PIXELS = 1 << 20
#: Radial frequency band edges in cycles/pixel (Nyquist = 0.5).
FREQ_BANDS = (0.0, 0.125, 0.25, 0.375, 0.5 + 1e-9)

DESCRIPTOR_GROUPS: dict[str, tuple[str, ...]] = {
    "file": ("file_log_bytes", "file_bits_per_pixel", "file_format_jpeg", "file_format_png", "file_format_webp",
             "file_format_other", "file_jpeg_quality", "file_jpeg_subsampled", "file_source_gray"),
    "geometry": ("geom_log2_width", "geom_log2_height", "geom_log_aspect", "geom_upscaled"),
    "pixel": ("pix_mean", "pix_std", "pix_mean_r", "pix_mean_g", "pix_mean_b", "pix_saturation", "pix_entropy",
              "pix_clip_low", "pix_clip_high"),
    "frequency": ("freq_log_power",) + tuple(f"freq_band{i}" for i in range(len(FREQ_BANDS) - 1)),
    "random_conv": tuple(f"rcn_{i}" for i in range(RCN_CHANNELS)),
}
DESCRIPTOR_NAMES: tuple[str, ...] = tuple(n for names in DESCRIPTOR_GROUPS.values() for n in names)

# libjpeg's standard luminance quantisation table (ITU-T T.81 Annex K), natural order.
_STD_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.float64)


def group_of(name: str) -> str:
    """The group (``file``, ``geometry``, ``pixel``, ``frequency``, ``random_conv``) of a descriptor."""
    for g, names in DESCRIPTOR_GROUPS.items():
        if name in names:
            return g
    raise KeyError(f"unknown descriptor {name!r}; valid names: {DESCRIPTOR_NAMES}")


def descriptor_key(size: int, channels: int) -> str:
    """Store key of descriptors computed for a preprocessing geometry (and this definition version)."""
    payload = json.dumps({"version": DESCRIPTOR_VERSION, "size": int(size), "channels": int(channels),
                          "names": DESCRIPTOR_NAMES, "rcn_seed": RCN_SEED, "rcn_max_side": RCN_MAX_SIDE}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# 1. encoded-file traces
# ----------------------------------------------------------------------------------------------
def _jpeg_quality(qtables: dict) -> float:
    """libjpeg quality (1–100) whose scaled standard table best matches the luminance table.

    libjpeg scales the standard table by s = 5000/q (q < 50) or 200 − 2q (q ≥ 50), in percent;
    invert the median ratio stored/standard (Pillow returns tables in natural order)."""
    table = qtables.get(0)
    if table is None or len(table) != 64:
        return 50.0
    ratio = float(np.median(np.asarray(table, dtype=np.float64) / _STD_LUMA)) * 100.0
    q = (200.0 - ratio) / 2.0 if ratio <= 100.0 else 5000.0 / ratio
    return float(min(100.0, max(1.0, q)))


def _file_group(data: bytes, width: int, height: int, gray: bool) -> dict[str, float]:
    fmt, quality, subsampled = "", 100.0, 0.0
    try:
        with Image.open(io.BytesIO(data)) as raw:  # header only
            fmt = (raw.format or "").upper()
            if fmt == "JPEG":
                quality = _jpeg_quality(getattr(raw, "quantization", None) or {})
                layers = getattr(raw, "layer", None) or []
                subsampled = float(len(layers) >= 3 and any(l[1] != layers[0][1] or l[2] != layers[0][2]
                                                              for l in layers[1:]))
    except Exception:  # noqa: BLE001 — the caller already decoded it; the header is then just unknown
        pass
    return {
        "file_log_bytes": math.log10(max(len(data), 1)),
        "file_bits_per_pixel": 8.0 * len(data) / max(width * height, 1),
        "file_format_jpeg": float(fmt == "JPEG"),
        "file_format_png": float(fmt == "PNG"),
        "file_format_webp": float(fmt == "WEBP"),
        "file_format_other": float(fmt not in ("JPEG", "PNG", "WEBP")),
        "file_jpeg_quality": quality,
        "file_jpeg_subsampled": subsampled,
        "file_source_gray": float(gray),
    }


# ----------------------------------------------------------------------------------------------
# 2. geometry, 3. pixel statistics
# ----------------------------------------------------------------------------------------------
def _geometry_group(width: int, height: int, size: int) -> dict[str, float]:
    return {"geom_log2_width": math.log2(width), "geom_log2_height": math.log2(height),
            "geom_log_aspect": math.log(width / height), "geom_upscaled": float(min(width, height) < size)}


def _pixel_group(image: Image.Image) -> dict[str, float]:
    img = image if image.mode in ("L", "RGB") else image.convert("RGB")
    w, h = img.size
    if w * h > MAX_STAT_PIXELS:
        img = img.reduce(int(math.ceil(math.sqrt(w * h / MAX_STAT_PIXELS))))
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    mx, mn = rgb.max(axis=1), rgb.min(axis=1)
    sat = np.where(mx > 0, (mx - mn) / np.where(mx > 0, mx, 1.0), 0.0)
    hist = np.bincount(np.clip(np.rint(luma), 0, 255).astype(np.int64), minlength=256).astype(np.float64)
    prob = hist[hist > 0] / hist.sum()
    return {
        "pix_mean": float(luma.mean()), "pix_std": float(luma.std()),
        "pix_mean_r": float(rgb[:, 0].mean()), "pix_mean_g": float(rgb[:, 1].mean()), "pix_mean_b": float(rgb[:, 2].mean()),
        "pix_saturation": float(sat.mean()), "pix_entropy": float(-(prob * np.log2(prob)).sum()),
        "pix_clip_low": float((luma <= 2).mean()), "pix_clip_high": float((luma >= 253).mean()),
    }


# ----------------------------------------------------------------------------------------------
# 4. frequency spectrum, 5. random conv net (on the preprocessed array)
# ----------------------------------------------------------------------------------------------
def _frequency_group(array: np.ndarray) -> dict[str, float]:
    x = np.asarray(array, dtype=np.float64).mean(axis=0)  # (S, S), channel average
    x = x - x.mean()
    power = np.abs(np.fft.fft2(x)) ** 2
    fy = np.fft.fftfreq(x.shape[0])[:, None]
    fx = np.fft.fftfreq(x.shape[1])[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    total = power.sum()
    out = {"freq_log_power": math.log10(total / x.size + 1e-12)}
    for i in range(len(FREQ_BANDS) - 1):
        band = power[(radius >= FREQ_BANDS[i]) & (radius < FREQ_BANDS[i + 1])].sum()
        out[f"freq_band{i}"] = math.log10(band / total + 1e-6) if total > 0 else -6.0
    return out


_RCN_WEIGHTS: list = []


def _rcn_weights():
    if not _RCN_WEIGHTS:
        rng = np.random.default_rng(RCN_SEED)
        w1 = rng.standard_normal((RCN_CHANNELS, 3, 3, 3)) * math.sqrt(2.0 / 27)
        b1 = rng.standard_normal(RCN_CHANNELS) * 0.1
        w2 = rng.standard_normal((RCN_CHANNELS, RCN_CHANNELS, 3, 3)) * math.sqrt(2.0 / (9 * RCN_CHANNELS))
        b2 = rng.standard_normal(RCN_CHANNELS) * 0.1
        _RCN_WEIGHTS.extend([w1, b1, w2, b2])
    return _RCN_WEIGHTS


def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """'same' 3×3 convolution (zero padding): x (C, H, W), w (O, C, 3, 3) → (O, H, W)."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))  # (C, H, W, 3, 3)
    return np.tensordot(w, win, axes=([1, 2, 3], [0, 3, 4])) + b[:, None, None]


def _random_conv_group(array: np.ndarray) -> dict[str, float]:
    x = np.asarray(array, dtype=np.float64)
    f = int(math.ceil(max(x.shape[1], x.shape[2]) / RCN_MAX_SIDE))
    if f > 1:  # area-average to ≤ RCN_MAX_SIDE per side (256² would take ~1 s, 64² takes ~20 ms)
        H, W = (x.shape[1] // f) * f, (x.shape[2] // f) * f
        x = x[:, :H, :W].reshape(x.shape[0], H // f, f, W // f, f).mean(axis=(2, 4))
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    w1, b1, w2, b2 = _rcn_weights()
    h = np.maximum(_conv3x3(x, w1, b1), 0.0)
    H, W = (h.shape[1] // 2) * 2, (h.shape[2] // 2) * 2
    if H >= 2 and W >= 2:
        h = h[:, :H, :W].reshape(h.shape[0], H // 2, 2, W // 2, 2).mean(axis=(2, 4))
    h = np.maximum(_conv3x3(h, w2, b2), 0.0)
    pooled = h.mean(axis=(1, 2))
    return {f"rcn_{i}": float(v) for i, v in enumerate(pooled)}


# ----------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------
def image_descriptors(data: bytes, image: Image.Image, array: np.ndarray) -> dict[str, float]:
    """Model-independent descriptors of one image.

    Args:
        data (`bytes`): the encoded file (as hashed).
        image (`PIL.Image.Image`): the decoded image (``cdi_ray.images.decode_image``, mode L or RGB).
        array (`ndarray` of shape (C, S, S)): the preprocessed image in [-1, 1]
            (``cdi_ray.images.preprocess`` at the model's size and channels).

    Returns:
        ``{name: value}`` for every name in :data:`DESCRIPTOR_NAMES`, in that order, all finite.
    """
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"array must be the preprocessed image of shape (C, S, S) with C in (1, 3); got {array.shape}")
    width, height = image.size
    out: dict[str, float] = {}
    out.update(_file_group(data, width, height, image.mode == "L"))
    out.update(_geometry_group(width, height, int(array.shape[-1])))
    out.update(_pixel_group(image))
    out.update(_frequency_group(array))
    out.update(_random_conv_group(array))
    ordered = {name: float(out[name]) for name in DESCRIPTOR_NAMES}
    bad = [k for k, v in ordered.items() if not math.isfinite(v)]
    if bad:  # cannot happen for decodable images; guard so a NaN never reaches the test silently
        raise ValueError(f"non-finite descriptors {bad}")
    return ordered


def descriptor_matrix(rows: list[dict[str, float]]) -> np.ndarray:
    """Stack descriptor dicts into an (n, len(DESCRIPTOR_NAMES)) float64 matrix, in name order."""
    return np.array([[r[n] for n in DESCRIPTOR_NAMES] for r in rows], dtype=np.float64).reshape(len(rows), len(DESCRIPTOR_NAMES))

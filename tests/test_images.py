"""images.py: identity, decoding with refusals, mode conversions and preprocessing."""
from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from cdi_ray.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    content_hash,
    decode_image,
    is_upscaled,
    preprocess,
)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose (valid, CRC-correct) header claims width × height, followed by no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


def rgb_noise(w=40, h=30, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# -- identity --------------------------------------------------------------------------------------

def test_content_hash_is_sha256_of_encoded_bytes():
    img = rgb_noise()
    png, bmp = encode(img, "PNG"), encode(img, "BMP")
    assert content_hash(png) == hashlib.sha256(png).hexdigest()
    assert len(content_hash(png)) == 64
    # same pixels, another container → another identity (the bytes are the image)
    assert content_hash(png) != content_hash(bmp)
    assert np.array_equal(np.asarray(decode_image(png, name="a")), np.asarray(decode_image(bmp, name="b")))


# -- refusals --------------------------------------------------------------------------------------

def test_empty_file():
    with pytest.raises(ImageError, match=r"image 'e\.png'.*empty") as ei:
        decode_image(b"", name="e.png")
    assert ei.value.name == "e.png" and "remove" in ei.value.reason


def test_not_an_image():
    with pytest.raises(ImageError, match=r"'notes\.txt'.*not a recognised image format.*convert"):
        decode_image(b"hello, this is text", name="notes.txt")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt):
    data = encode(rgb_noise(64, 64), fmt)
    with pytest.raises(ImageError, match=r"'t'.*truncated or corrupt.*re-download"):
        decode_image(data[: len(data) // 2], name="t")


def test_truncated_guard_against_global_leniency(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(rgb_noise()), name="x")


def test_decompression_bomb_refused_from_header():
    # 10000 × 10000 = 100 M pixels: over our limit (Pillow would only warn). The file holds no pixel data,
    # so being refused for its SIZE (not for truncation) shows the header is checked before decoding.
    with pytest.raises(ImageError, match=r"10000×10000.*exceeds the limit.*decompression bomb") as ei:
        decode_image(png_with_size(10_000, 10_000), name="bomb.png")
    assert f"{DEFAULT_MAX_PIXELS:,}" in ei.value.reason
    # 40000 × 40000: Pillow itself refuses at open; still our ImageError
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(png_with_size(40_000, 40_000), name="bigger.png")
    # the limit is a parameter
    with pytest.raises(ImageError, match="exceeds"):
        decode_image(encode(rgb_noise(100, 100)), name="small", max_pixels=5_000)
    assert decode_image(encode(rgb_noise(100, 100)), name="ok", max_pixels=10_000).size == (100, 100)


def test_image_error_pickles():
    err = pickle.loads(pickle.dumps(ImageError("s3://b/k.png", "the file is empty")))
    assert (err.name, err.reason) == ("s3://b/k.png", "the file is empty")
    assert str(err) == "image 's3://b/k.png': the file is empty"


# -- conversions -----------------------------------------------------------------------------------

def test_rgb_and_gray_pass_through():
    rgb = rgb_noise()
    out = decode_image(encode(rgb), name="x")
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(rgb))
    gray = rgb.convert("L")
    assert decode_image(encode(gray), name="x").mode == "L"


def test_rgba_composited_on_white():
    arr = np.zeros((2, 3, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 255)    # opaque red
    arr[0, 1] = (0, 0, 0, 0)        # fully transparent → white
    arr[0, 2] = (0, 0, 0, 128)      # half-transparent black → mid gray
    out = np.asarray(decode_image(encode(Image.fromarray(arr, "RGBA")), name="x"))
    assert out.shape == (2, 3, 3)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 2])


def test_la_composited_on_white_to_l():
    arr = np.array([[[0, 0], [0, 255], [200, 255]]], dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(arr, "LA")), name="x")
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[255, 0, 200]]


def test_palette_with_and_without_transparency():
    rgb = Image.new("RGB", (4, 4), (10, 200, 30))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    out = decode_image(encode(pal), name="x")
    assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == (10, 200, 30)
    # a transparent palette entry becomes white
    pal.info["transparency"] = pal.getpixel((0, 0))
    out = decode_image(encode(pal, transparency=pal.getpixel((0, 0))), name="x")
    assert tuple(np.asarray(out)[0, 0]) == (255, 255, 255)


def test_cmyk_to_rgb():
    cmyk = Image.new("CMYK", (3, 3), (0, 0, 0, 0))  # no ink = white
    out = decode_image(encode(cmyk, "JPEG", quality=100), name="x")
    assert out.mode == "RGB" and np.asarray(out).min() >= 250
    out = decode_image(encode(Image.new("CMYK", (3, 3), (0, 255, 255, 0)), "TIFF"), name="x")  # cyan-free red
    assert tuple(np.asarray(out)[0, 0]) == (255, 0, 0)


def test_16bit_grayscale_is_scaled_not_clipped():
    arr = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    data = encode(Image.fromarray(arr))  # 16-bit PNG
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, name="x")
    assert out.mode == "L"
    assert np.asarray(out).tolist() == [[0, 100, 255, 4]]
    # 32-bit "I" images: 16-bit range when values exceed 255, else already 8-bit data
    wide = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I")
    assert np.asarray(decode_image(encode(wide, "TIFF"), name="x")).tolist() == [[0, 255]]
    narrow = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), "I")
    assert np.asarray(decode_image(encode(narrow, "TIFF"), name="x")).tolist() == [[0, 100, 255]]


def test_bilevel_and_float_to_l():
    bw = Image.new("1", (2, 2), 1)
    assert np.asarray(decode_image(encode(bw), name="x")).tolist() == [[255, 255], [255, 255]]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    out = decode_image(encode(f, "TIFF"), name="x")
    assert out.mode == "L" and np.asarray(out).tolist() == [[0, 128, 255]]


def test_forced_mode():
    data = encode(rgb_noise())
    assert decode_image(data, name="x", mode="L").mode == "L"
    assert decode_image(encode(Image.new("L", (3, 3), 7)), name="x", mode="RGB").mode == "RGB"


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode_image(buf.getvalue(), name="anim.gif"))
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


def test_exif_orientation_only_on_request():
    img = rgb_noise(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW when displayed
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert decode_image(data, name="x").size == (40, 20)
    assert decode_image(data, name="x", exif_transpose=True).size == (20, 40)


# -- preprocess ------------------------------------------------------------------------------------

def test_preprocess_shape_dtype_range():
    out = preprocess(rgb_noise(50, 30), size=16, channels=3)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    black = preprocess(Image.new("RGB", (20, 20), (0, 0, 0)), size=8, channels=3)
    white = preprocess(Image.new("L", (20, 20), 255), size=8, channels=1)
    assert np.all(black == -1.0) and np.all(white == 1.0)


def test_preprocess_centre_crops():
    # 30 × 10: black, white (the centre 10 × 10), black
    arr = np.zeros((10, 30), dtype=np.uint8)
    arr[:, 10:20] = 255
    out = preprocess(Image.fromarray(arr, "L"), size=10, channels=1)
    assert np.all(out == 1.0)
    # tall image too
    out = preprocess(Image.fromarray(np.ascontiguousarray(arr.T), "L"), size=5, channels=1)
    assert np.allclose(out, 1.0)


def test_preprocess_downscale_is_antialiased():
    # a 1-pixel checkerboard averages to gray when downscaled with antialiasing (nearest would give ±1)
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    for resample in ("bicubic", "lanczos"):
        out = preprocess(Image.fromarray(checker, "L"), size=16, channels=1, resample=resample)
        assert np.abs(out).max() < 0.05


def test_preprocess_upscales_small_images():
    small = rgb_noise(8, 12)
    assert is_upscaled(small, 16) and not is_upscaled(rgb_noise(16, 20), 16)
    out = preprocess(small, size=16, channels=3)
    assert out.shape == (3, 16, 16)


def test_preprocess_channel_conversion():
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8), "L")
    rgb = preprocess(gray, size=16, channels=3)
    assert np.array_equal(rgb[0], rgb[1]) and np.array_equal(rgb[1], rgb[2])
    np.testing.assert_array_equal(rgb[0], preprocess(gray, size=16, channels=1)[0])
    color = Image.new("RGB", (4, 4), (255, 0, 0))
    lum = preprocess(color, size=4, channels=1)
    assert lum.shape == (1, 4, 4)
    np.testing.assert_allclose(lum, 76 / 127.5 - 1)  # ITU-R 601-2 luma of pure red: 0.299·255 ≈ 76


def test_preprocess_handles_any_pil_mode_and_is_deterministic():
    rgba = Image.new("RGBA", (12, 12), (0, 0, 0, 0))
    assert np.all(preprocess(rgba, size=4, channels=3) == 1.0)  # transparent → white
    img = rgb_noise(33, 27)
    assert np.array_equal(preprocess(img, size=16, channels=3), preprocess(img.copy(), size=16, channels=3))


def test_preprocess_validates_arguments():
    img = rgb_noise()
    with pytest.raises(ValueError, match="channels"):
        preprocess(img, size=16, channels=2)
    with pytest.raises(ValueError, match="size"):
        preprocess(img, size=0, channels=3)
    with pytest.raises(ValueError, match="resample"):
        preprocess(img, size=16, channels=3, resample="nearest")

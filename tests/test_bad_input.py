"""Bad input through the whole pipeline: every case is a named reason or a documented conversion,
the other audits finish, and `cdi-ray audit` exits 3 ("partial failure").

One batch holds every bad image and every bad collection/model next to good ones (the unit
checks of each decoder refusal and conversion are in tests/test_images.py; manifest errors in
tests/test_spec.py). Output locations are confined to the configured root (``--output-root`` /
``$CDI_RAY_OUTPUT_ROOT``): a manifest or flag that escapes it is refused before anything runs.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image

from cdi_ray.cli import EXIT_INVALID, EXIT_OK, EXIT_PARTIAL, main
from cdi_ray.spec import OUTPUT_ROOT_ENV, ManifestError, parse_manifest
from _pipeline_helpers import env, write_images

FAST = {"dl": {"n_draws": 2}}
TEST = {"procedure": "split", "min_samples": 2}


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width × height, with no pixel data (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


#: file name → reason prefix of the images refused (named errors).
REFUSED = {
    "zero-bytes.png": "the file is empty",
    "truncated.png": "truncated or corrupt image data",
    "truncated.jpg": "truncated or corrupt image data",
    "notes.png": "not a recognised image format",
    "bomb.png": "decompression bomb",
}
#: images converted, not refused (images.py's documented policies).
CONVERTED = ["palette.png", "rgba.png", "cmyk.jpg", "gray16.png", "small-8x8.png", "rgb.png"]


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    rng = np.random.default_rng(7)
    p, u = root / "p", root / "u"
    write_images(p, 6, seed=31)
    write_images(u, 8, seed=32)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB")
    good = encoded(rgb)
    big_jpeg = encoded(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB"), "JPEG")
    files = {
        "zero-bytes.png": b"",
        "truncated.png": encoded(rgb)[:60],
        "truncated.jpg": big_jpeg[: len(big_jpeg) // 2],
        "notes.png": b"these are my notes, not an image",
        "bomb.png": png_header_only(20_000, 20_000),
        "palette.png": encoded(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
        "rgba.png": encoded(Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA")),
        "cmyk.jpg": encoded(Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "CMYK"), "JPEG"),
        "gray16.png": encoded(Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16))),
        "small-8x8.png": encoded(Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L")),
        "rgb.png": good,
    }
    for name, data in files.items():
        (p / name).write_bytes(data)
    shutil.copy(u / "0000.png", p / "also-in-u.png")  # the same bytes in P and U
    (root / "empty").mkdir()
    (root / "empty" / "README.txt").write_text("no images here")
    write_images(root / "two", 2, seed=33)
    write_images(root / "gray", 6, seed=34)
    return root


@pytest.fixture(scope="module")
def bad_models(tiny_pixel_dir, tmp_path_factory):
    """A pixel-DDPM directory whose UNet config is not JSON, and a directory of an unknown family."""
    root = tmp_path_factory.mktemp("bad-models")
    shutil.copytree(tiny_pixel_dir, root / "broken-model")
    (root / "broken-model" / "unet" / "config.json").write_text("{ this is not json")
    (root / "alien-model").mkdir()
    (root / "alien-model" / "model_index.json").write_text(json.dumps({"_class_name": "AlienPipeline", "brain": ["x", "y"]}))
    return root


def audit(aid, model, p, u, **kw):
    return {"id": aid, "model": model, "published": str(p), "unpublished": str(u), "overrides": FAST, "test": TEST, **kw}


def test_bad_input_batch_partial_failure(ray_session, tiny_pixel_dir, collections, bad_models, tmp_path, capsys):
    from cdi_ray.models.testing import make_tiny_pixel_ddpm

    rgb_model = make_tiny_pixel_ddpm(tmp_path / "rgb-model", image_size=16, channels=3)
    c = collections
    man = {
        "models": {"gray": {"uri": str(tiny_pixel_dir), "access": "gray-box", "batch_size": 8},
                   "rgb": {"uri": str(rgb_model), "access": "gray-box", "batch_size": 8},
                   "broken": {"uri": str(bad_models / "broken-model"), "access": "gray-box"},
                   "alien": {"uri": str(bad_models / "alien-model"), "access": "gray-box"}},
        "audits": [audit("messy", "gray", c / "p", c / "u"),           # bad files among good ones; RGB → gray
                   audit("gray-on-rgb", "rgb", c / "u", c / "gray"),     # gray images for an RGB model
                   audit("empty", "gray", c / "empty", c / "u"),
                   audit("missing", "gray", c / "nowhere", c / "u"),
                   audit("too-few", "gray", c / "two", c / "u"),        # |P| = 2 < the split procedure's 4
                   audit("broken-model", "broken", c / "u", c / "two"),
                   audit("unknown-family", "alien", c / "u", c / "two")],
        "output": "results",
    }
    root = tmp_path / "root"
    root.mkdir()
    path = root / "manifest.yaml"
    path.write_text(yaml.safe_dump(man))
    assert main(["audit", str(path), "--output-root", str(root)]) == EXIT_PARTIAL
    assert "7 audits: 2 done, 5 failed" in capsys.readouterr().out

    results = json.loads((root / "results" / "results.json").read_text())
    by_id = {a["audit_id"]: a for a in results["audits"]}
    messy = by_id["messy"]
    assert messy["status"] == "done"
    reasons = {os.path.basename(u["uri"]): (u["set"], u["reason"]) for u in messy["unusable_images"]}
    for name, why in REFUSED.items():
        assert reasons[name][0] == "published" and why in reasons[name][1], (name, reasons[name])
    assert reasons["also-in-u.png"][1].startswith("in_both_sets")
    assert set(reasons) == set(REFUSED) | {"also-in-u.png", "0000.png"}  # 0000.png: U's side of the shared image
    assert messy["n_published"] == 6 + len(CONVERTED) and messy["n_unpublished"] == 7
    assert (by_id["gray-on-rgb"]["status"], by_id["gray-on-rgb"]["n_published"]) == ("done", 8)
    assert "no image files under" in by_id["empty"]["error"]
    assert "does not exist" in by_id["missing"]["error"]
    assert "published has 2 samples" in by_id["too-few"]["error"] and "needs at least 4" in by_id["too-few"]["error"]
    assert "model 'broken'" in by_id["broken-model"]["error"] and "cannot load model" in by_id["broken-model"]["error"]
    assert "Fix: re-save the component" in by_id["broken-model"]["error"] and "broken-model/unet" in by_id["broken-model"]["error"]
    assert "matches no supported model family" in by_id["unknown-family"]["error"]
    assert all(by_id[a]["verdict"] == "inconclusive" for a in ("empty", "missing", "too-few", "broken-model", "unknown-family"))


# ---------------------------------------------------------------------------------------------- output root
def small(output: str, **extra) -> dict:
    return {"models": {"m": {"uri": "s3://models/m"}},
            "audits": [{"id": "a", "model": "m", "published": "s3://b/p/", "unpublished": "s3://b/u/"}],
            "output": output, **extra}


def test_outputs_outside_the_configured_root_are_refused(tmp_path):
    root = tmp_path / "audits"
    with pytest.raises(ManifestError) as exc:
        parse_manifest(small("../../elsewhere", feature_store="/tmp/features"), base_dir=str(root / "night"), root=str(root))
    fix = f"is outside the configured output root '{root}' — write it under the root (set by --output-root or ${OUTPUT_ROOT_ENV})"
    assert exc.value.problems == [f"output: '{tmp_path / 'elsewhere'}' {fix}", f"feature_store: '/tmp/features' {fix}"]
    # inside the root: fine, relative or absolute; a sibling with the root as a name prefix is outside
    assert parse_manifest(small("night/1"), base_dir=str(root), root=str(root)).output == str(root / "night" / "1")
    with pytest.raises(ManifestError, match="outside the configured output root"):
        parse_manifest(small(str(tmp_path / "audits-other")), root=str(root))
    # a symlink inside the root that points outside is outside
    root.mkdir()
    os.symlink(tmp_path, root / "escape")
    with pytest.raises(ManifestError, match="outside"):
        parse_manifest(small(str(root / "escape" / "x")), root=str(root))
    # S3 roots: bucket and key prefix, and no '..' segments
    assert parse_manifest(small("s3://audits/team-a/2026"), root="s3://audits/team-a").output == "s3://audits/team-a/2026"
    for bad in ("s3://audits/team-a/../team-b", "s3://audits/team-b/x", "s3://other/team-a", str(tmp_path)):
        with pytest.raises(ManifestError, match="outside the configured output root"):
            parse_manifest(small(bad), root="s3://audits/team-a")
    # the environment variable configures it too
    with env({OUTPUT_ROOT_ENV: "s3://audits/team-a"}):
        with pytest.raises(ManifestError, match="outside"):
            parse_manifest(small("s3://audits/team-b"))


def test_cli_refuses_outputs_outside_the_root(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    path = root / "m.yaml"
    path.write_text(yaml.safe_dump(small("../../etc/cdi")))
    assert main(["validate", str(path), "--output-root", str(root)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "output:" in err and "outside the configured output root" in err and "Traceback" not in err
    path.write_text(yaml.safe_dump(small("out")))
    assert main(["validate", str(path), "--output-root", str(root)]) == EXIT_OK
    # the audit command's own location flags are checked too, before any Ray starts
    assert main(["audit", str(path), "--output-root", str(root), "--out", str(tmp_path / "else")]) == EXIT_INVALID
    assert "--out:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- credentials
def test_manifests_cannot_carry_credentials():
    """Credentials come from the environment only: a manifest that tries to carry one is refused
    (free-form options are copied into every report's provenance)."""
    data = small("s3://o/x")
    data["models"]["m"]["uri"] = "s3://AKIAEXAMPLE:wJalrXUtnFEMI@models/m"
    data["models"]["m"]["options"] = {"aws_secret_access_key": "wJalrXUtnFEMI"}
    data["audits"][0]["test"] = {"options": {"auth": {"session_token": "x"}}}
    with pytest.raises(ManifestError) as exc:
        parse_manifest(data)
    p = exc.value.problems
    assert any(s.startswith("models.m.uri: an s3:// location carries credentials") for s in p), p
    assert any(s.startswith("models.m.options: options has credential-like key(s) ['aws_secret_access_key']") for s in p), p
    assert any(s.startswith("audits[0].test.options:") and "session_token" in s for s in p), p
    assert all("wJalrXUtnFEMI" not in s for s in p)  # the refusal does not echo the secret
    with pytest.raises(ManifestError, match="credentials: unknown key"):
        parse_manifest(small("s3://o/x", credentials={"key": "x"}))


def test_job_script_refuses_outputs_outside_the_root(tmp_path):
    """jobs/audit.py (what `ray job submit` runs) applies the same root, before Ray starts."""
    import subprocess
    import sys

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(small("out")))
    script = os.path.join(os.path.dirname(__file__), "..", "jobs", "audit.py")
    proc = subprocess.run([sys.executable, script, str(path), "--out", "/etc/cdi"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, OUTPUT_ROOT_ENV: str(tmp_path)})
    assert proc.returncode == EXIT_INVALID, proc.stderr
    assert "--out: '/etc/cdi' is outside the configured output root" in proc.stderr + proc.stdout

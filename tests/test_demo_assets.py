"""The bundled demo data and the two shipped demo models are intact and consistent."""
from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from cdi_ray.demo import DEMO_MODELS, BundleIntegrityError, demo_model_dir, load_bundle, load_split

MAX_MODEL_DIR_BYTES = 6 * 2**20     # a ~1.1 M-parameter fp32 UNet is ~4.5 MB


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(verify=True)


def _copy_bundle(bundle, tmp_path: Path) -> Path:
    src = Path(str(resources.files("cdi_ray").joinpath("demo_assets")))
    for name in ("fashion16.npz", "fashion16.json"):
        shutil.copy(src / name, tmp_path / name)
    return tmp_path / "fashion16.npz"


# --- the bundle ----------------------------------------------------------------------------------

def test_bundle_matches_recorded_hashes(bundle):
    meta = bundle.meta
    assert len(bundle) == meta["n"]
    assert bundle.images.shape == (meta["n"], 16, 16) and bundle.images.dtype == np.uint8
    for name in ("images", "labels", "source_index"):
        a = getattr(bundle, name)
        assert hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() == meta["arrays"][name]["sha256"]
    assert meta["licence"]["spdx"] == "MIT"
    assert bundle.images.flags.writeable is False


def test_bundle_pools_disjoint_balanced_and_covering(bundle):
    seen = np.zeros(len(bundle), dtype=int)
    for name in ("heldout", "easy", "hard"):
        idx = bundle.pool(name)
        seen[idx] += 1
        counts = np.bincount(bundle.labels[idx], minlength=10)
        assert (counts == counts[0]).all(), f"pool {name} is not class-balanced: {counts}"
    assert (seen == 1).all()
    assert len(bundle.pool("heldout")) >= 2000
    assert len(np.unique(bundle.source_index)) == len(bundle)        # no source image twice
    assert bundle.images_float(slice(0, 3)).shape == (3, 1, 16, 16)
    with pytest.raises(KeyError, match="valid pools"):
        bundle.pool("nope")


def test_corrupted_bundle_is_refused(bundle, tmp_path):
    npz = _copy_bundle(bundle, tmp_path)
    assert len(load_bundle(path=npz)) == len(bundle)                   # an intact copy loads
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.raises(BundleIntegrityError, match="sha256 .* does not match .*rebuild"):
        load_bundle(path=npz)
    npz.write_bytes(bytes(raw[: len(raw) // 3]))                       # truncated: unreadable even unverified
    with pytest.raises(BundleIntegrityError, match="cannot be read"):
        load_bundle(path=npz, verify=False)


def test_array_hash_mismatch_is_refused(bundle, tmp_path):
    npz = _copy_bundle(bundle, tmp_path)
    meta_path = npz.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["arrays"]["labels"]["sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BundleIntegrityError, match="'labels' sha256"):
        load_bundle(path=npz)


# --- the models' splits --------------------------------------------------------------------------

@pytest.mark.parametrize("name", DEMO_MODELS)
def test_split_disjoint_and_inside_bundle(bundle, name):
    split = load_split(name)
    members, heldout = np.asarray(split["members"]), np.asarray(split["heldout"])
    assert split["bundle"]["npz_sha256"] == bundle.meta["npz_sha256"]
    assert len(members) == split["n_members"] == len(set(members.tolist()))
    assert len(heldout) == split["n_heldout"] >= 2000
    assert members.min() >= 0 and max(members.max(), heldout.max()) < len(bundle)
    assert not set(members.tolist()) & set(heldout.tolist())
    assert set(members.tolist()) <= set(bundle.pool(name).tolist())
    assert set(heldout.tolist()) == set(bundle.pool("heldout").tolist())
    counts = np.bincount(bundle.labels[members], minlength=10)
    assert (counts == counts[0]).all()


def test_heldout_pool_disjoint_from_all_members(bundle):
    easy, hard = (set(load_split(n)["members"]) for n in ("easy", "hard"))
    held = set(bundle.pool("heldout").tolist())
    assert not held & easy and not held & hard and not easy & hard
    assert len(easy) == 500 and 2000 <= len(hard) <= 5000


# --- the models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DEMO_MODELS)
def test_model_loads_matches_hash_and_predicts_noise(bundle, name):
    from diffusers import DDPMScheduler, UNet2DModel

    d = demo_model_dir(name)
    split = load_split(name)
    weights = d / split["weights_file"]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == split["weights_sha256"]
    assert sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) < MAX_MODEL_DIR_BYTES
    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]

    sched = DDPMScheduler.from_pretrained(d / "scheduler")
    assert (sched.config.num_train_timesteps, sched.config.beta_schedule, sched.config.prediction_type) == \
        (1000, "linear", "epsilon")
    unet = UNet2DModel.from_pretrained(d / "unet").eval()
    assert sum(p.numel() for p in unet.parameters()) == split["n_parameters"]
    assert next(unet.parameters()).dtype == torch.float32
    x = torch.from_numpy(bundle.images_float(np.asarray(split["members"][:2])))
    with torch.inference_mode():
        eps_hat = unet(x, torch.tensor([100, 500])).sample
    assert eps_hat.shape == (2, 1, 16, 16) and torch.isfinite(eps_hat).all()


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_model_loads_through_cdi_ray_loader(bundle, name):
    loader = pytest.importorskip("cdi_ray.models.loader")
    from cdi_ray.models.base import ImageMeta

    model = loader.load_model(demo_model_dir(name), device="cpu")
    assert tuple(model.latent_shape) == (1, 16, 16)
    x = torch.from_numpy(bundle.images_float(slice(0, 2)))
    z = model.encode(x)
    with torch.inference_mode():
        cond = model.conditioning([ImageMeta(content_hash="a"), ImageMeta(content_hash="b")])
        eps_hat = model.predict_noise(z, torch.tensor([100, 100]), cond)
    assert eps_hat.shape == (2, 1, 16, 16)


def test_unknown_demo_model_name():
    with pytest.raises(ValueError, match="must be one of"):
        demo_model_dir("medium")

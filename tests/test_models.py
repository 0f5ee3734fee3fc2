"""Model adapters: every family round-trips save_pretrained → load_model and behaves as METHOD.md Step 1 says."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from cdi_ray.models import FAMILIES, DiffusionModel, ImageMeta, ModelLoadError, detect_family, load_model
from cdi_ray.models import fingerprint as fp
from cdi_ray.models import testing
from cdi_ray.seeding import image_generators

FAMILY_DIRS = {
    "tiny_pixel_dir": ("pixel-ddpm", (1, 16, 16), 1),
    "tiny_pixel_class_dir": ("pixel-ddpm", (3, 16, 16), 3),
    "tiny_latent_kl_dir": ("latent-unet", (4, 8, 8), 3),
    "tiny_latent_vq_dir": ("latent-unet", (3, 8, 8), 3),
    "tiny_dit_dir": ("dit", (4, 8, 8), 3),
    "tiny_t2i_dir": ("text-to-image", (4, 8, 8), 3),
    "tiny_uvit_class_dir": ("uvit", (4, 8, 8), 3),
    "tiny_uvit_text_dir": ("uvit", (4, 8, 8), 3),
}
HASHES = ["aa" * 32, "bb" * 32, "cc" * 32]
CAPTIONS = [("a photo of a cat",), ("a dog", "two dogs on grass"), ("",)]


def metas(labels=(1, 2, 3)):
    """Labels for class models, captions for text models (each family reads what it needs)."""
    return [ImageMeta(content_hash=h, label=lab, captions=c) for h, lab, c in zip(HASHES, labels, CAPTIONS)]


def images(model: DiffusionModel, n: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, model.image_channels, model.image_size, model.image_size, generator=g) * 2 - 1


def copy_dir(src, tmp_path, name="model"):
    return shutil.copytree(src, tmp_path / name)


# -- every family: round trip, shapes, interface ---------------------------------------------------

@pytest.mark.parametrize("fixture", list(FAMILY_DIRS))
def test_round_trip_and_shapes(fixture, request):
    path = request.getfixturevalue(fixture)
    family, latent_shape, channels = FAMILY_DIRS[fixture]
    model = load_model(path)
    assert isinstance(model, DiffusionModel)
    assert model.family == family and detect_family(path) == family
    assert model.latent_shape == latent_shape
    assert (model.image_size, model.image_channels) == (16, channels)
    assert model.alphas_cumprod.dtype == torch.float64 and model.num_train_timesteps == 1000
    assert len(model.fingerprint) == 64
    # frozen and in eval mode
    modules = [m for m in vars(model).values() if isinstance(m, torch.nn.Module)]
    assert modules and all(not m.training for m in modules)
    assert all(not p.requires_grad for m in modules for p in m.parameters())

    x = images(model)
    z = model.encode(x, image_generators(0, HASHES, "posterior"))
    assert z.shape == (3, *latent_shape) and z.dtype == torch.float32
    cond = model.conditioning(metas())
    assert (cond is None) == (model.conditioning_kind == "none")
    for t in (100, torch.tensor(100), torch.full((3,), 100, dtype=torch.long), torch.tensor([0, 500, 999])):
        eps = model.predict_noise(z, t, cond)
        assert eps.shape == (3, *latent_shape) and eps.dtype == torch.float32
        assert torch.isfinite(eps).all()
    # the same t given as an int or as a (B,) tensor gives the same prediction
    torch.testing.assert_close(model.predict_noise(z, 100, cond),
                               model.predict_noise(z, torch.full((3,), 100, dtype=torch.long), cond))
    # differentiable w.r.t. z_t, although the parameters are frozen
    z_t = z.clone().requires_grad_(True)
    model.predict_noise(z_t, 100, cond).square().sum().backward()
    assert z_t.grad is not None and z_t.grad.abs().sum() > 0


@pytest.mark.parametrize("fixture", list(FAMILY_DIRS))
def test_prediction_is_batch_invariant(fixture, request):
    model = load_model(request.getfixturevalue(fixture))
    z = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = model.conditioning(metas())
    full = model.predict_noise(z, 300, cond)
    one = model.predict_noise(z[1:2], 300, model.select(cond, slice(1, 2)))
    torch.testing.assert_close(full[1:2], one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixture", list(FAMILY_DIRS))
def test_meta_problem_matches_what_conditioning_refuses(fixture, request):
    model = load_model(request.getfixturevalue(fixture))
    assert all(model.meta_problem(m) is None for m in metas())
    bare = ImageMeta("dd" * 32)
    problem = model.meta_problem(bare)
    if model.conditioning_kind == "none":
        assert problem is None
    else:
        assert problem is not None and "dd" * 32 in problem
        with pytest.raises(ValueError, match="no (class label|caption)"):
            model.conditioning([bare])
    if model.conditioning_kind == "class":
        assert "outside" in model.meta_problem(ImageMeta("ee" * 32, label=99))


def test_bad_inputs_are_refused(tiny_pixel_dir):
    model = load_model(tiny_pixel_dir)
    z = torch.randn(2, *model.latent_shape)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        model.predict_noise(z, 1000, None)
    with pytest.raises(ValueError, match="shape"):
        model.predict_noise(z, torch.tensor([1, 2, 3]), None)
    with pytest.raises(ValueError, match="must have shape"):
        model.predict_noise(torch.randn(2, 3, 16, 16), 10, None)
    with pytest.raises(ValueError, match="preprocess"):
        model.encode(torch.randn(2, 1, 32, 32))


# -- pixel ---------------------------------------------------------------------------------------

def test_pixel_encode_is_identity(tiny_pixel_dir):
    model = load_model(tiny_pixel_dir)
    x = images(model)
    assert torch.equal(model.encode(x), x)
    assert torch.equal(model.encode(x, image_generators(0, HASHES, "posterior")), x)


def test_pixel_learned_variance_keeps_eps_half(tmp_path):
    model = load_model(testing.make_tiny_pixel_ddpm(tmp_path / "m", learned_variance=True))
    assert model.unet.config.out_channels == 2
    z = torch.randn(2, *model.latent_shape)
    eps = model.predict_noise(z, 50, None)
    assert eps.shape == z.shape
    torch.testing.assert_close(eps, model.unet(z, torch.tensor([50, 50])).sample[:, :1])


def test_v_prediction_is_converted_to_eps(tmp_path):
    path = testing.make_tiny_pixel_ddpm(tmp_path / "m")
    cfg_file = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_file.write_text(json.dumps(cfg))
    model = load_model(path)
    assert model.prediction_type == "v_prediction"
    z_t = torch.randn(2, *model.latent_shape)
    v = model.unet(z_t, torch.tensor([400, 400])).sample
    ab = model.alphas_cumprod[400].float()
    torch.testing.assert_close(model.predict_noise(z_t, 400, None), ab.sqrt() * v + (1 - ab).sqrt() * z_t)


def test_bfloat16_weights_return_float32(tiny_pixel_dir):
    ref = load_model(tiny_pixel_dir)
    model = load_model(tiny_pixel_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.unet.parameters())
    z = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    eps = model.predict_noise(z, 100, None)
    assert eps.dtype == torch.float32
    ref_eps = ref.predict_noise(z, 100, None)
    assert (eps - ref_eps).norm() / ref_eps.norm() < 0.05


# -- class conditioning --------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_pixel_class_dir", "tiny_dit_dir", "tiny_uvit_class_dir"])
def test_class_prediction_depends_on_label(fixture, request):
    model = load_model(request.getfixturevalue(fixture))
    assert model.conditioning_kind == "class"
    z = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    a = model.predict_noise(z, 200, model.conditioning(metas((0, 1, 2))))
    b = model.predict_noise(z, 200, model.conditioning(metas((3, 1, 4))))
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[2], b[2])
    torch.testing.assert_close(a[1], b[1])


@pytest.mark.parametrize("fixture", ["tiny_pixel_class_dir", "tiny_dit_dir", "tiny_uvit_class_dir"])
def test_missing_or_out_of_range_label_names_the_image(fixture, request):
    model = load_model(request.getfixturevalue(fixture))
    with pytest.raises(ValueError, match=HASHES[1]):
        model.conditioning(metas((0, None, 2)))
    with pytest.raises(ValueError, match=f"{HASHES[2]}.*99"):
        model.conditioning(metas((0, 1, 99)))


def test_unconditional_models_give_none(tiny_pixel_dir, tiny_latent_kl_dir, tiny_latent_vq_dir):
    for path in (tiny_pixel_dir, tiny_latent_kl_dir, tiny_latent_vq_dir):
        model = load_model(path)
        assert model.conditioning_kind == "none" and model.conditioning(metas((None, None, None))) is None


def test_dit_null_class(tiny_dit_dir):
    model = load_model(tiny_dit_dir, missing_label="null")
    assert model.null_class == model.num_classes == 10
    labels = model.conditioning(metas((3, None, 5)))
    assert labels.tolist() == [3, 10, 5]
    with pytest.raises(ValueError, match=HASHES[2]):  # out of range is still an error
        model.conditioning(metas((3, None, 10)))
    z = torch.randn(3, *model.latent_shape)
    assert model.predict_noise(z, 10, labels).shape == z.shape
    assert model.class_names[3] == "class_3"


def test_null_option_needs_a_null_class(tiny_pixel_class_dir):
    with pytest.raises(ModelLoadError, match="null class"):
        load_model(tiny_pixel_class_dir, missing_label="null")
    model = load_model(tiny_pixel_class_dir, missing_label="null", null_class=4)
    assert model.conditioning(metas((0, None, 1))).tolist() == [0, 4, 1]


def test_unknown_option_lists_valid_ones(tiny_dit_dir):
    with pytest.raises(ValueError, match="missing_label"):
        load_model(tiny_dit_dir, vq_scaling="config")
    with pytest.raises(ValueError, match="valid"):
        load_model(tiny_dit_dir, family="nope")


# -- DiT -----------------------------------------------------------------------------------------

def test_dit_keeps_eps_half(tiny_dit_dir):
    model = load_model(tiny_dit_dir)
    assert model.transformer.config.out_channels == 2 * model.latent_shape[0]
    z = torch.randn(2, *model.latent_shape)
    labels = torch.tensor([1, 2])
    full = model.transformer(z, timestep=torch.tensor([100, 100]), class_labels=labels).sample
    assert full.shape[1] == 8
    torch.testing.assert_close(model.predict_noise(z, 100, labels), full[:, :4])


def test_dit_without_learned_sigma(tmp_path):
    model = load_model(testing.make_tiny_dit(tmp_path / "m", learned_sigma=False, num_classes=3))
    z = torch.randn(2, *model.latent_shape)
    assert model.predict_noise(z, 5, torch.tensor([0, 3])).shape == z.shape


def test_dit_legacy_transformer2d_name(tmp_path, tiny_dit_dir):
    path = copy_dir(tiny_dit_dir, tmp_path)
    (path / "model_index.json").unlink()
    cfg_file = path / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["_class_name"] = "Transformer2DModel"
    cfg_file.write_text(json.dumps(cfg))
    assert load_model(path).family == "dit"


# -- latent encoders -----------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["tiny_latent_kl_dir", "tiny_dit_dir", "tiny_t2i_dir", "tiny_uvit_text_dir"])
def test_kl_encode_sample_vs_mean(fixture, request):
    model = load_model(request.getfixturevalue(fixture))
    vae = getattr(model, "autoencoder", None) or model.vae
    x = images(model)
    mean = model.encode(x)  # generators=None → posterior mean
    posterior = vae.encode(x).latent_dist
    torch.testing.assert_close(mean, posterior.mean * vae.config.scaling_factor)
    s1 = model.encode(x, image_generators(0, HASHES, "posterior"))
    s1_again = model.encode(x, image_generators(0, HASHES, "posterior"))
    s2 = model.encode(x, image_generators(1, HASHES, "posterior"))
    assert torch.equal(s1, s1_again)  # same generators → same latent
    assert not torch.allclose(s1, s2)  # another seed → another sample
    assert not torch.allclose(s1, mean)
    # the sample is mean + std·ε with ε drawn from each image's generator
    noise = (s1 / vae.config.scaling_factor - posterior.mean) / posterior.std
    g = image_generators(0, HASHES[1:2], "posterior")[0]
    torch.testing.assert_close(noise[1], torch.randn(model.latent_shape, generator=g), rtol=1e-3, atol=1e-3)
    # an image's latent does not depend on its batch
    alone = model.encode(x[2:3], image_generators(0, HASHES[2:3], "posterior"))
    torch.testing.assert_close(alone, s1[2:3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one generator per image"):
        model.encode(x, image_generators(0, HASHES[:2], "posterior"))


def test_vq_latent_is_pre_quantisation(tiny_latent_vq_dir):
    model = load_model(tiny_latent_vq_dir)
    assert model.autoencoder_kind == "vq" and model.latent_scale == 1.0
    x = images(model)
    z = model.encode(x)
    torch.testing.assert_close(z, model.autoencoder.encode(x).latents)
    quantised = model.autoencoder.quantize(z)[0]
    assert not torch.allclose(z, quantised)
    # deterministic: generators are not used
    assert torch.equal(z, model.encode(x, image_generators(0, HASHES, "posterior")))
    scaled = load_model(tiny_latent_vq_dir, vq_scaling="config")
    sf = scaled.autoencoder.config.scaling_factor
    torch.testing.assert_close(scaled.encode(x), z * sf)


# -- fingerprint ---------------------------------------------------------------------------------

def test_fingerprint_stable_and_reproducible(tmp_path, tiny_pixel_dir):
    a = fp.model_fingerprint(tiny_pixel_dir)
    assert a == fp.model_fingerprint(tiny_pixel_dir) == load_model(tiny_pixel_dir).fingerprint
    # the builders are deterministic: same arguments → byte-identical files → same fingerprint
    assert fp.model_fingerprint(testing.make_tiny_pixel_ddpm(tmp_path / "again")) == a
    assert fp.model_fingerprint(testing.make_tiny_pixel_ddpm(tmp_path / "seed1", seed=1)) != a
    # files that are neither config nor weights, and hidden files, do not count
    copy = copy_dir(tiny_pixel_dir, tmp_path)
    (copy / "README.md").write_text("model card")
    (copy / ".cache").mkdir()
    (copy / ".cache" / "x.json").write_text("{}")
    (copy / "unet" / ".lock.json").write_text("{}")
    assert fp.model_fingerprint(copy) == a


def test_fingerprint_changes_with_a_weight(tmp_path, tiny_pixel_dir):
    from safetensors.torch import load_file, save_file

    path = copy_dir(tiny_pixel_dir, tmp_path)
    before = fp.model_fingerprint(path)
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1e-3
    save_file(state, weights, metadata={"format": "pt"})
    assert fp.model_fingerprint(path) != before
    # and a config edit too
    cfg = path / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace("0.02", "0.021"))
    assert len({before, fp.model_fingerprint(path)}) == 2


def test_fingerprint_second_call_uses_cache(tmp_path, tiny_dit_dir, monkeypatch):
    path = copy_dir(tiny_dit_dir, tmp_path)
    first = fp.model_fingerprint(path)

    def no_reads(*args, **kwargs):
        raise AssertionError("file re-read although unchanged")

    monkeypatch.setattr(fp, "open", no_reads, raising=False)
    assert fp.model_fingerprint(path) == first


# -- bad model directories: one ModelLoadError naming path, problem and fix ----------------------

def assert_clean_error(excinfo, *needles):
    msg = str(excinfo.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    assert "Fix:" in msg
    exc = excinfo.value  # no chained traceback: `raise … from None`
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError) as ei:
        load_model(tmp_path / "nope")
    assert_clean_error(ei, str(tmp_path / "nope"), "does not exist", *FAMILIES)


def test_empty_or_unknown_directory_lists_families(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError) as ei:
        load_model(tmp_path / "empty")
    assert_clean_error(ei, str(tmp_path / "empty"), "matches no supported model family", "empty directory",
                       *FAMILIES, "unet/", "transformer/", "vqvae/")
    # an SDXL layout (two text encoders) is recognised as unsupported, and what was found is listed
    sd = tmp_path / "sdxl"
    (sd / "unet").mkdir(parents=True)
    (sd / "text_encoder").mkdir()
    (sd / "text_encoder_2").mkdir()
    (sd / "vae").mkdir()
    (sd / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelLoadError) as ei:
        load_model(sd)
    assert_clean_error(ei, str(sd), "StableDiffusionXLPipeline", "UNet2DConditionModel", "text_encoder_2/")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError) as ei:
        load_model(f)
    assert_clean_error(ei, str(f), "not a directory")


def test_missing_scheduler(tmp_path, tiny_pixel_dir):
    path = copy_dir(tiny_pixel_dir, tmp_path)
    shutil.rmtree(path / "scheduler")
    with pytest.raises(ModelLoadError) as ei:
        load_model(path)
    assert_clean_error(ei, str(path), "scheduler/", "save_pretrained")


def test_missing_unet_config(tmp_path, tiny_pixel_dir):
    path = copy_dir(tiny_pixel_dir, tmp_path)
    (path / "unet" / "config.json").unlink()
    (path / "model_index.json").unlink()
    with pytest.raises(ModelLoadError) as ei:
        load_model(path)
    assert_clean_error(ei, str(path), "unet/config.json")


def test_missing_vae_subfolder(tmp_path, tiny_dit_dir):
    path = copy_dir(tiny_dit_dir, tmp_path)
    shutil.rmtree(path / "vae")
    with pytest.raises(ModelLoadError) as ei:
        load_model(path)
    assert_clean_error(ei, str(path), "vae/", "AutoencoderKL")


def test_missing_weights(tmp_path, tiny_latent_kl_dir):
    path = copy_dir(tiny_latent_kl_dir, tmp_path)
    (path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as ei:
        load_model(path)
    assert_clean_error(ei, str(path), "no weights in 'vae/'")


def test_corrupt_weights(tmp_path, tiny_pixel_dir):
    path = copy_dir(tiny_pixel_dir, tmp_path)
    (path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError) as ei:
        load_model(path)
    assert_clean_error(ei, str(path), "'unet/'", "do not load")


def test_weights_that_do_not_match_config(tmp_path, tiny_pixel_dir):
    path = copy_dir(tiny_pixel_dir, tmp_path)
    cfg_file = path / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["block_out_channels"] = [8, 16]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as ei:
        load_model(path)
    assert_clean_error(ei, str(path), "unet/")


def test_both_autoencoders(tmp_path, tiny_latent_kl_dir, tiny_latent_vq_dir):
    path = copy_dir(tiny_latent_kl_dir, tmp_path)
    shutil.copytree(tiny_latent_vq_dir / "vqvae", path / "vqvae")
    with pytest.raises(ModelLoadError) as ei:
        load_model(path)
    assert_clean_error(ei, str(path), "vae/", "vqvae/", "ambiguous")


def test_detection_without_model_index(tmp_path, tiny_pixel_dir, tiny_latent_vq_dir, tiny_dit_dir):
    for src, family in ((tiny_pixel_dir, "pixel-ddpm"), (tiny_latent_vq_dir, "latent-unet"), (tiny_dit_dir, "dit")):
        path = copy_dir(src, tmp_path, family)
        (path / "model_index.json").unlink()
        assert detect_family(path) == family


# -- builders ------------------------------------------------------------------------------------

def test_builders_leave_global_rng_alone(tmp_path):
    state = torch.random.get_rng_state()
    testing.make_tiny_latent_kl(tmp_path / "m", seed=3)
    assert torch.equal(state, torch.random.get_rng_state())


def test_tiny_models_are_fast(tiny_latent_kl_dir, tiny_dit_dir, tiny_pixel_class_dir):
    # Typically ~0.05 s each on one CPU thread; the bound leaves room for a loaded CI box.
    for path in (tiny_latent_kl_dir, tiny_dit_dir, tiny_pixel_class_dir):
        t0 = time.perf_counter()
        model = load_model(path)
        x = images(model, n=4)
        z = model.encode(x, image_generators(0, HASHES + ["dd" * 32], "posterior"))
        model.predict_noise(z, 100, model.conditioning(metas((0, 1, 2)) + [ImageMeta("dd" * 32, 3)]))
        assert time.perf_counter() - t0 < 2.0

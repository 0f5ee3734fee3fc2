"""Caption-conditioned models: which caption an image gets, what a missing caption does, the embedding cache,
and the text-to-image family's memory options (they must not change the features)."""
from __future__ import annotations

import shutil

import pytest
import torch

from cdi_ray.models import ImageMeta, ModelLoadError, load_model
from cdi_ray.models.text import choose_captions
from cdi_ray.seeding import image_generators

TEXT_FIXTURES = ["tiny_t2i_dir", "tiny_uvit_text_dir"]


def gens(seed, metas):
    return image_generators(seed, [m.content_hash for m in metas], "cond")


def test_caption_choice_depends_only_on_seed_and_image():
    many = tuple(f"caption {j}" for j in range(10))
    metas = [ImageMeta(f"{i:064x}", captions=many) for i in range(12)]
    chosen = choose_captions(metas, gens(0, metas), "error")
    assert chosen == choose_captions(metas, gens(0, metas), "error")
    # the same image alone, or elsewhere in another batch, gets the same caption
    assert choose_captions(metas[5:6], gens(0, metas[5:6]), "error") == [chosen[5]]
    assert choose_captions(metas[::-1], gens(0, metas[::-1]), "error") == chosen[::-1]
    # the choice really is random over images and seeds (not always the first caption)
    assert len(set(chosen)) > 3
    assert choose_captions(metas, gens(1, metas), "error") != chosen
    # one caption: always it; no generators: the first
    assert choose_captions([ImageMeta("a", captions=("only",))], gens(3, [ImageMeta("a")]), "error") == ["only"]
    assert choose_captions(metas[:2], None, "error") == ["caption 0", "caption 0"]


def test_missing_caption_is_an_error_unless_empty_prompt_is_asked():
    metas = [ImageMeta("aa" * 32, captions=("a cat",)), ImageMeta("bb" * 32)]
    with pytest.raises(ValueError, match=r"bb{32}.*no caption.*missing_caption='empty'"):
        choose_captions(metas, gens(0, metas), "error")
    assert choose_captions(metas, gens(0, metas), "empty") == ["a cat", ""]
    with pytest.raises(ValueError, match="not text"):
        choose_captions([ImageMeta("cc", captions=(3,))], None, "error")


@pytest.mark.parametrize("fixture", TEXT_FIXTURES)
def test_prediction_depends_on_the_caption(fixture, request):
    model = load_model(request.getfixturevalue(fixture))
    assert model.conditioning_kind == "text"
    metas = [ImageMeta(h, captions=(c,)) for h, c in (("a", "a red car"), ("b", "a red car"), ("c", "a blue boat"))]
    cond = model.conditioning(metas, gens(0, metas))
    z = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(0)).expand(3, -1, -1, -1)
    eps = model.predict_noise(z, 300, cond)
    torch.testing.assert_close(eps[0], eps[1])
    assert not torch.allclose(eps[0], eps[2], atol=1e-5)


@pytest.mark.parametrize("fixture", TEXT_FIXTURES)
def test_missing_caption_option_uses_the_empty_prompt(fixture, request):
    path = request.getfixturevalue(fixture)
    strict = load_model(path)
    with pytest.raises(ValueError, match="no caption"):
        strict.conditioning([ImageMeta("dd" * 32)])
    lenient = load_model(path, missing_caption="empty")
    torch.testing.assert_close(lenient.conditioning([ImageMeta("dd" * 32)]),
                               strict.conditioning([ImageMeta("ee" * 32, captions=("",))]))
    with pytest.raises(ModelLoadError, match="missing_caption"):
        load_model(path, missing_caption="skip")


@pytest.mark.parametrize("fixture", TEXT_FIXTURES)
def test_each_caption_is_embedded_once(fixture, request):
    model = load_model(request.getfixturevalue(fixture), caption_cache_size=2)
    enc = model.text_encoder
    metas = [ImageMeta(h, captions=(c,)) for h, c in (("a", "one"), ("b", "two"), ("c", "one"))]
    first = model.conditioning(metas)
    assert enc.encoded == 2  # "one" twice in the batch → encoded once
    again = model.conditioning(metas)  # the next feature config of the actor asks again
    assert enc.encoded == 2 and torch.equal(first, again)
    model.conditioning([ImageMeta("d", captions=("three",))])  # evicts the least recently used: "two"
    assert enc.encoded == 3 and len(enc._cache) == 2
    torch.testing.assert_close(model.conditioning(metas[:1]), first[:1])  # "one" is still cached
    assert enc.encoded == 3
    torch.testing.assert_close(model.conditioning(metas[1:2]), first[1:2])  # "two" is embedded again
    assert enc.encoded == 4
    # a cached embedding equals a freshly computed one (batching captions together does not change it)
    fresh = load_model(request.getfixturevalue(fixture))
    torch.testing.assert_close(fresh.conditioning(metas[1:2]), first[1:2])


def test_memory_options_leave_predictions_unchanged(tiny_t2i_dir):
    plain = load_model(tiny_t2i_dir)
    lean = load_model(tiny_t2i_dir, attention_slicing=1, vae_slicing=True)
    metas = [ImageMeta(f"{i:064x}", captions=(f"caption {i}",)) for i in range(3)]
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    g = image_generators(0, [m.content_hash for m in metas], "encode")
    z = plain.encode(x, g)
    torch.testing.assert_close(lean.encode(x, image_generators(0, [m.content_hash for m in metas], "encode")), z,
                               rtol=1e-5, atol=1e-5)
    cond = plain.conditioning(metas)
    torch.testing.assert_close(lean.predict_noise(z, 500, cond), plain.predict_noise(z, 500, cond), rtol=1e-4, atol=1e-5)


def test_half_precision_weights_return_float32(tiny_t2i_dir):
    ref = load_model(tiny_t2i_dir)
    model = load_model(tiny_t2i_dir, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.unet.parameters())
    assert all(p.dtype == torch.float32 for p in model.vae.parameters())
    metas = [ImageMeta("aa", captions=("a cat",)), ImageMeta("bb", captions=("a dog",))]
    cond = model.conditioning(metas)
    assert cond.dtype == torch.bfloat16
    z = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    eps = model.predict_noise(z, 100, cond)
    ref_eps = ref.predict_noise(z, 100, ref.conditioning(metas))
    assert eps.dtype == torch.float32
    assert (eps - ref_eps).norm() / ref_eps.norm() < 0.05


@pytest.mark.parametrize("fixture,part", [("tiny_t2i_dir", "tokenizer"), ("tiny_t2i_dir", "text_encoder"),
                                          ("tiny_uvit_text_dir", "tokenizer")])
def test_missing_text_part_is_named(fixture, part, request, tmp_path):
    path = shutil.copytree(request.getfixturevalue(fixture), tmp_path / "m")
    shutil.rmtree(path / part)
    with pytest.raises(ModelLoadError, match=f"'{part}/'.*Fix:"):
        load_model(path, family="text-to-image" if "t2i" in fixture else "uvit")


def test_text_width_mismatch_is_refused(tiny_t2i_dir, tmp_path):
    from cdi_ray.models import testing

    other = testing.make_tiny_text2image(tmp_path / "other", text_width=16)
    path = shutil.copytree(tiny_t2i_dir, tmp_path / "m")
    shutil.rmtree(path / "text_encoder")
    shutil.copytree(other / "text_encoder", path / "text_encoder")
    with pytest.raises(ModelLoadError, match="32-dim text embeddings but the text encoder gives 16"):
        load_model(path)


def test_memory_options_do_not_change_the_store_partition():
    from cdi_ray.features.config import FeatureConfig
    from cdi_ray.pipeline.plan import store_key
    from cdi_ray.spec import ModelSpec

    config = FeatureConfig(features="gray-box")
    plain = ModelSpec(uri="s3://models/sd")
    lean = ModelSpec(uri="s3://models/sd", options={"attention_slicing": "auto", "vae_slicing": True,
                                                     "caption_cache_size": 64})
    assert store_key(config, lean) == store_key(config, plain) == config.config_hash()
    # options that change values still do
    empty = ModelSpec(uri="s3://models/sd", options={"missing_caption": "empty", "attention_slicing": "auto"})
    assert store_key(config, empty) != store_key(config, plain)
    assert store_key(config, empty) == store_key(config, ModelSpec(uri="s3://models/sd", options={"missing_caption": "empty"}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sd15_sized_model_in_half_precision_on_gpu(tmp_path):
    """Stable Diffusion 1.5's sizes (random weights), fp16 + attention/VAE slicing, 512² images in a batch of 4:
    every white-box feature is finite, and the same image alone gives the same row."""
    import numpy as np

    from cdi_ray.features.config import FeatureConfig
    from cdi_ray.features.extractor import FeatureExtractor
    from cdi_ray.models import testing

    path = testing.make_sd15_shaped(tmp_path / "sd15", dtype=torch.float16, device="cuda")
    model = load_model(path, device="cuda", dtype="float16", attention_slicing="auto", vae_slicing=True)
    assert sum(p.numel() for p in model.unet.parameters()) > 8e8
    ext = FeatureExtractor(model, FeatureConfig(features="white-box", device="cuda", autocast_dtype="float16"))
    x = torch.rand(4, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1
    metas = [ImageMeta(f"{i:064x}", captions=(f"a photo of thing {i}", "another caption")) for i in range(4)]
    torch.cuda.reset_peak_memory_stats()
    out = ext(x, metas)
    assert all(np.isfinite(v).all() for v in out.values())
    assert torch.cuda.max_memory_allocated() < 24 * 2 ** 30  # fits a 24 GB worker
    alone = ext(x[2:3], metas[2:3])
    for c in ("dl", "pia", "ml_t0", "ml_t900"):
        np.testing.assert_allclose(alone[c][0], out[c][2], rtol=2e-2, atol=2e-2, err_msg=c)

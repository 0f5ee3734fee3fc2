"""U-ViT: the official checkpoint layout loads strictly, the SD-discrete schedule and its timestep shift,
the null class, and what is refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from cdi_ray.models import ImageMeta, ModelLoadError, load_model
from cdi_ray.models import testing
from cdi_ray.models.uvit import sd_discrete_alphas_cumprod
from cdi_ray.models.uvit_net import UViTConfig, UViTNet

BLOCK_PARAMS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def official_keys(*, depth: int, conditioning: str, mlp_time_embed: bool, conv: bool, qkv_bias: bool = False) -> set[str]:
    """The state-dict keys of the release's ``libs/uvit.py`` / ``libs/uvit_t2i.py`` for a config, written out by hand."""
    block = BLOCK_PARAMS + (("attn.qkv.bias",) if qkv_bias else ())
    keys = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"mid_block.{p}" for p in block}
    for i in range(depth // 2):
        keys |= {f"in_blocks.{i}.{p}" for p in block}
        keys |= {f"out_blocks.{i}.{p}" for p in block + ("skip_linear.weight", "skip_linear.bias")}
    if mlp_time_embed:
        keys |= {"time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias"}
    if conv:
        keys |= {"final_layer.weight", "final_layer.bias"}
    if conditioning == "class":
        keys.add("label_emb.weight")
    if conditioning == "text":
        keys |= {"context_embed.weight", "context_embed.bias"}
    return keys


@pytest.mark.parametrize("conditioning,mlp_time_embed,conv", [("class", True, True), ("class", False, False),
                                                              ("text", False, True), ("none", False, True)])
def test_state_dict_has_the_official_layout(conditioning, mlp_time_embed, conv):
    cfg = {**testing.tiny_uvit_config(conditioning), "mlp_time_embed": mlp_time_embed, "conv": conv}
    state = UViTNet(UViTConfig.from_dict(cfg)).state_dict()
    assert set(state) == official_keys(depth=4, conditioning=conditioning, mlp_time_embed=mlp_time_embed, conv=conv)
    D, p, C, patches = 16, 2, 4, (8 // 2) ** 2
    extras = {"class": 2, "none": 1, "text": 1 + cfg.get("num_clip_token", 0)}[conditioning]
    assert state["pos_embed"].shape == (1, extras + patches, D)  # the extra tokens have positions too
    assert state["patch_embed.proj.weight"].shape == (D, C, p, p)
    assert state["in_blocks.0.attn.qkv.weight"].shape == (3 * D, D)
    assert state["out_blocks.1.skip_linear.weight"].shape == (D, 2 * D)
    assert state["decoder_pred.weight"].shape == (p * p * C, D)
    if conditioning == "class":
        assert state["label_emb.weight"].shape == (11, D)
    if conditioning == "text":
        assert state["context_embed.weight"].shape == (D, cfg["clip_dim"])


def test_release_checkpoint_file_loads_strictly(tiny_uvit_class_dir, tmp_path):
    """A state dict saved with torch.save as the release's nnet_ema.pth loads, and predicts what the original did."""
    from safetensors.torch import load_file

    path = shutil.copytree(tiny_uvit_class_dir, tmp_path / "m")
    state = load_file(path / "uvit" / "model.safetensors")
    (path / "uvit" / "model.safetensors").unlink()
    torch.save(state, path / "uvit" / "nnet_ema.pth")
    ref, model = load_model(tiny_uvit_class_dir), load_model(path)
    z = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 7])
    torch.testing.assert_close(model.predict_noise(z, 400, labels), ref.predict_noise(z, 400, labels))


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.pop("mid_block.mlp.fc1.bias"), "1 missing.*mid_block.mlp.fc1.bias"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), "1 unexpected.*extra.weight"),
    (lambda s: s.__setitem__("pos_embed", torch.zeros(1, 5, 16)), "wrong-shaped.*pos_embed"),
])
def test_checkpoint_that_does_not_match_the_config_is_refused(tiny_uvit_class_dir, tmp_path, edit, needle):
    from safetensors.torch import load_file

    path = shutil.copytree(tiny_uvit_class_dir, tmp_path / "m")
    state = load_file(path / "uvit" / "model.safetensors")
    edit(state)
    (path / "uvit" / "model.safetensors").unlink()
    torch.save(state, path / "uvit" / "nnet.pth")
    with pytest.raises(ModelLoadError, match=f"nnet.pth.*{needle}.*Fix:"):
        load_model(path)


def test_bad_config_is_refused(tiny_uvit_class_dir, tmp_path):
    path = shutil.copytree(tiny_uvit_class_dir, tmp_path / "m")
    cfg_file = path / "uvit" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "embed_dims": 16}))
    with pytest.raises(ModelLoadError, match="unknown U-ViT config key.*embed_dims"):
        load_model(path)
    cfg_file.write_text(json.dumps({**cfg, "pred": "v_pred"}))
    with pytest.raises(ModelLoadError, match="noise prediction"):
        load_model(path)
    (path / "uvit" / "model.safetensors").unlink()
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="no weights in 'uvit/'.*nnet_ema.pth"):
        load_model(path)


def test_sd_discrete_schedule_and_timestep_shift(tiny_uvit_class_dir):
    """Our t is U-ViT's n = t + 1: ᾱ_t is U-ViT's ᾱ_{t+1} (SD's scaled-linear ᾱ_t), and the net sees n = t + 1."""
    from diffusers import DDPMScheduler

    ab = sd_discrete_alphas_cumprod()
    assert ab.shape == (1000,) and ab.dtype == torch.float64
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    with_clean = torch.cumprod(torch.cat([torch.zeros(1, dtype=torch.float64), betas]).neg().add(1), 0)
    assert with_clean[0] == 1.0 and torch.equal(with_clean[1:], ab)  # U-ViT's T+1 entries, ᾱ_0 = 1 dropped
    sd = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(ab, sd.alphas_cumprod.double(), rtol=1e-6, atol=1e-7)

    model = load_model(tiny_uvit_class_dir)
    torch.testing.assert_close(model.alphas_cumprod, ab)
    z = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 3])
    for t in (0, 499, 999):
        torch.testing.assert_close(model.predict_noise(z, t, labels), model.net(z, torch.tensor([t + 1, t + 1]), y=labels))
    assert not torch.allclose(model.predict_noise(z, 0, labels), model.net(z, torch.tensor([0, 0]), y=labels))


def test_null_class_is_the_last_label_row(tiny_uvit_class_dir, tmp_path):
    model = load_model(tiny_uvit_class_dir, missing_label="null")
    assert (model.num_classes, model.null_class) == (10, 10)
    metas = [ImageMeta("a", label=3), ImageMeta("b"), ImageMeta("c", label=9)]
    assert model.conditioning(metas).tolist() == [3, 10, 9]
    with pytest.raises(ValueError, match="outside"):
        model.conditioning([ImageMeta("d", label=10)])  # the null row is not a class
    # a model trained without label dropout: every row is a class and there is no null class
    path = shutil.copytree(tiny_uvit_class_dir, tmp_path / "m")
    cfg_file = path / "uvit" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "null_class": None}))
    plain = load_model(path)
    assert (plain.num_classes, plain.null_class) == (11, None)
    assert plain.conditioning([ImageMeta("d", label=10)]).tolist() == [10]
    with pytest.raises(ModelLoadError, match="null class"):
        load_model(path, missing_label="null")


def test_unconditional_uvit(tmp_path):
    model = load_model(testing.make_tiny_uvit(tmp_path / "m", "none"))
    assert model.conditioning_kind == "none" and model.conditioning([ImageMeta("a")]) is None
    z = torch.randn(2, *model.latent_shape)
    assert model.predict_noise(z, 10, None).shape == z.shape


def test_text_uvit_needs_matching_token_count(tiny_uvit_text_dir, tmp_path):
    path = shutil.copytree(tiny_uvit_text_dir, tmp_path / "m")
    cfg_file = path / "uvit" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    other = testing.make_tiny_uvit(tmp_path / "other", "text", max_length=6)
    shutil.rmtree(path / "tokenizer")
    shutil.copytree(other / "tokenizer", path / "tokenizer")
    with pytest.raises(ModelLoadError, match=f"6 tokens.*num_clip_token={cfg['num_clip_token']}"):
        load_model(path)


def test_builder_is_reproducible(tmp_path, tiny_uvit_text_dir):
    from cdi_ray.models.fingerprint import model_fingerprint

    assert model_fingerprint(testing.make_tiny_uvit(tmp_path / "again", "text")) == model_fingerprint(tiny_uvit_text_dir)

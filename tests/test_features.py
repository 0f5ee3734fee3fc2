"""Feature extractors (METHOD.md step 2): closed forms, a membership property, per-image
determinism and batch invariance, pass counts, presets on every model family, Parquet output.

All on CPU with tiny models; the whole file stays well under 90 s on two shared cores.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cdi_ray.features import (FEATURES, PRESETS, FeatureConfig, FeatureExtractor, get_feature_class, passes_per_image,
                              resolve_preset)
from cdi_ray.features.context import image_noise
from cdi_ray.features.lbfgs import lbfgs_batched
from cdi_ray.models.base import DiffusionModel, ImageMeta

T = 1000
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
WHITE_BOX_COLUMNS = (["dl", "secmi", "pia", "pian"] + [f"gm_t{t}" for t in range(0, 1000, 100)]
                     + [f"ml_t{t}" for t in range(0, 1000, 100)] + ["no_loss", "no_delta_norm"])
GRAY_BOX_COLUMNS = ["dl", "secmi", "pia", "pian"] + [f"ml_t{t}" for t in range(0, 1000, 100)]
RTOL = ATOL = 1e-5
# NO's five L-BFGS iterations amplify the ~1e-7 rounding differences that batched kernels of
# different batch sizes produce (differences of gradients in the curvature pairs, interpolated
# step lengths) to ~1e-5–1e-4 relative; every other feature stays within 1e-5.
NO_TOL = 5e-4


# ---------------------------------------------------------------------------------------------
# tiny hand-built models
# ---------------------------------------------------------------------------------------------
class _PixelBase(DiffusionModel):
    family = "test"
    fingerprint = "test"
    conditioning_kind = "none"

    def __init__(self, channels: int = 2, size: int = 4):
        self.device = torch.device("cpu")
        self.alphas_cumprod = ALPHAS_CUMPROD
        self.image_size, self.image_channels = size, channels
        self.latent_shape = (channels, size, size)

    def encode(self, images, generators=None):
        return images.float()

    def conditioning(self, metas, generators=None):
        return None


class GaussianOracle(_PixelBase):
    """The exact ε-predictor when the data are z ~ N(0, s²·I):

        E[ε | z_t] = a_t·z_t,   a_t = sqrt(1-ᾱ_t) / (ᾱ_t·s² + 1 - ᾱ_t)

    so every feature has a closed form the test computes on its own (in float64)."""

    def __init__(self, s2: float = 0.25, **kw):
        super().__init__(**kw)
        self.s2 = s2

    def a(self, t) -> torch.Tensor:
        ab = ALPHAS_CUMPROD[torch.as_tensor(t).long()]
        return torch.sqrt(1 - ab) / (ab * self.s2 + 1 - ab)

    def predict_noise(self, z_t, t, cond):
        a = self.a(t).to(torch.float32).reshape(-1, 1, 1, 1)
        return a * z_t


class TinyEpsNet(torch.nn.Module):
    """A small conv ε-network with a timestep embedding and optional class embedding."""

    def __init__(self, channels: int, width: int = 32, num_classes: int = 0):
        super().__init__()
        self.inp = torch.nn.Conv2d(channels, width, 3, padding=1)
        self.mid = torch.nn.Conv2d(width, width, 3, padding=1)
        self.out = torch.nn.Conv2d(width, channels, 3, padding=1)
        self.temb = torch.nn.Linear(16, width)
        self.cemb = torch.nn.Embedding(num_classes, width) if num_classes else None

    def forward(self, z, t, y=None):
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8, dtype=torch.float32) / 8)
        ang = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
        emb = self.temb(torch.cat([ang.sin(), ang.cos()], 1))
        if self.cemb is not None:
            emb = emb + self.cemb(y)
        h = torch.nn.functional.silu(self.inp(z) + emb[:, :, None, None])
        h = torch.nn.functional.silu(self.mid(h)) + h
        return self.out(h)


class TinyNetModel(_PixelBase):
    """A ``DiffusionModel`` around ``TinyEpsNet``; class-conditional when ``num_classes``."""

    def __init__(self, channels: int = 2, size: int = 4, num_classes: int = 0, seed: int = 0, width: int = 32):
        super().__init__(channels=channels, size=size)
        gen_state = torch.random.fork_rng(devices=[])
        with gen_state:
            torch.manual_seed(seed)
            self.net = TinyEpsNet(channels, width=width, num_classes=num_classes)
        self.net.requires_grad_(False).eval()
        self.num_classes = num_classes
        self.conditioning_kind = "class" if num_classes else "none"

    def conditioning(self, metas, generators=None):
        if not self.num_classes:
            return None
        return torch.tensor([m.label for m in metas], dtype=torch.long)

    def predict_noise(self, z_t, t, cond):
        t = torch.as_tensor(t).long().reshape(-1).expand(z_t.shape[0])
        return self.net(z_t, t, cond)


def _images(n: int, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g) * 2 - 1


def _metas(n: int, prefix: str = "img", labels: bool = False, captions: bool = False) -> list[ImageMeta]:
    """Image metas; with ``captions`` image i has i % 3 + 1 captions (one is chosen per image by its seed)."""
    return [ImageMeta(content_hash=f"{prefix}{i:04d}", label=(i % 3) if labels else None,
                      captions=tuple(f"caption {j} of image {i}" for j in range(i % 3 + 1)) if captions else ())
            for i in range(n)]


def _tol(column: str) -> dict:
    return dict(rtol=NO_TOL, atol=NO_TOL) if column.startswith("no_") else dict(rtol=RTOL, atol=ATOL)


def _assert_rows_close(a: dict, ia, b: dict, ib, columns):
    for c in columns:
        np.testing.assert_allclose(a[c][ia], b[c][ib], err_msg=c, **_tol(c))


# ---------------------------------------------------------------------------------------------
# config, registry
# ---------------------------------------------------------------------------------------------
def test_presets_resolve_to_the_method_columns():
    assert FeatureConfig(features="white-box").columns == WHITE_BOX_COLUMNS
    assert FeatureConfig(features="gray-box").columns == GRAY_BOX_COLUMNS
    assert resolve_preset("white-box") == PRESETS["white-box"]
    assert set(PRESETS["white-box"]) == set(FEATURES) - {"dlm", "piam"}  # the paper's seven families


def test_paper_presets_are_unchanged():
    """Issue 17: new presets and families leave the paper's presets — and so their feature-store keys — as
    they were (hashes of the configuration before issue 17)."""
    assert FeatureConfig(features="white-box").config_hash() == \
        "0b2caa69015f8dcf312a452f7cbfc77e141c164a230a98c9441a68b1b1b4a5bf"
    assert FeatureConfig(features="gray-box").config_hash() == \
        "b6e393f5e1b0622d6110d5d335c67bedfd91dc0f5901f03d17309006b4ccead7"


def test_efficient_preset_is_its_families_with_their_settings_within_the_pass_budget():
    from cdi_ray.features.registry import PRESET_SETTINGS

    cfg = FeatureConfig(features="efficient")
    explicit = FeatureConfig(features=PRESETS["efficient"], overrides=PRESET_SETTINGS["efficient"])
    assert cfg.config_hash() == explicit.config_hash() and cfg.columns == explicit.columns
    passes = cfg.passes_per_image()
    assert passes["forward"] <= passes_per_image("gray-box")["forward"] and passes["forward_backward"] == 0
    assert not cfg.needs_gradients
    # the user's overrides apply on top of the preset's settings
    name = PRESETS["efficient"][0]
    field = next(iter(PRESET_SETTINGS["efficient"][name]))
    changed = FeatureConfig(features="efficient", overrides={name: {field: cfg.feature_config(name).model_dump()[field]}})
    assert changed.config_hash() == cfg.config_hash()


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(KeyError, match="valid features: dl, secmi, pia, pian, gm, ml, no, dlm, piam"):
        get_feature_class("carlini")
    with pytest.raises(KeyError, match="valid presets: white-box, gray-box, efficient"):
        resolve_preset("black-box")
    with pytest.raises(ValueError, match="valid presets: white-box, gray-box, efficient"):
        FeatureConfig(features="black-box")
    with pytest.raises(ValueError, match="valid features"):
        FeatureConfig(features=("dl", "carlini"))
    with pytest.raises(ValueError, match="top_fraction"):
        FeatureConfig(overrides={"gm": {"top_fraction": 1.5}})
    with pytest.raises(ValueError, match="extra|not permitted"):
        FeatureConfig(overrides={"gm": {"topk": 0.1}})
    with pytest.raises(ValueError, match="not among the features"):
        FeatureConfig(features="gray-box", overrides={"gm": {"top_fraction": 0.1}})
    with pytest.raises(ValueError, match="extra|not permitted"):
        FeatureConfig(sed=3)


def test_config_round_trip_and_hash():
    cfg = FeatureConfig(features=("dl", "pia", "gm"), seed=11, device="cpu", autocast_dtype="bfloat16",
                        overrides={"gm": {"timesteps": [0, 500], "top_fraction": 0.1}, "pia": {"p": 2}})
    again = FeatureConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg and again.config_hash() == cfg.config_hash()
    assert cfg.columns == ["dl", "pia", "gm_t0", "gm_t500"]
    # a preset and its explicit list are the same features; defaults given explicitly change nothing
    wb = FeatureConfig()
    assert FeatureConfig(features=PRESETS["white-box"]).config_hash() == wb.config_hash()
    assert FeatureConfig(overrides={"dl": {"n_draws": 5}}).config_hash() == wb.config_hash()
    # the seed and hyper-parameters change the hash, execution details do not
    assert FeatureConfig(seed=1).config_hash() != wb.config_hash()
    assert FeatureConfig(overrides={"pian": {"constant": "sqrt_2_over_pi"}}).config_hash() != wb.config_hash()
    assert FeatureConfig(device="cuda", max_micro_batch=8).config_hash() == wb.config_hash()
    assert len(wb.config_hash()) == 64
    # the loader's dtype spellings are accepted for autocast and stored canonically
    assert FeatureConfig(autocast_dtype="bf16") == FeatureConfig(autocast_dtype=torch.bfloat16) == FeatureConfig(
        autocast_dtype="bfloat16")
    assert FeatureConfig(autocast_dtype="float32").autocast_dtype is None
    json.loads(wb.model_dump_json())


# ---------------------------------------------------------------------------------------------
# (a) closed forms against the Gaussian oracle
# ---------------------------------------------------------------------------------------------
def _ab(t: int) -> float:
    return float(ALPHAS_CUMPROD[t])


def test_closed_forms_on_the_gaussian_oracle():
    model = GaussianOracle(s2=0.25, channels=2, size=4)
    B, seed = 3, 5
    x = _images(B, model.latent_shape, seed=1)
    metas = _metas(B)
    hashes = [m.content_hash for m in metas]
    cfg = FeatureConfig(seed=seed)
    out = FeatureExtractor(model, cfg)(x, metas)
    z = x.double()
    a = lambda t: float(model.a(t))  # noqa: E731
    f = lambda zt, t: a(t) * zt  # noqa: E731
    noise = lambda stream, draw: image_noise(seed, hashes, stream, draw, model.latent_shape).double()  # noqa: E731
    norm = lambda v, p=2: torch.linalg.vector_norm(v.flatten(1), ord=p, dim=1)  # noqa: E731
    q = lambda t, e: math.sqrt(_ab(t)) * z + math.sqrt(1 - _ab(t)) * e  # noqa: E731
    expected = {}

    # ML: one ε shared over t
    eps = noise("multi_t", 0)
    for t in range(0, 1000, 100):
        expected[f"ml_t{t}"] = norm(f(q(t, eps), t) - eps)
    # DL: draw 0 is the shared ε, draws 1..4 from the "dl" stream
    draws = [eps] + [noise("dl", k) for k in range(1, 5)]
    expected["dl"] = sum(norm(f(q(100, e), 100) - e) for e in draws) / 5
    # SecMI: deterministic DDIM 0 → 100 (step 10), then 100 → 110 → 100
    def ddim(zs, s, s2):
        e = f(zs, s)
        z0 = (zs - math.sqrt(1 - _ab(s)) * e) / math.sqrt(_ab(s))
        return math.sqrt(_ab(s2)) * z0 + math.sqrt(1 - _ab(s2)) * e
    z_det = z
    for s in range(0, 100, 10):
        z_det = ddim(z_det, s, s + 10)
    z_step = ddim(ddim(z_det, 100, 110), 110, 100)
    expected["secmi"] = norm(z_det - z_step)
    # PIA / PIAN: ε0 = f(z, 0), p = 5, t = 200; PIAN constant sqrt(π/2) (authors' CDI code)
    eps0 = f(z, 0)
    expected["pia"] = norm(eps0 - f(q(200, eps0), 200), 5)
    n = z[0].numel()
    eps0n = n * math.sqrt(math.pi / 2) * eps0 / eps0.abs().flatten(1).sum(1).reshape(-1, 1, 1, 1)
    expected["pian"] = norm(eps0n - f(q(200, eps0n), 200), 5)
    # GM: ∂‖a·z_t − ε‖/∂z_t = a·(a·z_t − ε)/‖·‖, so the mask is the top 20% of |a·z_t − ε|
    k = int(n * 0.2)
    for t in range(0, 1000, 100):
        r = (f(q(t, eps), t) - eps).flatten(1).abs()
        mask = torch.zeros_like(r, dtype=torch.bool).scatter_(1, r.topk(k, dim=1).indices, True).reshape(z.shape)
        z_hat = torch.where(mask, eps, z)
        expected[f"gm_t{t}"] = norm(torch.where(mask, (eps - z) - f(z_hat, t), torch.zeros_like(z)))

    for col, val in expected.items():
        np.testing.assert_allclose(out[col], val.numpy(), rtol=2e-5, atol=1e-6, err_msg=col)

    # NO: with a linear f the gradient of ‖a(z_t + δ) − ε‖ always points along r = a·z_t − ε, so δ* is
    # anti-parallel to r and the final loss is |‖r‖ − a·‖δ*‖|, below the starting loss ‖r‖.
    e_no = noise("no", 0)
    r0 = norm(f(q(100, e_no), 100) - e_no).numpy()
    np.testing.assert_allclose(out["no_loss"], np.abs(r0 - a(100) * out["no_delta_norm"]), rtol=1e-4, atol=1e-4)
    assert (out["no_loss"] < 0.5 * r0).all() and (out["no_delta_norm"] > 0).all()


def test_multi_timestep_families_on_the_gaussian_oracle():
    """DLM (DL at several t, n draws of the "dl" stream) and PIAM (PIA at several t and norm orders)."""
    model = GaussianOracle(s2=0.25, channels=2, size=4)
    B, seed = 3, 7
    x, metas = _images(B, model.latent_shape, seed=4), _metas(B)
    hashes = [m.content_hash for m in metas]
    cfg = FeatureConfig(features=("dlm", "piam"), seed=seed, overrides={
        "dlm": {"timesteps": (30, 150), "n_draws": 3}, "piam": {"timesteps": (40, 75), "orders": (2, 4.5)}})
    out = FeatureExtractor(model, cfg)(x, metas)
    assert list(out) == ["dlm_t30", "dlm_t150", "piam_t40_p2", "piam_t40_p4.5", "piam_t75_p2", "piam_t75_p4.5"]
    assert cfg.passes_per_image() == {"forward": 2 * 3 + 1 + 2, "forward_backward": 0, "forward_backward_max": 0}
    z = x.double()
    f = lambda zt, t: float(model.a(t)) * zt  # noqa: E731
    q = lambda t, e: math.sqrt(_ab(t)) * z + math.sqrt(1 - _ab(t)) * e  # noqa: E731
    norm = lambda v, p=2: torch.linalg.vector_norm(v.flatten(1), ord=p, dim=1)  # noqa: E731
    for t in (30, 150):
        draws = [image_noise(seed, hashes, "dl", k, model.latent_shape).double() for k in range(3)]
        want = sum(norm(f(q(t, e), t) - e) for e in draws) / 3
        np.testing.assert_allclose(out[f"dlm_t{t}"], want.numpy(), rtol=2e-5, atol=1e-6)
    eps0 = f(z, 0)
    for t in (40, 75):
        for p in (2, 4.5):
            want = norm(eps0 - f(q(t, eps0), t), p)
            np.testing.assert_allclose(out[f"piam_t{t}_p{p:g}"], want.numpy(), rtol=2e-5, atol=1e-6)
    # dlm at t = 100 with n draws is DL without the shared first draw
    dl = FeatureExtractor(model, FeatureConfig(features=("dl", "dlm"), seed=seed, overrides={
        "dl": {"share_first_draw": False, "n_draws": 4}, "dlm": {"timesteps": (100,), "n_draws": 4}}))(x, metas)
    np.testing.assert_allclose(dl["dl"], dl["dlm_t100"], rtol=1e-6)
    with pytest.raises(ValueError, match="orders must be distinct positive"):
        FeatureConfig(features=("piam",), overrides={"piam": {"orders": (2, 2)}})


def test_paper_variants_are_named_options():
    model = GaussianOracle(s2=0.25, channels=2, size=4)
    x, metas = _images(2, model.latent_shape, seed=2), _metas(2)
    base = FeatureExtractor(model, FeatureConfig())(x, metas)
    alt = FeatureExtractor(model, FeatureConfig(overrides={
        "pian": {"constant": "sqrt_2_over_pi"}, "gm": {"corruption": "paper"}, "no": {"final_loss": "authors_renoised"},
    }))(x, metas)
    for col in ["dl", "secmi", "pia", "ml_t500", "no_delta_norm"]:
        np.testing.assert_allclose(alt[col], base[col], rtol=RTOL, atol=ATOL)
    for col in ["pian", "gm_t500", "no_loss"]:
        assert not np.allclose(alt[col], base[col]), col

    # GM "paper": ẑ = ε·M + z_t·¬M and residual ε − z_t
    z, hashes = x.double(), [m.content_hash for m in metas]
    eps = image_noise(0, hashes, "multi_t", 0, model.latent_shape).double()
    t, a = 500, float(model.a(500))
    zt = math.sqrt(_ab(t)) * z + math.sqrt(1 - _ab(t)) * eps
    r = (a * zt - eps).flatten(1).abs()
    k = int(r.shape[1] * 0.2)
    mask = torch.zeros_like(r, dtype=torch.bool).scatter_(1, r.topk(k, dim=1).indices, True).reshape(z.shape)
    z_hat = torch.where(mask, eps, zt)
    want = torch.linalg.vector_norm(torch.where(mask, (eps - zt) - a * z_hat, 0 * z).flatten(1), dim=1)
    np.testing.assert_allclose(alt["gm_t500"], want.numpy(), rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (b) membership signal after overfitting
# ---------------------------------------------------------------------------------------------
def test_losses_are_lower_on_training_images_after_overfitting():
    model = TinyNetModel(channels=2, size=8, seed=3, width=48)
    train, fresh = _images(4, model.latent_shape, seed=10), _images(4, model.latent_shape, seed=11)
    net = model.net.train().requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    reps = 8
    for _ in range(400):  # the DDPM objective on the 4 training images only
        z = train.repeat(reps, 1, 1, 1)
        t = torch.randint(0, 1000, (z.shape[0],), generator=g)
        eps = torch.randn(z.shape, generator=g)
        ab = ALPHAS_CUMPROD[t].float().reshape(-1, 1, 1, 1)
        loss = ((net(ab.sqrt() * z + (1 - ab).sqrt() * eps, t) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    ext = FeatureExtractor(model, FeatureConfig(features=("dl", "ml")))
    member, nonmember = ext(train, _metas(4, "train")), ext(fresh, _metas(4, "fresh"))
    assert member["dl"].max() < nonmember["dl"].min()
    ml_cols = [f"ml_t{t}" for t in range(0, 1000, 100)]
    ml_m = np.mean([member[c] for c in ml_cols], axis=0)
    ml_n = np.mean([nonmember[c] for c in ml_cols], axis=0)
    assert ml_m.max() < ml_n.min()


# ---------------------------------------------------------------------------------------------
# (c) determinism and batch invariance, every feature
# ---------------------------------------------------------------------------------------------
def test_features_do_not_depend_on_batch_order_or_split():
    model = TinyNetModel(channels=2, size=4, num_classes=3, seed=1)
    n = 64
    x, metas = _images(n, model.latent_shape, seed=4), _metas(n, labels=True)
    ext = FeatureExtractor(model, FeatureConfig(seed=3))
    full = ext(x, metas)
    assert list(full) == WHITE_BOX_COLUMNS
    probe = [0, 17, 42, 63]
    # one image alone
    for i in probe[:2]:
        alone = ext(x[i:i + 1], metas[i:i + 1])
        _assert_rows_close(alone, 0, full, i, WHITE_BOX_COLUMNS)
    # a different order, in small micro-batches
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(9)).tolist()
    small = FeatureExtractor(model, FeatureConfig(seed=3, max_micro_batch=7))
    shuffled = small(x[perm], [metas[i] for i in perm])
    for i in probe:
        _assert_rows_close(shuffled, perm.index(i), full, i, WHITE_BOX_COLUMNS)
    # split across two calls
    first, second = ext(x[:23], metas[:23]), ext(x[23:], metas[23:])
    for c in WHITE_BOX_COLUMNS:
        np.testing.assert_allclose(np.concatenate([first[c], second[c]]), full[c], err_msg=c, **_tol(c))
    # the same call twice: bitwise equal
    once, again = ext(x[:5], metas[:5]), ext(x[:5], metas[:5])
    for c in WHITE_BOX_COLUMNS:
        np.testing.assert_array_equal(again[c], once[c], err_msg=c)
    # the seed matters; the content hash (not the position) selects the noise
    other_seed = FeatureExtractor(model, FeatureConfig(seed=4))(x[:5], metas[:5])
    assert not np.allclose(other_seed["dl"], once["dl"])
    renamed = ext(x[:5], _metas(5, prefix="other", labels=True))
    assert not np.allclose(renamed["ml_t500"], once["ml_t500"])
    np.testing.assert_array_equal(renamed["secmi"], once["secmi"])  # deterministic features stay


def test_callers_inference_mode_does_not_break_gradient_features():
    model = TinyNetModel(channels=2, size=4, num_classes=3, seed=1)
    x, metas = _images(3, model.latent_shape, seed=4), _metas(3, labels=True)
    ext = FeatureExtractor(model, FeatureConfig(features=("gm", "no")))
    plain = ext(x, metas)
    with torch.inference_mode():
        inside = ext(x.clone(), metas)
    for c in ext.columns:
        np.testing.assert_array_equal(inside[c], plain[c], err_msg=c)


def test_no_global_rng_is_touched():
    model = TinyNetModel(channels=2, size=4, seed=1)
    x, metas = _images(3, model.latent_shape, seed=4), _metas(3)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    FeatureExtractor(model, FeatureConfig())(x, metas)
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------
# (d) pass counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("features,fwd,fwd_bwd", [
    ("white-box", 28, 16), ("gray-box", 28, 0),
    (("dl",), 5, 0), (("ml",), 10, 0), (("dl", "ml"), 14, 0), (("secmi",), 12, 0), (("secmi", "pia"), 13, 0),
    (("pia",), 2, 0), (("pia", "pian"), 3, 0), (("gm",), 10, 10), (("gm", "ml"), 10, 10),
    (("dl", "gm", "ml"), 14, 10), (("no",), 0, 6),
])
def test_pass_counts_match_the_claim(features, fwd, fwd_bwd):
    cfg = FeatureConfig(features=features)
    claim = cfg.passes_per_image()
    assert (claim["forward"], claim["forward_backward"]) == (fwd, fwd_bwd)
    model = TinyNetModel(channels=2, size=4, seed=2)
    ext = FeatureExtractor(model, cfg)
    assert ext.passes_per_image() == claim
    ext(_images(5, model.latent_shape, seed=3), _metas(5))
    counts = ext.last_pass_counts
    assert (counts["forward"] == claim["forward"]).all()
    assert (counts["forward_backward"] >= claim["forward_backward"]).all()
    assert (counts["forward_backward"] <= claim["forward_backward_max"]).all()


def test_white_box_cost_is_within_the_method_table():
    # METHOD.md: ≈40 forward and 16–25 forward+backward per image for white-box CDI
    claim = passes_per_image("white-box")
    assert claim == FeatureConfig().passes_per_image()
    assert passes_per_image("gray-box") == {"forward": 28, "forward_backward": 0, "forward_backward_max": 0}
    assert claim["forward"] <= 40 and claim["forward_backward"] == 16
    model = TinyNetModel(channels=2, size=4, seed=2)
    ext = FeatureExtractor(model, FeatureConfig())
    ext(_images(8, model.latent_shape, seed=3), _metas(8))
    assert (ext.last_pass_counts["forward_backward"] <= 25).all()


# ---------------------------------------------------------------------------------------------
# L-BFGS: per sample, independent of the batch
# ---------------------------------------------------------------------------------------------
def _quadratic_problem(B: int, D: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, D, D, generator=g, dtype=torch.float64)
    H = A @ A.transpose(1, 2) / D + 0.1 * torch.eye(D, dtype=torch.float64)
    b = torch.randn(B, D, generator=g, dtype=torch.float64)

    def vg(index, X):
        Hx = torch.einsum("nij,nj->ni", H[index], X)
        return 0.5 * (X * Hx).sum(1) - (b[index] * X).sum(1), Hx - b[index]
    return H, b, vg


def test_lbfgs_converges_and_is_per_sample():
    B, D = 6, 12
    H, b, vg = _quadratic_problem(B, D, seed=0)
    res = lbfgs_batched(torch.zeros(B, D, dtype=torch.float64), vg, max_iter=200, tolerance_change=0.0,
                        tolerance_grad=1e-12)
    x_star = torch.linalg.solve(H, b)
    for i, r in enumerate(res):
        torch.testing.assert_close(r.x, x_star[i], rtol=1e-5, atol=1e-6)
    # five iterations, one sample alone vs in the batch: identical trajectories
    few = lbfgs_batched(torch.zeros(B, D, dtype=torch.float64), vg, max_iter=5)
    for i in (0, 3):
        alone = lbfgs_batched(torch.zeros(1, D, dtype=torch.float64),
                              lambda index, X, i=i: vg(index + i, X), max_iter=5)[0]
        assert alone.n_evals == few[i].n_evals and alone.f == few[i].f
        torch.testing.assert_close(alone.x, few[i].x, rtol=0, atol=0)
        assert few[i].n_iter == 5 and few[i].f < vg(torch.tensor([i]), torch.zeros(1, D, dtype=torch.float64))[0].item()


def test_lbfgs_matches_scipy_on_a_smooth_problem():
    from scipy.optimize import minimize, rosen, rosen_der

    x0 = np.array([-1.2, 1.0, -0.5, 0.8])

    def vg(index, X):
        xs = X.double().numpy()
        return torch.tensor([rosen(v) for v in xs]), torch.tensor(np.stack([rosen_der(v) for v in xs]))

    ours = lbfgs_batched(torch.tensor(x0)[None], vg, max_iter=500, tolerance_change=0.0, tolerance_grad=1e-8)[0]
    ref = minimize(rosen, x0, jac=rosen_der, method="L-BFGS-B", options={"maxiter": 500, "gtol": 1e-8})
    np.testing.assert_allclose(ours.x.numpy(), ref.x, atol=1e-4)
    assert ours.f < 1e-8


# ---------------------------------------------------------------------------------------------
# (e) presets on the real adapters (pixel DDPM, latent KL, DiT; conftest's session fixtures)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_models(tiny_pixel_dir, tiny_latent_kl_dir, tiny_dit_dir, tiny_t2i_dir, tiny_uvit_class_dir, tiny_uvit_text_dir):
    from cdi_ray.models import load_model

    return {"pixel": load_model(tiny_pixel_dir), "latent-kl": load_model(tiny_latent_kl_dir), "dit": load_model(tiny_dit_dir),
            "text-to-image": load_model(tiny_t2i_dir), "uvit-class": load_model(tiny_uvit_class_dir),
            "uvit-text": load_model(tiny_uvit_text_dir)}


def _model_metas(model, n: int, prefix: str = "img") -> list[ImageMeta]:
    return _metas(n, prefix, labels=model.conditioning_kind == "class", captions=model.conditioning_kind == "text")


@pytest.mark.parametrize("family", ["pixel", "latent-kl", "dit", "text-to-image", "uvit-class", "uvit-text"])
def test_presets_give_finite_columns_on_every_family(tiny_models, family):
    model = tiny_models[family]
    B = 2
    x = _images(B, (model.image_channels, model.image_size, model.image_size), seed=6)
    metas = _model_metas(model, B)
    for preset, columns in (("white-box", WHITE_BOX_COLUMNS), ("gray-box", GRAY_BOX_COLUMNS)):
        ext = FeatureExtractor(model, FeatureConfig(features=preset))
        out = ext(x, metas)
        assert list(out) == columns == ext.columns
        for c, v in out.items():
            assert v.dtype == np.float64 and v.shape == (B,) and np.isfinite(v).all(), (family, preset, c)
        assert (ext.last_pass_counts["forward"] == ext.passes_per_image()["forward"]).all()


@pytest.mark.parametrize("family", ["dit", "text-to-image", "uvit-class", "uvit-text"])
def test_latent_posterior_sample_is_per_image(tiny_models, family):
    """An image's features — its posterior sample, caption choice and noise — do not depend on its batch position."""
    model = tiny_models[family]
    x = _images(3, (model.image_channels, model.image_size, model.image_size), seed=8)
    metas = _model_metas(model, 3)
    cfg = FeatureConfig(features=("dl", "gm", "no"), overrides={"gm": {"timesteps": [100, 700]}})
    ext = FeatureExtractor(model, cfg)
    full = ext(x, metas)
    rev = ext(x.flip(0), metas[::-1])
    _assert_rows_close(rev, 2, full, 0, ext.columns)
    _assert_rows_close(rev, 0, full, 2, ext.columns)
    _assert_rows_close(ext(x[1:2], metas[1:2]), 0, full, 1, ext.columns)  # alone: the same caption and noise
    mean = FeatureExtractor(model, cfg.model_copy(update={"encode": "mean"}))(x, metas)
    assert not np.allclose(mean["dl"], full["dl"])


# ---------------------------------------------------------------------------------------------
# (f) extract_to_parquet
# ---------------------------------------------------------------------------------------------
def _write_pngs(folder, n: int, size: int = 20, mode: str = "RGB"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size, size + 4, 3) if mode == "RGB" else (size, size + 4)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(folder / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return sorted(folder.glob("*.png"))


def test_extract_to_parquet_writes_the_schema(tmp_path, tiny_pixel_dir):
    import pyarrow.parquet as pq

    from cdi_ray.features.extract import extract_to_parquet
    from cdi_ray.images import content_hash, decode_image, preprocess
    from cdi_ray.models import load_model

    files = _write_pngs(tmp_path / "imgs", 3, mode="L")
    out = tmp_path / "sub" / "features.parquet"
    n = extract_to_parquet(tiny_pixel_dir, str(tmp_path / "imgs"), str(out), preset="gray-box", seed=2, batch_size=2)
    assert n == 3
    table = pq.read_table(out)
    assert table.column_names == ["image_id", "content_hash", "model_fingerprint", "feature_config_hash"] + GRAY_BOX_COLUMNS
    assert str(table.schema.field("image_id").type) == "string"
    assert all(str(table.schema.field(c).type) == "double" for c in GRAY_BOX_COLUMNS)
    rows = table.to_pylist()
    model = load_model(tiny_pixel_dir)
    cfg = FeatureConfig(features="gray-box", seed=2)
    assert [r["image_id"] for r in rows] == [f.name for f in files]
    assert [r["content_hash"] for r in rows] == [content_hash(f.read_bytes()) for f in files]
    assert {r["model_fingerprint"] for r in rows} == {model.fingerprint}
    assert {r["feature_config_hash"] for r in rows} == {cfg.config_hash()}
    assert FeatureConfig.model_validate_json(table.schema.metadata[b"cdi_ray.feature_config"]) == cfg
    # the same values as the extractor on the same preprocessed pixels
    x = torch.stack([torch.from_numpy(preprocess(decode_image(f.read_bytes(), name=f.name, mode="L"),
                                                 size=model.image_size, channels=1)) for f in files])
    direct = FeatureExtractor(model, cfg)(x, [ImageMeta(content_hash=r["content_hash"]) for r in rows])
    for c in GRAY_BOX_COLUMNS:
        np.testing.assert_allclose([r[c] for r in rows], direct[c], rtol=RTOL, atol=ATOL, err_msg=c)
    # a list file (relative paths, comments, a class label per line) gives the same rows
    listing = tmp_path / "list.txt"
    listing.write_text("# two images\nimgs/im2.png\n\nimgs/im0.png\t1\n")
    out2 = tmp_path / "list.parquet"
    assert extract_to_parquet(tiny_pixel_dir, str(listing), str(out2), preset="gray-box", seed=2) == 2
    rows2 = pq.read_table(out2).to_pylist()
    assert [r["image_id"] for r in rows2] == ["im2.png", "im0.png"]
    np.testing.assert_allclose(rows2[1]["dl"], rows[0]["dl"], rtol=RTOL, atol=ATOL)
    with pytest.raises(FileNotFoundError, match="no image files"):
        extract_to_parquet(tiny_pixel_dir, str(tmp_path / "sub"), str(tmp_path / "x.parquet"))


def test_extract_to_parquet_needs_labels_for_class_models(tmp_path, tiny_dit_dir):
    import pyarrow.parquet as pq

    from cdi_ray.features.extract import extract_to_parquet
    from cdi_ray.images import ImageError

    _write_pngs(tmp_path / "imgs", 2)
    with pytest.raises(ImageError, match="no class label"):
        extract_to_parquet(tiny_dit_dir, str(tmp_path / "imgs"), str(tmp_path / "x.parquet"), preset="gray-box")
    listing = tmp_path / "list.txt"
    listing.write_text("imgs/im0.png\t3\nimgs/im1.png\t7\n")
    assert extract_to_parquet(tiny_dit_dir, str(listing), str(tmp_path / "x.parquet"), preset="gray-box") == 2
    assert pq.read_table(tmp_path / "x.parquet").num_rows == 2
    listing.write_text("imgs/im0.png\t12\n")
    with pytest.raises(ImageError, match="outside"):
        extract_to_parquet(tiny_dit_dir, str(listing), str(tmp_path / "x.parquet"), preset="gray-box")


def test_autocast_bfloat16_stays_close():
    model = TinyNetModel(channels=2, size=4, seed=1)
    x, metas = _images(3, model.latent_shape, seed=4), _metas(3)
    cfg = FeatureConfig(features="gray-box")
    fp32 = FeatureExtractor(model, cfg)(x, metas)
    bf16_cfg = cfg.model_copy(update={"autocast_dtype": "bfloat16"})
    assert bf16_cfg.config_hash() != cfg.config_hash()
    bf16 = FeatureExtractor(model, bf16_cfg)(x, metas)
    for c in ["dl", "pia", "ml_t0", "ml_t900"]:
        assert np.isfinite(bf16[c]).all()
        np.testing.assert_allclose(bf16[c], fp32[c], rtol=0.05, err_msg=c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_is_batch_invariant(tiny_dit_dir):
    from cdi_ray.models import load_model

    cpu_model, gpu_model = load_model(tiny_dit_dir), load_model(tiny_dit_dir, device="cuda")
    n = 16
    x = _images(n, (cpu_model.image_channels, cpu_model.image_size, cpu_model.image_size), seed=5)
    metas = _metas(n, labels=True)
    cpu = FeatureExtractor(cpu_model, FeatureConfig(device="cpu"))(x, metas)
    ext = FeatureExtractor(gpu_model, FeatureConfig(device="cuda"))
    assert ext.config_hash == FeatureConfig(device="cpu").config_hash()
    gpu = ext(x, metas)
    for c in WHITE_BOX_COLUMNS:
        tol = 1e-2 if c.startswith("no_") else 1e-3
        np.testing.assert_allclose(gpu[c], cpu[c], rtol=tol, atol=tol, err_msg=c)
    for i in (0, 9):
        alone = ext(x[i:i + 1], metas[i:i + 1])
        for c in WHITE_BOX_COLUMNS:
            tol = 5e-3 if c.startswith("no_") else 1e-4
            np.testing.assert_allclose(alone[c][0], gpu[c][i], rtol=tol, atol=tol, err_msg=c)


def test_timesteps_beyond_the_schedule_are_refused():
    model = TinyNetModel()
    model.alphas_cumprod = ALPHAS_CUMPROD[:500]
    with pytest.raises(ValueError, match="t=900.*500 timesteps"):
        FeatureExtractor(model, FeatureConfig(features=("ml",)))


def test_extract_to_parquet_with_captions(tmp_path, tiny_t2i_dir):
    import pyarrow.parquet as pq

    from cdi_ray.features.extract import extract_to_parquet
    from cdi_ray.images import ImageError

    _write_pngs(tmp_path / "imgs", 2)
    out = tmp_path / "x.parquet"
    with pytest.raises(ImageError, match="im1.png.*no caption"):
        extract_to_parquet(tiny_t2i_dir, str(tmp_path / "imgs"), str(out), preset="gray-box",
                           captions={"im0.png": "a cat"})
    caps = {"im0.png": "a cat", "im1.png": ["a dog", "two dogs"]}
    assert extract_to_parquet(tiny_t2i_dir, str(tmp_path / "imgs"), str(out), preset="gray-box", captions=caps) == 2
    with_caps = pq.read_table(out).to_pylist()
    # the empty prompt for images without a caption, when asked for
    out2 = tmp_path / "y.parquet"
    assert extract_to_parquet(tiny_t2i_dir, str(tmp_path / "imgs"), str(out2), preset="gray-box",
                              model_options={"missing_caption": "empty"}) == 2
    empty = pq.read_table(out2).to_pylist()
    assert [r["content_hash"] for r in empty] == [r["content_hash"] for r in with_caps]
    assert not np.allclose([r["dl"] for r in empty], [r["dl"] for r in with_caps])  # the caption matters

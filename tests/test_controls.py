"""Distribution-shift guards (issue 10): model-free descriptors, the model-free control, the verdict
policy with controls, the batch-sized permutation cap, and the pipeline end to end.

The control must fire on P/U pairs that differ without membership (brightness, classes) and, on
exchangeable pairs, fire at most at its level α (null simulation, binomial bound).
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy import stats as st

from cdi_ray.controls import (CONTROL_ALPHA, DESCRIPTOR_GROUPS, DESCRIPTOR_NAMES, ControlResult, descriptor_key,
                              descriptor_matrix, image_descriptors, model_free_control)
from cdi_ray.images import decode_image, preprocess
from cdi_ray.stats import run_test, verdict


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _describe(data: bytes, size: int = 16, channels: int = 1) -> dict[str, float]:
    img = decode_image(data, name="x")
    return image_descriptors(data, img, preprocess(img, size=size, channels=channels))


@pytest.fixture(scope="module")
def bundle():
    from cdi_ray.demo.bundle import load_bundle

    return load_bundle()


@pytest.fixture(scope="module")
def heldout_descriptors(bundle):
    """Descriptors of 800 held-out Fashion-MNIST images (as PNG files, model size 16, 1 channel) and their labels."""
    idx = bundle.pool("heldout")[:800]
    rows = [_describe(_encode(bundle.images[i], "PNG")) for i in idx]
    return descriptor_matrix(rows), bundle.labels[idx]


# ---------------------------------------------------------------------------------------------- descriptors
@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("geometry", [(16, 1), (32, 3)])
def test_descriptors_deterministic_finite_and_named(mode, fmt, geometry):
    rng = np.random.default_rng(0)
    shape = (37, 23, 3) if mode == "RGB" else (37, 23)
    data = _encode(rng.integers(0, 256, shape, dtype=np.uint8), fmt)
    a, b = _describe(data, *geometry), _describe(data, *geometry)
    assert tuple(a) == DESCRIPTOR_NAMES and a == b
    assert all(math.isfinite(v) for v in a.values())
    assert a["file_format_jpeg"] == float(fmt == "JPEG") and a["file_format_png"] == float(fmt == "PNG")
    assert a["file_source_gray"] == float(mode == "L")
    assert a["geom_upscaled"] == float(23 < geometry[0])
    assert sum(len(v) for v in DESCRIPTOR_GROUPS.values()) == len(DESCRIPTOR_NAMES)


def test_descriptors_see_jpeg_quality_and_brightness():
    rng = np.random.default_rng(1)
    img = rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)
    for q in (30, 75, 95):
        assert _describe(_encode(img, "JPEG", quality=q))["file_jpeg_quality"] == pytest.approx(q, abs=3)
    assert _describe(_encode(img, "PNG"))["file_jpeg_quality"] == 100.0
    dark, bright = _describe(_encode(img // 2, "PNG")), _describe(_encode(img, "PNG"))
    assert dark["pix_mean"] < bright["pix_mean"] - 30


def test_descriptor_key_depends_on_geometry_only():
    assert descriptor_key(16, 1) == descriptor_key(16, 1)
    assert len({descriptor_key(16, 1), descriptor_key(16, 3), descriptor_key(32, 1)}) == 3


# ---------------------------------------------------------------------------------------------- the control
def test_control_fires_on_class_shift_and_names_descriptors(heldout_descriptors):
    D, labels = heldout_descriptors
    rng = np.random.default_rng(2)
    P = D[rng.choice(np.flatnonzero(labels < 5), 50, replace=False)]
    U = D[rng.choice(np.flatnonzero(labels >= 5), 50, replace=False)]
    c = model_free_control(P, U, seed=0)
    assert c.fired and c.pvalue <= CONTROL_ALPHA and c.name == "model-free"
    top = c.separating[0]
    assert top[0] in DESCRIPTOR_NAMES and abs(top[1] - 0.5) > 0.2
    assert top[0] in c.reason and "without the model" in c.reason
    d = c.to_dict()
    assert d["fired"] is True and d["separating"][0]["descriptor"] == top[0] and d["separating"][0]["group"]
    json.dumps(d)


def test_control_fires_on_brightness_shift(bundle):
    idx = bundle.pool("heldout")[800:900]
    imgs = bundle.images[idx]
    P = descriptor_matrix([_describe(_encode(x, "PNG")) for x in imgs[:50]])
    U = descriptor_matrix([_describe(_encode((x * 0.8).astype(np.uint8), "PNG")) for x in imgs[50:]])
    c = model_free_control(P, U, seed=0)
    assert c.fired and c.separating[0][1] > 0.5  # published brighter


def test_control_false_fire_rate_on_exchangeable_pairs(heldout_descriptors):
    """Random halves of one pool: fires in ≤ α of trials, within a one-sided binomial bound."""
    D, _ = heldout_descriptors
    rng = np.random.default_rng(3)
    trials, n = 200, 50
    fired = 0
    for t in range(trials):
        perm = rng.permutation(len(D))
        fired += model_free_control(D[perm[:n]], D[perm[n:2 * n]], seed=t).fired
    # P(X > bound) ≤ 0.001 for X ~ Binomial(200, 0.05); a calibrated control stays below it
    assert fired <= st.binom.ppf(0.999, trials, CONTROL_ALPHA), fired


def test_control_that_cannot_run_fires():
    c = model_free_control(np.zeros((1, len(DESCRIPTOR_NAMES))), np.zeros((1, len(DESCRIPTOR_NAMES))))
    assert c.fired and c.pvalue is None and "could not be run" in c.reason


# ---------------------------------------------------------------------------------------------- verdict policy
def test_verdict_takes_control_results():
    rng = np.random.default_rng(4)
    res = run_test(rng.normal(-1.0, 1, (60, 3)), rng.normal(0, 1, (60, 3)), alpha=0.01, seed=0)
    assert verdict(res).label == "used"
    quiet = ControlResult("model-free", False, 0.4, 0.05, "image statistics alone do not separate them")
    loud = ControlResult("model-free", True, 0.001, 0.05, "image statistics alone separate them (pix_mean)")
    assert verdict(res, controls=[quiet]).label == "used"
    v = verdict(res, controls=[quiet, loud])
    assert v.label == "inconclusive" and "pix_mean" in v.reason and v.controls == (loud.reason,)


# ---------------------------------------------------------------------------------------------- permutation cap
def test_batch_max_permutations_reaches_the_fdr_threshold():
    from cdi_ray.pipeline.aggregate import DEFAULT_MAX_PERMUTATIONS, MAX_BATCH_PERMUTATIONS, batch_max_permutations, test_options
    from cdi_ray.spec import TestSpec

    assert batch_max_permutations(1, 0.05, "bh") == DEFAULT_MAX_PERMUTATIONS
    assert batch_max_permutations(1000, 0.05, "bh") == 40_000  # 2·m/q: the floor 1/(B+1) lies below q/m
    for m, q in ((300, 0.05), (1000, 0.1), (2000, 0.05)):
        B = batch_max_permutations(m, q, "bh")
        assert 1 / (B + 1) <= q / m / 2
    assert batch_max_permutations(1000, 0.05, "by") > batch_max_permutations(1000, 0.05, "bh")
    assert batch_max_permutations(10**6, 0.05, "bonferroni") == MAX_BATCH_PERMUTATIONS
    assert batch_max_permutations(1000, 0.05, "none") is None
    # filled in only where the audit left it unset, for the default procedure's ridge scorer
    assert test_options(TestSpec(), 40_000) == {"max_permutations": 40_000}
    assert test_options(TestSpec(options={"max_permutations": 999}), 40_000) == {"max_permutations": 999}
    assert test_options(TestSpec(options={"scorer": "logistic"}), 40_000) == {"scorer": "logistic"}
    assert test_options(TestSpec(procedure="split"), 40_000) == {}
    assert test_options(TestSpec(), None) == {}


def test_raised_cap_resolves_a_strong_audit():
    """With the raised cap an overwhelming audit's p-value drops below the BH threshold q/m."""
    from cdi_ray.pipeline.aggregate import batch_max_permutations

    rng = np.random.default_rng(5)
    P, U = rng.normal(-1.5, 1, (60, 2)), rng.normal(0, 1, (60, 2))
    m, q = 1000, 0.05
    assert run_test(P, U, seed=0).pvalue > q / m  # default cap: floor 1e-4 > 5e-5
    assert run_test(P, U, seed=0, max_permutations=batch_max_permutations(m, q, "bh")).pvalue <= q / m


# ---------------------------------------------------------------------------------------------- manifest
def test_manifest_controls_default_on_and_can_be_turned_off(tmp_path):
    from cdi_ray.spec import ManifestError, parse_manifest

    base = {"models": {"m": {"uri": str(tmp_path)}}, "output": str(tmp_path / "out"),
            "audits": [{"id": "a", "model": "m", "published": "p", "unpublished": "u"},
                       {"id": "b", "model": "m", "published": "p", "unpublished": "u",
                        "controls": {"model_free": False}}]}
    m = parse_manifest(base)
    assert m.controls_of(m.audits[0]).model_free and m.controls_of(m.audits[0]).alpha == 0.05
    assert not m.controls_of(m.audits[1]).model_free
    off = parse_manifest({**base, "controls": {"model_free": False}})
    assert not off.controls_of(off.audits[0]).model_free
    with pytest.raises(ManifestError, match="controls.modelfree.*allowed keys here: model_free, reference_model, alpha"):
        parse_manifest({**base, "controls": {"modelfree": False}})
    with pytest.raises(ManifestError, match=r"controls.reference_model: unknown model 'r'"):
        parse_manifest({**base, "controls": {"reference_model": "r"}})
    with pytest.raises(ManifestError, match=r"audits\[0\].controls.reference_model: 'm' is the audited model"):
        parse_manifest({**base, "audits": [{**base["audits"][1], "controls": {"reference_model": "m"}}]})
    two = {**base, "models": {"m": {"uri": str(tmp_path)}, "r": {"uri": str(tmp_path), "access": "gray-box"}}}
    with pytest.raises(ManifestError, match="gradient features but reference model 'r' is gray-box"):
        parse_manifest({**two, "controls": {"reference_model": "r"}})
    ok = parse_manifest({**two, "controls": {"reference_model": "r"}, "audits": [{**base["audits"][0], "preset": "gray-box"}]})
    assert ok.controls_of(ok.audits[0]).reference_model == "r"


def test_reference_control_fires_when_the_reference_detects():
    from cdi_ray.controls import reference_control

    rng = np.random.default_rng(6)
    strong = run_test(rng.normal(-1.0, 1, (60, 3)), rng.normal(0, 1, (60, 3)), seed=0)
    null = run_test(rng.normal(0, 1, (60, 3)), rng.normal(0, 1, (60, 3)), seed=0)
    c = reference_control(strong, reference="sd-1.4")
    assert c.fired and c.name == "reference-model" and "'sd-1.4'" in c.reason and c.n_published == 60
    assert reference_control(null, reference="sd-1.4").fired == (null.pvalue <= CONTROL_ALPHA)
    failed = reference_control(None, reference="sd-1.4", error="model cannot load")
    assert failed.fired and failed.pvalue is None and "model cannot load" in failed.reason


def test_calibrated_rows_subtract_per_hash_and_need_both_sides_ok():
    from cdi_ray.pipeline.aggregator import calibrated_rows

    target = ({"a": 0, "b": 1, "c": 2, "d": 3}, ["ok", "ok", "error", "ok"], [None, None, "truncated", None],
              np.arange(8.0).reshape(4, 2))
    reference = ({"b": 1, "a": 0, "c": 2}, ["ok", "ok", "ok"], [None, None, None], np.ones((3, 2)))
    rows, status, errors, matrix = calibrated_rows(target, reference)
    assert status == ["ok", "ok", "error", "error"]
    assert errors[2] == "truncated" and errors[3].startswith("reference_features_missing")
    assert np.array_equal(matrix[rows["a"]], [-1.0, 0.0]) and np.array_equal(matrix[rows["b"]], [1.0, 2.0])


def test_reference_calibration_needs_a_reference_model():
    from cdi_ray.spec import ManifestError, parse_manifest

    with pytest.raises(ManifestError, match=r"audits\[0\]\.calibration: 'reference' needs a reference model"):
        parse_manifest({"models": {"m": {"uri": "/m"}}, "output": "/o",
                        "audits": [{"id": "a", "model": "m", "published": "/p", "unpublished": "/u",
                                    "calibration": "reference"}]})


# ---------------------------------------------------------------------------------------------- end to end


def _write(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(images):
        Image.fromarray(x).save(folder / f"{i:04d}.png")


def test_pipeline_class_shift_is_inconclusive_never_used(ray_session, tiny_pixel_dir, bundle, tmp_path):
    """Held-out classes 0–4 as P against held-out classes 5–9 as U on a model that saw neither:
    the guarded audit is inconclusive (naming the descriptors); with the guard off the same audit
    goes unguarded. Features first computed with controls off, so the descriptors come from the
    descriptor-only stream; a re-run computes nothing."""
    from cdi_ray.models.testing import make_tiny_pixel_ddpm
    from cdi_ray.pipeline.run import run_manifest
    from cdi_ray.spec import parse_manifest

    held = bundle.pool("heldout")
    labels = bundle.labels[held]
    n = 40
    _write(tmp_path / "p", bundle.images[held[labels < 5][:n]])
    _write(tmp_path / "u", bundle.images[held[labels >= 5][:n]])
    common = {"model": "m", "published": str(tmp_path / "p"), "unpublished": str(tmp_path / "u"),
              "overrides": {"dl": {"n_draws": 2}}, "test": {"min_samples": 20}}

    ref = make_tiny_pixel_ddpm(tmp_path / "ref", image_size=16, channels=1, seed=7)  # saw nothing either

    def manifest(controls_on: bool):
        audits = [{"id": "shift", **common}, {"id": "shift-unguarded", **common, "controls": {"model_free": False}},
                  {"id": "shift-ref", **common, "controls": {"model_free": False, "reference_model": "ref"}},
                  {"id": "shift-cal", **common, "calibration": "reference",
                   "controls": {"model_free": False, "reference_model": "ref"}}]
        return parse_manifest({
            "models": {"m": {"uri": str(tiny_pixel_dir), "access": "gray-box", "batch_size": 40},
                       "ref": {"uri": str(ref), "access": "gray-box", "batch_size": 40}},
            "audits": audits,
            "controls": {"model_free": controls_on},
            "output": str(tmp_path / "out"),
        })

    # 1. model-free guard off everywhere: features only (audited and reference model), no descriptors
    b0 = run_manifest(manifest(False))
    assert b0.run["descriptors"]["needed"] == 0 and all(a["controls"] == [] for a in b0.audits[:2])
    # 2. guards on (the default for "shift"): descriptors from the descriptor-only stream
    b = run_manifest(manifest(True))
    assert b.run["features"]["computed"] == 0
    assert b.run["descriptors"]["separate"]["computed"] == 2 * n
    by_id = {a["audit_id"]: a for a in b.audits}
    guarded, unguarded = by_id["shift"], by_id["shift-unguarded"]
    assert guarded["verdict"] == "inconclusive" and guarded["controls_fired"] == "model-free"
    (ctl,) = guarded["controls"]
    assert ctl["fired"] and ctl["pvalue"] <= 0.05 and ctl["n_published"] == n and ctl["n_unpublished"] == n
    assert ctl["separating"][0]["descriptor"] in guarded["verdict_reason"]
    assert "without the model" in guarded["verdict_reason"]
    # the unguarded audit: same p-value, no control; the main test does see the shift
    assert unguarded["controls"] == [] and unguarded["controls_fired"] == ""
    assert unguarded["p_value"] == guarded["p_value"]
    assert unguarded["verdict"] == "used"  # the false accusation the guard prevents (the model saw neither set)
    # the reference-model control: a model that cannot have seen P "detects" it too → inconclusive
    with_ref = by_id["shift-ref"]
    assert [c["name"] for c in with_ref["controls"]] == ["reference-model"]
    assert with_ref["verdict"] == "inconclusive" and "reference model 'ref'" in with_ref["verdict_reason"]
    assert with_ref["p_value"] == guarded["p_value"] and len(b.audits) == 4  # no shadow entry, not FDR-counted
    assert b.fdr["n_tested"] == 4
    # reference calibration: the test sees target − reference features of the same images
    cal = by_id["shift-cal"]
    assert cal["feature_calibration"] == "reference:ref" and cal["n_published"] == n
    from cdi_ray.images import content_hash
    from cdi_ray.models import load_model
    from cdi_ray.pipeline import plan
    from cdi_ray.pipeline.store import FeatureStore

    m = manifest(True)
    a_cal = next(a for a in m.audits if a.id == "shift-cal")
    store = FeatureStore(str(tmp_path / "out" / "features"))

    def stored(model_name):
        cfg = m.feature_config(a_cal, model_name)
        t = store.read(load_model(m.models[model_name].uri).fingerprint, plan.store_key(cfg, m.models[model_name]))
        rows = dict(zip(t.column("content_hash").to_pylist(), range(t.num_rows)))
        return rows, np.column_stack([t.column(c).to_numpy() for c in cfg.columns])

    (rows_t, X_t), (rows_r, X_r) = stored("m"), stored("ref")
    hashes = {side: [content_hash(f.read_bytes()) for f in sorted((tmp_path / side).iterdir())] for side in "pu"}
    diff = {side: np.stack([X_t[rows_t[h]] - X_r[rows_r[h]] for h in hs]) for side, hs in hashes.items()}
    from cdi_ray.pipeline.aggregate import batch_max_permutations, test_options

    options = test_options(a_cal.test, batch_max_permutations(4, m.fdr.q, m.fdr.method))
    direct = run_test(diff["p"], diff["u"], procedure=a_cal.test.procedure, alpha=a_cal.test.alpha, seed=a_cal.seed,
                      **options)
    assert cal["p_value"] == pytest.approx(direct.pvalue, rel=1e-12)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["audits"][0]["controls"][0]["name"] == "model-free"
    # 3. re-run: descriptors reused from the store
    b2 = run_manifest(manifest(True))
    assert b2.run["descriptors"]["separate"]["computed"] == 0 and b2.run["descriptors"]["stored_before"] == 2 * n
    assert [a["verdict"] for a in b2.audits] == [a["verdict"] for a in b.audits]

"""Scale (small, CPU): 200 audits over 2 models with shared U sets; every image computed once per model."""
from __future__ import annotations

from cdi_ray.models.testing import make_tiny_pixel_ddpm
from cdi_ray.pipeline.run import run_manifest
from cdi_ray.spec import parse_manifest
from _pipeline_helpers import write_images

N_PER_MODEL = 100   # audits per model → 200 audits
POOL = 40           # distinct published images, shared out among the P sets
N_U_SETS = 5        # U sets, each shared by 20 audits per model
SET = 6             # images per P and per U set


def test_200_audits_two_models_shared_u(ray_session, tiny_pixel_dir, tmp_path, monkeypatch):
    from cdi_ray.pipeline import aggregate

    monkeypatch.setattr(aggregate, "DRIVER_AGGREGATION_IMAGES", 0)  # a large batch's way: the aggregator actors
    other = make_tiny_pixel_ddpm(tmp_path / "model-b", image_size=16, channels=1, seed=7)
    pool = write_images(tmp_path / "pool", POOL, seed=21)
    for k in range(N_U_SETS):
        write_images(tmp_path / f"u{k}", SET, seed=30 + k)
    audits = []
    for model in ("a", "b"):
        for i in range(N_PER_MODEL):
            audits.append({
                "id": f"{model}-{i:03d}", "model": model,
                "published": [pool[(i + j) % POOL] for j in range(SET)],   # overlapping windows over the pool
                "unpublished": str(tmp_path / f"u{i % N_U_SETS}"),
                "overrides": {"dl": {"n_draws": 1}, "ml": {"timesteps": [0, 500]}, "secmi": {"t": 20}},
                "test": {"procedure": "split", "min_samples": 4},
            })
    manifest = parse_manifest({
        "models": {"a": {"uri": str(tiny_pixel_dir), "access": "gray-box", "batch_size": 32},
                   "b": {"uri": str(other), "access": "gray-box", "batch_size": 32}},
        "audits": audits,
        "output": str(tmp_path / "out"),
    })
    b = run_manifest(manifest)

    assert len(b.audits) == 200 and b.summary["done"] == 200 and b.exit_code == 0
    distinct = POOL + N_U_SETS * SET                       # 70 images, each used by many audits
    assert b.run["images"]["listed"] == distinct and b.run["images"]["hashed"] == distinct
    feats = b.run["features"]
    assert feats["per_model"]["a"]["computed"] == distinct and feats["per_model"]["b"]["computed"] == distinct
    assert feats["computed"] == feats["to_compute"] == feats["needed"] == 2 * distinct
    # without de-duplication the audits would have asked for 200 × 12 = 2400 computations
    assert sum(a["n_published"] + a["n_unpublished"] for a in b.audits) == 200 * 2 * SET
    assert b.fdr["n_tested"] == 200 and all(a["p_adjusted"] is not None for a in b.audits)

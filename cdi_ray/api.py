"""The public API: what a notebook, the CLI and the jobs call.

    from cdi_ray import load_manifest, plan_manifest, run_manifest, extract_features, run_test

    manifest = load_manifest("manifest.yaml")          # validated; errors name the field and the fix
    plan = plan_manifest(manifest)                      # what would be computed, on which models (Ray)
    batch = run_manifest(manifest)                      # the whole batch (Ray): verdicts, files, reports
    table = extract_features("models/easy", "images/")  # one model over a folder, in this process (no Ray)
    result = run_test(P, U)                             # the calibrated test on two feature matrices

Each name is the implementation itself (this module only gathers them), imported when first used
so that ``import cdi_ray`` stays light and never starts or imports Ray.
"""
from __future__ import annotations

import os
import tempfile


def extract_features(model: str | os.PathLike, images: str | os.PathLike, *, preset: str = "white-box",
                     seed: int = 0, device: str = "cpu", batch_size: int = 32, out: str | os.PathLike | None = None,
                     **options):
    """Membership features of every image under one model, in this process (no Ray).

    Args:
        model (`str`): a local model directory (see the README's supported families).
        images (`str`): a folder of images, or a text file with one image path per line.
        preset (`str`, *optional*, defaults to ``"white-box"``): ``"white-box"`` (26 features) or ``"gray-box"`` (14).
        seed (`int`, *optional*): the audit seed every random draw derives from (with the image's content hash).
        device (`str`, *optional*, defaults to ``"cpu"``), batch_size (`int`, *optional*, defaults to 32).
        out (`str`, *optional*): also keep the Parquet file here.
        **options: passed on to :func:`cdi_ray.features.extract.extract_to_parquet` (``labels``, ``captions``,
            ``model_options``, ``config``).

    Returns:
        `pyarrow.Table`: one row per image — ``image_id, content_hash, model_fingerprint,
        feature_config_hash`` and the preset's feature columns.
    """
    import pyarrow.parquet as pq

    from cdi_ray.features.extract import extract_to_parquet

    if out is not None:
        extract_to_parquet(model, images, out, preset=preset, seed=seed, device=device, batch_size=batch_size, **options)
        return pq.read_table(out)
    with tempfile.TemporaryDirectory(prefix="cdi-features-") as tmp:
        path = os.path.join(tmp, "features.parquet")
        extract_to_parquet(model, images, path, preset=preset, seed=seed, device=device, batch_size=batch_size, **options)
        return pq.read_table(path).combine_chunks()


_EXPORTS = {
    "load_manifest": "cdi_ray.spec", "parse_manifest": "cdi_ray.spec", "Manifest": "cdi_ray.spec",
    "ManifestError": "cdi_ray.spec",
    "run_manifest": "cdi_ray.pipeline.run", "plan_manifest": "cdi_ray.pipeline.run",
    "BatchResult": "cdi_ray.pipeline.results", "BatchPlan": "cdi_ray.pipeline.plan",
    "run_test": "cdi_ray.stats", "verdict": "cdi_ray.stats",
    "extract_features": "cdi_ray.api",
}

"""The public API: ``from cdi_ray import …`` gives the implementations, lazily and without Ray."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

import cdi_ray


def test_names_are_the_implementations():
    from cdi_ray.pipeline.run import plan_manifest, run_manifest
    from cdi_ray.spec import load_manifest
    from cdi_ray.stats import run_test

    assert cdi_ray.run_manifest is run_manifest and cdi_ray.plan_manifest is plan_manifest
    assert cdi_ray.load_manifest is load_manifest and cdi_ray.run_test is run_test
    assert set(cdi_ray.__all__) <= set(dir(cdi_ray))


def test_import_starts_nothing_and_needs_no_ray_until_a_batch_runs():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import cdi_ray\n"
            "from cdi_ray import load_manifest, parse_manifest, extract_features, run_test\n"
            "assert 'ray' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_extract_features_returns_what_the_cli_writes(tiny_pixel_dir, tmp_path):
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    table = cdi_ray.extract_features(tiny_pixel_dir, tmp_path, preset="gray-box", batch_size=2)
    assert table.num_rows == 3 and table.column_names[:2] == ["image_id", "content_hash"]
    from cdi_ray.cli import main

    assert main(["features", "--model", str(tiny_pixel_dir), "--images", str(tmp_path), "--preset", "gray-box",
                 "--batch-size", "2", "--out", str(tmp_path / "f.parquet")]) == 0
    assert pq.read_table(tmp_path / "f.parquet").equals(table)

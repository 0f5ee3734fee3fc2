"""`cdi-ray` from the command line: the documented exit codes, no tracebacks for user errors."""
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cdi_ray.cli import EXIT_INVALID, EXIT_OK, main


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


@pytest.mark.parametrize("model_fixture, preset, n_features", [
    ("tiny_pixel_dir", "white-box", 26),
    ("tiny_latent_kl_dir", "gray-box", 14),
])
def test_features_command_writes_one_row_per_image(request, image_dir, tmp_path, model_fixture, preset, n_features):
    out = tmp_path / "f.parquet"
    model = request.getfixturevalue(model_fixture)
    assert main(["features", "--model", str(model), "--images", str(image_dir), "--out", str(out),
                 "--preset", preset, "--batch-size", "3"]) == EXIT_OK
    table = pq.read_table(out)
    assert table.num_rows == 4
    assert table.column_names[:4] == ["image_id", "content_hash", "model_fingerprint", "feature_config_hash"]
    assert len(table.column_names) == 4 + n_features


def test_user_errors_exit_2_without_traceback(tmp_path, image_dir, capsys):
    assert main(["features", "--model", str(tmp_path / "missing"), "--images", str(image_dir),
                 "--out", str(tmp_path / "x.parquet")]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {uri: /x, colour: red}}\naudits: []\noutput: out\n")
    assert main(["validate", str(bad)]) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "colour" in err and "Traceback" not in err


def test_validate_accepts_the_shipped_examples(capsys):
    for path in ("examples/manifests/minimal.yaml", "examples/manifests/full.yaml"):
        assert main(["validate", path]) == EXIT_OK
        assert "valid" in capsys.readouterr().out


def test_every_subcommand_has_help():
    for cmd in ("features", "validate", "plan", "audit", "demo", "report"):
        proc = subprocess.run([sys.executable, "-m", "cdi_ray", cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: cdi-ray " + cmd in proc.stdout, proc.stderr

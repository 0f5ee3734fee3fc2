"""jobs/benchmark.py (its sections in jobs/bench/) runs and its table has the expected rows
(tiny models and counts; no timings checked)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_job():
    spec = importlib.util.spec_from_file_location("cdi_ray_benchmark", ROOT / "jobs" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _measures(rows, section):
    return [r.measure for r in rows if r.section == section]


def test_model_layer_sections(bench_job, tmp_path):
    args = bench_job.parse_args(["--tiny", "--only", "passes,method,stats", "--seconds", "0.05",
                                 "--workdir", str(tmp_path)])
    assert args.sections[0] == "floor"  # the method ratios need the floor, so it is added
    rows, state = bench_job.run(args)
    assert [r.section for r in rows][0] == "setup"
    assert len(_measures(rows, "floor")) == len(args.batches) + 1
    for preset in ("white-box", "gray-box"):
        passes = [r for r in rows if r.section == "passes" and r.measure.startswith(preset)]
        assert len(passes) == 1 and passes[0].ok  # planned passes within METHOD.md's count
        assert sum(m.startswith(preset) for m in _measures(rows, "method")) == 3
        performed = state["performed"][preset]
        assert performed["fwd"] == 28 and performed["fb"] >= (16 if preset == "white-box" else 0)
    assert len(_measures(rows, "stats")) == 4
    table = bench_job.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and all(line.count("|") == 6 for line in table.splitlines())


def test_gpu_dit_xl_mode_runs_on_cpu_with_a_tiny_dit(bench_job, tmp_path):
    args = bench_job.parse_args(["--gpu-dit-xl", "--tiny", "--preset", "gray-box", "--seconds", "0.05",
                                 "--workdir", str(tmp_path)])
    assert args.sections == ["floor", "passes", "method"] and args.device == "cpu"
    rows, _ = bench_job.run(args)
    assert "tiny DiT" in rows[0].value
    assert len(_measures(rows, "method")) == 3


def test_unknown_section_is_a_clear_error(bench_job, capsys):
    with pytest.raises(SystemExit):
        bench_job.parse_args(["--only", "floor,nope"])
    assert "unknown section(s) ['nope']" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message given where CUDA is absent")
def test_gpu_mode_without_cuda_is_a_clear_error(bench_job, capsys):
    with pytest.raises(SystemExit):
        bench_job.parse_args(["--gpu-dit-xl"])
    assert "add --tiny" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_sections(bench_job, tmp_path, ray_session):
    """Two child drivers on the session's Ray, one per section (each a new Ray job with cold workers,
    ≈ 20 s on a 2-core machine); one scaling case — the ratio rows of two cases are plain arithmetic."""
    args = bench_job.parse_args(["--tiny", "--only", "e2e,scaling", "--preset", "gray-box", "--source", "local",
                                 "--collections", "2", "--seconds", "0.05", "--workdir", str(tmp_path)])
    rows, state = bench_job.run(args)
    assert set(state["e2e"]) == {"gray-box/local"}
    e2e = state["e2e"]["gray-box/local"]
    assert e2e["computed"] == args.e2e_images and e2e["done"] == 1
    assert e2e["cpu_s"]["actors"] > 0  # the feature actor's process was found and charged
    # every process's seconds are attributed to a title, and the titles add up to the groups
    by_title = e2e["cpu_by_title"]
    assert any("FeatureActor" in r["title"] and r["group"] == "actors" for r in by_title)
    for group, seconds in e2e["cpu_s"].items():
        assert sum(r["cpu_s"] for r in by_title if r["group"] == group) == pytest.approx(seconds, abs=0.1)
    assert len(_measures(rows, "e2e")) == 3
    loads = [r for r in rows if r.section == "scaling" and "model loads" in r.measure]
    assert len(loads) == 1 and all(r.ok for r in loads)  # one load per actor, every image computed, audits done
    assert [c["collections"] for c in state["scaling"]] == [2]


def test_ray_daemons_are_not_charged_to_the_pipeline(bench_job):
    """The raylet's command line names default_worker.py (the command it starts workers with): it is
    still a daemon, not a worker whose CPU counts against the pipeline."""
    from jobs.bench.process_meters import ProcessCpu  # importable once the job put the root on the path

    raylet = "/venv/ray/core/src/ray/raylet/raylet --raylet_socket_name=x --python_worker_command=python default_worker.py"
    assert ProcessCpu.group(raylet) == "daemons"
    assert ProcessCpu.group("/venv/ray/core/src/ray/gcs/gcs_server --log_dir=x") == "daemons"
    assert ProcessCpu.group("ray::IDLE") == "tasks"
    assert ProcessCpu.group("ray::MapWorker(MapBatches(decode_batch)->MapBatches(FeatureActor))") == "actors"
    assert ProcessCpu.group("python /venv/ray/_private/workers/default_worker.py --node-ip-address=x") == "tasks"


def test_compare_divides_both_versions_by_the_same_pooled_floor(tmp_path, capsys):
    """jobs/benchmark_compare.py: a version whose workers spend 10 % more on the same work shows +10 %,
    and its ratio to the pooled floor is lower by exactly that factor, whatever each run's own floor."""
    import json
    import runpy

    def run_file(name, floor, actors):
        cpu = {"actors": actors, "tasks": 0.0, "aggregators": 0.0, "ray_data": 0.0, "daemons": 5.0, "driver": 9.0}
        path = tmp_path / name
        path.write_text(json.dumps({"raw": {"e2e": {"gray-box/local": {
            "floor_cpu_s": floor, "cpu_s": cpu, "ratio": {"cpu": floor / actors}}}}}))
        return str(path)

    compare = runpy.run_path(str(ROOT / "jobs" / "benchmark_compare.py"))
    compare["main"](["a=" + run_file("a.json", 90.0, 100.0), "b=" + run_file("b.json", 130.0, 110.0)])
    out = capsys.readouterr().out
    assert "mean +10.0%" in out
    pooled = 110.0  # (90 + 130) / 2
    assert f"{pooled / 100:.3f} |" in out and f"{pooled / 110:.3f} |" in out

"""cdi_ray.spec: the manifest — smallest form, defaults, round trip, and errors that name field and fix."""
from __future__ import annotations

import json
import textwrap

import pytest

from cdi_ray.spec import ListFile, Manifest, ManifestError, check_registries, json_schema, load_manifest, parse_manifest

SMALLEST = textwrap.dedent("""\
    models: {sd-mini: {uri: s3://models/sd-mini}}
    audits: [{id: artist-042, model: sd-mini, published: s3://owners/artist-042/published/, unpublished: s3://owners/artist-042/unpublished/}]
    output: s3://audits/2026-11-28/
""")


def base(**audit):
    a = {"id": "a1", "model": "m", "published": "s3://b/p/", "unpublished": "s3://b/u/", **audit}
    return {"models": {"m": {"uri": "s3://models/m"}}, "audits": [a], "output": "s3://out/"}


def problems(data) -> list[str]:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(data)
    return exc.value.problems


def test_smallest_manifest_from_the_issue(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(SMALLEST)
    m = load_manifest(path)
    model = m.models["sd-mini"]
    assert model.uri == "s3://models/sd-mini" and model.access == "white-box"
    assert (model.batch_size, model.num_gpus, model.min_replicas, model.max_replicas) == (32, 0.0, 1, 1)
    assert model.resolved_device == "cpu"
    a = m.audits[0]
    assert a.published == "s3://owners/artist-042/published/" and a.seed == 0
    assert m.preset_of(a) == "white-box" and a.test.procedure == "crossfit-permutation"
    assert m.fdr.method == "bh" and m.store_uri() == "s3://audits/2026-11-28/features"
    # JSON is accepted too, and a validated manifest round-trips through its JSON dump
    jpath = tmp_path / "m.json"
    jpath.write_text(json.dumps(m.model_dump(mode="json")))
    assert load_manifest(jpath) == m
    assert Manifest.model_validate_json(m.model_dump_json()) == m
    assert m.content_hash() == load_manifest(jpath).content_hash()


def test_sources_three_forms_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "m.yaml"
    path.write_text(textwrap.dedent("""\
        models: {m: {uri: ../models/m, access: gray-box, num_gpus: 1, min_replicas: 0, max_replicas: 4}}
        audits:
          - {id: a, model: m, published: data/p, unpublished: [u/1.png, s3://b/u/2.png]}
          - {id: b, model: m, published: {list_file: lists/p.txt}, unpublished: /abs/u}
        output: out
    """).replace("min_replicas: 0", "min_replicas: 1"))
    m = load_manifest(path)
    d = str(tmp_path / "sub")
    assert m.models["m"].uri == str(tmp_path / "models" / "m")
    assert m.models["m"].resolved_device == "cuda"
    assert m.audits[0].published == f"{d}/data/p"
    assert m.audits[0].unpublished == [f"{d}/u/1.png", "s3://b/u/2.png"]
    assert m.audits[1].published == ListFile(list_file=f"{d}/lists/p.txt")
    assert m.audits[1].unpublished == "/abs/u"
    assert m.output == f"{d}/out" and m.preset_of(m.audits[0]) == "gray-box"


def test_unknown_key_names_field_and_allowed_keys():
    data = base()
    data["models"]["m"]["batchsize"] = 8
    data["outptu"] = "x"
    p = problems(data)
    assert any(s.startswith("models.m.batchsize: unknown key 'batchsize'") and "batch_size" in s for s in p), p
    assert any(s.startswith("outptu: unknown key") and "output" in s for s in p), p


def test_wrong_types_and_ranges():
    data = base(seed="abc", test={"alpha": 2})
    data["models"]["m"]["access"] = "grey"
    p = problems(data)
    assert any(s.startswith("audits[0].seed:") and "'abc'" in s for s in p), p
    assert any(s.startswith("audits[0].test.alpha:") and "less than 1" in s for s in p), p
    assert any(s.startswith("models.m.access:") and "'white-box' or 'gray-box'" in s for s in p), p


def test_missing_required_field():
    data = base()
    del data["output"]
    assert problems(data) == ["output: required field is missing — add `output:`"]


def test_duplicate_audit_id_and_unknown_model():
    data = base()
    data["audits"].append({**data["audits"][0]})
    data["audits"].append({**data["audits"][0], "id": "a3", "model": "sd-mni"})
    p = problems(data)
    assert "audits[1].id: duplicate audit id 'a1' (first at audits[0]) — give each audit a unique id" in p
    assert "audits[2].model: unknown model 'sd-mni' — use one of the names under `models:` (m)" in p


def test_bad_sources():
    p = problems(base(published=5, unpublished={"lst": "x"}))
    assert any(s.startswith("audits[0].published: not a valid image source (got 5)") and "list_file" in s for s in p), p
    assert any(s.startswith("audits[0].unpublished: not a valid source mapping (got keys ['lst'])") and "webdataset" in s
               for s in p), p
    assert problems(base(published=[])) == ["audits[0].published: published is an empty list; give at least one image URI"]
    assert problems(base(published={"parquet": "s3://b/x.parquet", "label_col": "y"}))[0].startswith(
        "audits[0].published: not a valid source mapping")
    assert problems(base(labels={"missing": "none"})) == [
        "audits[0].labels.missing: 'none' is not allowed — use one of 'error' or 'null'"]


def test_shard_sources_sidecars_and_label_maps_resolve_relative_paths(tmp_path):
    from cdi_ray.spec import ImageFolder, ParquetShards, WebDatasetShards, json_schema, shard_source

    m = parse_manifest(base(published={"webdataset": ["p/shard-{000..009}.tar", "s3://b/more-*.tar"]},
                            unpublished={"folder": "u", "metadata": "u/meta.csv"},
                            labels={"map": "synsets.json", "missing": "null"}), base_dir=str(tmp_path))
    a = m.audits[0]
    assert a.published == WebDatasetShards(webdataset=[str(tmp_path / "p/shard-{000..009}.tar"), "s3://b/more-*.tar"])
    assert a.unpublished == ImageFolder(folder=str(tmp_path / "u"), metadata=str(tmp_path / "u/meta.csv"))
    assert a.labels.map == str(tmp_path / "synsets.json") and a.labels.missing == "null"
    # a string ending in .tar / .parquet is a shard source with the defaults
    assert shard_source("s3://b/s-{0..3}.tar") == WebDatasetShards(webdataset="s3://b/s-{0..3}.tar")
    assert shard_source("x/*.parquet") == ParquetShards(parquet="x/*.parquet") and shard_source("s3://b/imgs/") is None
    assert "webdataset" in json.dumps(json_schema()) and "label_column" in json.dumps(json_schema())


def test_pool_and_device_consistency():
    data = base()
    data["models"]["m"].update(min_replicas=3, max_replicas=2)
    assert problems(data) == ["models.m: max_replicas (2) is smaller than min_replicas (3); raise max_replicas or lower min_replicas"]
    data = base()
    data["models"]["m"].update(device="cuda")
    assert "num_gpus" in problems(data)[0]


def test_feature_settings_checked_against_registry_and_access():
    data = base(preset="white-box")
    data["models"]["m"]["access"] = "gray-box"
    assert "audits[0].preset: preset 'white-box' needs gradients but model 'm' is gray-box" in problems(data)[0]
    p = problems(base(features=["dl", "foo"]))
    assert p[0].startswith("audits[0].features: unknown feature(s) ['foo']; valid features: dl,")
    p = problems(base(overrides={"pia": {"q": 1}}))
    assert p[0].startswith("audits[0].overrides: invalid overrides for feature 'pia'")
    # a valid explicit feature list with overrides is accepted
    parse_manifest(base(features=["dl", "pia"], overrides={"dl": {"n_draws": 2}}))


@pytest.mark.parametrize("audit", [
    {"preset": "white-box"},  # needs gradients, the model is gray-box
    {"features": ["dl", "foo"]},
    {"overrides": {"pia": {"q": 1}}, "test": {"procedure": "splt"}},
    {"test": {"procedure": "split", "options": {"nope": 1}}},
])
def test_registry_checks_deferred_report_the_same_problems(audit):
    """Commands check the feature options and test procedures while Ray starts (registries=False, then
    check_registries): the same problems, worded the same, as one full validation."""
    data = base(**audit)
    data["models"]["m"]["access"] = "gray-box"
    structural = parse_manifest(data, registries=False)  # nothing else is wrong
    with pytest.raises(ManifestError) as exc:
        check_registries(structural)
    assert exc.value.problems == problems(data)
    assert check_registries(parse_manifest(base(), registries=False)) == parse_manifest(base())


def test_test_settings_checked_against_procedures():
    p = problems(base(test={"procedure": "splt"}))
    assert p[0].startswith("audits[0].test.procedure: unknown procedure 'splt' — use one of") and "split" in p[0]
    p = problems(base(test={"procedure": "split", "options": {"nope": 1}}))
    assert p[0] == "audits[0].test.options: unknown option(s) ['nope'] for 'split' — valid options: fit_fraction"


def test_file_level_errors(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML/JSON"):
        load_manifest(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text(SMALLEST.replace("models: {sd-mini: {uri: s3://models/sd-mini}}",
                                    "models: {sd-mini: {uri: s3://a}, sd-mini: {uri: s3://b}}"))
    with pytest.raises(ManifestError, match="duplicate key 'sd-mini'"):
        load_manifest(dup)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ManifestError, match="expected a mapping"):
        load_manifest(lst)


def test_json_schema_export():
    schema = json_schema()
    assert set(schema["required"]) == {"models", "audits", "output"}
    assert "ModelSpec" in schema["$defs"] and "AuditSpec" in schema["$defs"]
    assert schema["$defs"]["ModelSpec"]["additionalProperties"] is False


def test_example_manifests_validate():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "examples" / "manifests").glob("*.yaml"))
    assert files, "examples/manifests/*.yaml"
    for f in files:
        load_manifest(f)


def test_unsupported_locations_fail_at_load_not_mid_run():
    data = base(published="gs://b/p", unpublished=["s3:///x.png"])
    data["models"]["m"]["uri"] = "gs://x/m"
    data["output"] = "hdfs://o"
    p = problems(data)
    assert "models.m.uri: unsupported scheme 'gs://' in 'gs://x/m' — use a local path, file:// or s3://" in p
    assert "output: unsupported scheme 'hdfs://' in 'hdfs://o' — use a local path, file:// or s3://" in p
    assert any(s.startswith("audits[0].published: unsupported scheme 'gs://'") for s in p)
    assert "audits[0].unpublished: 's3:///x.png' names no bucket — write s3://BUCKET/PREFIX" in p


def test_warm_task_pool_is_for_cpu_models_only():
    data = base()
    data["models"]["m"].update(pool="tasks", num_gpus=1)
    p = problems(data)
    assert any("pool 'tasks'" in s and "use pool: actors" in s for s in p), p
    data["models"]["m"].update(pool="actors")
    assert parse_manifest(data).models["m"].pool == "actors"
    assert parse_manifest(base()).models["m"].pool == "auto"

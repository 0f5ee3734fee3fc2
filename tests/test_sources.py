"""Collections as stored (loose files + sidecar, WebDataset tar, Parquet) and per-image conditioning — no Ray.

Real files on disk, real tiny models: shards written by ``cdi_ray.packing.pack`` are indexed and
read back byte-for-byte, and labels are checked to reach the model through the feature actor.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdi_ray import sources
from cdi_ray.packing import pack
from cdi_ray.conditioning import conditioning_for, image_key, read_label_map
from cdi_ray.images import content_hash
from cdi_ray.sources import ImageEntry, ShardSpec
from _pipeline_helpers import write_images

FAST = {"dl": {"n_draws": 2}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """7 RGB-less grayscale PNGs with a JSONL sidecar: label i % 3, two captions each."""
    root = tmp_path_factory.mktemp("src") / "imgs"
    paths = write_images(root, 7, seed=1)
    with open(root / "metadata.jsonl", "w") as f:
        for i, p in enumerate(paths):
            f.write(json.dumps({"file": os.path.basename(p), "label": str(i % 3), "captions": [f"cap {i}", "b"]}) + "\n")
    return root


def _hashes(paths):
    return [content_hash(open(p, "rb").read()) for p in paths]


# ---------------------------------------------------------------------------------------------- patterns
def test_brace_ranges_keep_zero_padding_and_alternatives():
    assert sources.expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert sources.expand_braces("{a,b}/{1..2}.parquet") == ["a/1.parquet", "a/2.parquet", "b/1.parquet", "b/2.parquet"]
    with pytest.raises(ValueError, match="backwards"):
        sources.expand_braces("s-{3..1}.tar")


def test_patterns_name_existing_shards_or_fail_clearly(folder, tmp_path):
    out = pack(str(folder), str(tmp_path / "wds"), fmt="webdataset", shard_size=3)
    assert len(out["shards"]) == 3
    assert [e.uri for e in sources.expand_pattern(str(tmp_path / "wds" / "shard-*.tar"))] == out["shards"]
    assert [e.uri for e in sources.expand_pattern(str(tmp_path / "wds" / "shard-{000000..000001}.tar"))] == out["shards"][:2]
    with pytest.raises(FileNotFoundError):
        sources.expand_pattern(str(tmp_path / "wds" / "nope-*.tar"))
    with pytest.raises(FileNotFoundError):
        sources.expand_pattern(str(tmp_path / "wds" / "shard-{000000..000009}.tar"))


# ---------------------------------------------------------------------------------------------- pack → index → read
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_pack_index_read_round_trip_keeps_bytes_labels_and_captions(folder, tmp_path, fmt):
    paths = sorted(str(p) for p in folder.glob("*.png"))
    out = pack(str(folder), str(tmp_path / fmt), fmt=fmt, shard_size=3)
    assert out["images"] == 7 and out["metadata"].endswith("metadata.jsonl")
    spec = ShardSpec("webdataset") if fmt == "webdataset" else ShardSpec("parquet", "image", "label", "captions", "id")
    members = []
    for shard in out["shards"]:
        got, err = sources.index_shard(shard, "v1", spec)
        assert err is None
        members += got
    # identity: the content hash of a member is the hash of the file it was packed from
    assert [m.content_hash for m in members] == _hashes(paths)
    assert [m.label for m in members] == [str(i % 3) for i in range(7)]
    assert [m.captions for m in members] == [(f"cap {i}", "b") for i in range(7)]
    # reading by locator gives the bytes back (in a shuffled order: no dependence on order)
    order = [5, 0, 6, 2, 1, 4, 3]
    data = sources.read_images([members[i].uri for i in order], [members[i].loc for i in order])
    assert [content_hash(d) for d in data] == [_hashes(paths)[i] for i in order]


def test_tar_members_nearby_are_fetched_with_one_ranged_read(folder, tmp_path, monkeypatch):
    out = pack(str(folder), str(tmp_path / "one"), fmt="webdataset", shard_size=100)
    members, _ = sources.index_tar(out["shards"][0], "v")
    from cdi_ray.sources import reading

    calls = []
    real = reading.read_range
    monkeypatch.setattr(reading, "read_range", lambda *a: calls.append(a) or real(*a))
    data = sources.read_images([m.uri for m in members], [m.loc for m in members])
    assert len(calls) == 1 and all(isinstance(d, bytes) for d in data)


def test_corrupt_members_are_reported_per_image_and_the_shard_goes_on(folder, tmp_path):
    good = sorted(folder.glob("*.png"))[:2]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("a.png", good[0].read_bytes())
        add("a.cls", b"1")
        add("junk.png", b"not an image at all")
        add("b.png", good[1].read_bytes())
        add("b.json", b"{broken json")
        add("c.png", good[0].read_bytes())
    shard = tmp_path / "bad.tar"
    shard.write_bytes(buf.getvalue())
    members, err = sources.index_tar(str(shard), "v")
    assert err is None
    by = {m.uri.rsplit("#", 1)[1]: m for m in members}
    assert set(by) == {"a.png", "junk.png", "b.png", "c.png"}
    assert by["a.png"].label == "1" and by["a.png"].error is None
    assert by["b.png"].error.startswith("bad_metadata") and "json" in by["b.png"].error
    assert by["junk.png"].content_hash == content_hash(b"not an image at all")  # decoding reports it later, per image
    # a truncated shard keeps the members read before the cut and says why it stopped
    cut = tmp_path / "cut.tar"
    cut.write_bytes(buf.getvalue()[:1800])
    members, err = sources.index_tar(str(cut), "v")
    assert err and err.startswith("shard_truncated") and [m.uri.rsplit("#", 1)[1] for m in members] == ["a.png"]


def test_parquet_reads_hf_style_struct_columns_and_names_missing_columns(folder, tmp_path):
    paths = sorted(folder.glob("*.png"))[:3]
    table = pa.table({"img": [{"bytes": p.read_bytes(), "path": p.name} for p in paths] + [None],
                      "cls": ["n0", "n1", None, "n2"]})
    f = tmp_path / "hf.parquet"
    pq.write_table(table, f, row_group_size=2)
    members, _ = sources.index_parquet(str(f), "v", ShardSpec("parquet", "img", "cls"))
    assert [m.content_hash for m in members[:3]] == _hashes(paths)
    assert [m.label for m in members] == ["n0", "n1", None, None]
    assert members[3].error.startswith("no_image") and members[3].uri.endswith("#row=3")
    assert members[2].loc == "parquet:1:0:img"
    with pytest.raises(ValueError, match="no column"):
        sources.index_parquet(str(f), "v", ShardSpec("parquet", "image"))


def test_sidecars_jsonl_and_csv_and_their_errors(tmp_path):
    (tmp_path / "m.csv").write_text("name,label,captions\nsub/a.png,7,one|two\nb.png,,\n")
    assert sources.read_sidecar(str(tmp_path / "m.csv")) == {"sub/a.png": ("7", ("one", "two")), "b.png": (None, ())}
    (tmp_path / "m.jsonl").write_text('{"file": "a.png", "label": 3}\n{"label": 1}\n')
    with pytest.raises(ValueError, match="line 2: no image name"):
        sources.read_sidecar(str(tmp_path / "m.jsonl"))
    (tmp_path / "m2.jsonl").write_text('{"file": "a.png", "captions": [1, 2]}\n')
    with pytest.raises(ValueError, match="line 1: captions must be"):
        sources.read_sidecar(str(tmp_path / "m2.jsonl"))


# ---------------------------------------------------------------------------------------------- conditioning
CLASS_INFO = {"conditioning_kind": "class", "num_classes": 5, "null_class": None,
              "class_names": {"0": "cat", "1": "dog"}}


def test_labels_resolve_by_map_then_class_names_then_index():
    entries = [ImageEntry(f"u{i}", 1, "", label=lab) for i, lab in enumerate(["syn_x", "dog", "3", None])]
    hashes = {f"u{i}": f"h{i}" for i in range(4)}
    with pytest.raises(ValueError, match="1 image.*no class label.*missing: null"):
        conditioning_for(entries, hashes, CLASS_INFO, label_map={"syn_x": 4}, missing="error")
    with pytest.raises(ValueError, match="no null class"):
        conditioning_for(entries, hashes, CLASS_INFO, label_map={"syn_x": 4}, missing="null")
    cond, rep = conditioning_for(entries, hashes, {**CLASS_INFO, "null_class": 0}, label_map={"syn_x": 4}, missing="null")
    assert [cond[f"u{i}"].label for i in range(4)] == [4, 1, 3, 0]
    assert rep.to_dict()["null_class_used"] == 1 and rep.to_dict()["labelled"] == 3
    with pytest.raises(ValueError, match="neither in the label map"):
        conditioning_for(entries[:1], hashes, CLASS_INFO, label_map={}, missing="error")
    with pytest.raises(ValueError, match=r"outside the model's classes \[0, 4\]"):
        conditioning_for([ImageEntry("u0", 1, "", label="9")], hashes, CLASS_INFO, label_map={}, missing="error")


def test_store_keys_record_exactly_the_conditioning_the_model_sees():
    e = [ImageEntry("u", 1, "", label="2", captions=("a cat",))]
    none, _ = conditioning_for(e, {"u": "h"}, {"conditioning_kind": "none"}, label_map={}, missing="error")
    cls, _ = conditioning_for(e, {"u": "h"}, CLASS_INFO, label_map={}, missing="error")
    txt, _ = conditioning_for(e, {"u": "h"}, {"conditioning_kind": "text"}, label_map={}, missing="error")
    # unconditional: the bytes alone, and nothing passed to the model (labels cannot split its features)
    assert none["u"].key == "h" and none["u"].label is None and none["u"].captions == ()
    assert cls["u"].key == image_key("h", "class", label=2) != image_key("h", "class", label=3)
    assert txt["u"].captions == ("a cat",) and txt["u"].key != image_key("h", "text", captions=("a dog",))
    assert len({none["u"].key, cls["u"].key, txt["u"].key}) == 3


def test_label_maps_inline_json_and_csv(tmp_path):
    (tmp_path / "m.json").write_text('{"n01440764": 0, "n01443537": "1"}')
    (tmp_path / "m.csv").write_text("synset,index\nn01440764,0\nn01443537,1\n")
    want = {"n01440764": 0, "n01443537": 1}
    assert read_label_map(str(tmp_path / "m.json")) == read_label_map(str(tmp_path / "m.csv")) == want
    with pytest.raises(ValueError, match="not an integer"):
        read_label_map({"a": "x"})


def test_labels_reach_the_adapter_through_the_feature_actor(tiny_pixel_class_dir, folder):
    """The same image under two labels gets different features, each equal to a direct FeatureExtractor
    call with that label; the rows are keyed by (content, label)."""
    import torch

    from cdi_ray.features.config import FeatureConfig
    from cdi_ray.features.extractor import FeatureExtractor
    from cdi_ray.images import decode_image, preprocess
    from cdi_ray.models import load_model
    from cdi_ray.models.base import ImageMeta
    from cdi_ray.models.fingerprint import model_fingerprint
    from cdi_ray.pipeline.actors import FeatureActor, decode_batch

    cfg = FeatureConfig(features=("dl",), overrides=FAST)
    key = cfg.config_hash()
    actor = FeatureActor(model_uri=str(tiny_pixel_class_dir), fingerprint=model_fingerprint(tiny_pixel_class_dir),
                         configs={key: cfg.model_dump(mode="json", exclude={"device"})})
    path = str(sorted(folder.glob("*.png"))[0])
    h = content_hash(open(path, "rb").read())
    labels = [1, 3]
    keys = [image_key(h, "class", label=lab) for lab in labels]
    batch = decode_batch({"uri": np.array([path] * 2, dtype=object), "content_hash": np.array([h] * 2, dtype=object),
                          "key": np.array(keys, dtype=object), "label": np.array(labels),
                          "captions": np.array(["[]"] * 2, dtype=object), "configs": np.array([key] * 2, dtype=object)},
                         size=16, channels=3)
    out = actor(batch)
    assert out.column("key").to_pylist() == keys and out.column("status").to_pylist() == ["ok", "ok"]
    feats = np.array(out.column("features").to_pylist())
    assert not np.allclose(feats[0], feats[1])  # the label changes the prediction
    model = load_model(tiny_pixel_class_dir)
    direct = FeatureExtractor(model, cfg)
    x = torch.as_tensor(preprocess(decode_image(open(path, "rb").read(), name=path), size=16, channels=3))[None]
    for lab, row in zip(labels, feats):
        values = direct(x, [ImageMeta(content_hash=h, label=lab)])
        assert row == pytest.approx([float(values[c][0]) for c in direct.columns], rel=1e-5, abs=1e-7)


def test_the_null_class_reaches_the_model_through_its_own_option(tiny_dit_dir, tmp_path):
    """An image given the null class travels without a label and the stream loads the model with
    missing_label="null" (DiT's null index is outside its [0, num_classes)); labelled rows keep theirs,
    and the stream reads shard members in shard order."""
    from cdi_ray.models import load_model
    from cdi_ray.models.base import ImageMeta
    from cdi_ray.pipeline import rows
    from cdi_ray.pipeline.actors import image_metas
    from cdi_ray.pipeline.describe import ModelInfo
    from cdi_ray.pipeline.plan import plan_stream
    from cdi_ray.spec import ModelSpec

    info = ModelInfo("fp", 16, 3, "dit", "class", 10, 10)
    work = pa.table({"key": [image_key("hb", "class", label=10), image_key("ha", "class", label=3)],
                     "content_hash": ["hb", "ha"], "uri": ["s#b", "s#a"], "loc": ["tar:900:5", "tar:10:5"],
                     "label": pa.array([10, 3], pa.int64()), "captions": pa.array([[], []], pa.list_(pa.string())),
                     "configs": pa.array([["c"], ["c"]], pa.list_(pa.string()))})

    class Needs:
        configs, columns = {"c": {}}, {"c": ["dl"]}

    spec = ModelSpec(uri="/m", options={"dtype_hint": 1})
    stream = plan_stream("m", spec, info, work, Needs, pa.array([], pa.string()), str(tmp_path))
    assert stream.load_options == {"dtype_hint": 1, "missing_label": "null"}
    decoded = rows.decode(pq.read_table(stream.work).to_pydict())
    assert [(r.content_hash, r.label) for r in decoded] == [("ha", 3), ("hb", None)]  # shard order; null → no label
    assert plan_stream("m", spec, info, work.slice(1), Needs, pa.array([], pa.string()), str(tmp_path)).load_options \
        == {"dtype_hint": 1}  # no null row: the model loads as configured
    metas = image_metas(decoded)
    assert metas == [ImageMeta("ha", 3), ImageMeta("hb")]
    model = load_model(tiny_dit_dir, missing_label="null")
    assert model.conditioning(metas).tolist() == [3, model.null_class] == [3, 10]


def test_stream_rows_round_trip_through_their_wire_columns():
    from cdi_ray.pipeline import rows

    batch = [rows.ImageRow("s3://b/s.tar#k.png", "tar:512:10", "h1", "k1", ("c1", "c2"), 4, ("a cat", "a, \"dog\""), True),
             rows.ImageRow("/x/y.png", "", "h2", "h2", ("c1",))]
    table = rows.encode(batch)
    assert table.schema == rows.SCHEMA
    assert rows.decode(table.to_pydict()) == batch
    numpy = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    assert rows.decode(numpy) == batch


def test_pack_cli_refuses_bad_input_with_exit_2(folder, tmp_path, capsys):
    from cdi_ray.cli import main

    (tmp_path / "bad.jsonl").write_text("{oops\n")
    assert main(["pack", str(folder), str(tmp_path / "o"), "--format", "parquet", "--metadata", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl line 1: not valid JSON" in capsys.readouterr().err
    assert main(["pack", str(folder), str(tmp_path / "o"), "--format", "webdataset", "--shard-size", "0"]) == 2
    assert main(["pack", str(tmp_path / "empty"), str(tmp_path / "o"), "--format", "webdataset"]) == 2
    assert not (tmp_path / "o").exists()

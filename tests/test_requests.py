"""Bulk requests without Ray: intake (every rejection reason, every file format), the owner family
(Holm's values and error rate, the permutation cap), and the owner's independence from the batch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cdi_ray.requests import family as fam
from cdi_ray.requests import run_requests
from cdi_ray.requests.intake import REASONS, IntakeError, Request, load_registry, parse_row, read_requests
from _pipeline_helpers import write_images


# ----------------------------------------------------------------------------------------------
# the family: Holm
# ----------------------------------------------------------------------------------------------
def test_holm_matches_r_p_adjust():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") = 0.03 0.06 0.06 0.02
    assert fam.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # a failed audit counts in the family as p = 1 and has no adjusted value
    assert fam.holm([0.01, None]) == pytest.approx([0.02, None])
    assert fam.holm([]) == []
    with pytest.raises(ValueError):
        fam.holm([1.5])


def test_holm_controls_the_family_wise_error_under_any_dependence():
    """k = 3 null tests, independent and perfectly dependent: P(any rejection) ≤ α (± 3 SE)."""
    rng = np.random.default_rng(0)
    n, k, alpha = 20_000, 3, 0.05
    se = 3 * np.sqrt(alpha * (1 - alpha) / n)
    rates = [np.mean([min(fam.holm(list(row))) <= alpha for row in p])
             for p in (rng.uniform(size=(n, k)), np.repeat(rng.uniform(size=(n, 1)), k, axis=1))]
    assert all(r <= alpha + se for r in rates)
    assert rates[0] >= alpha - 2 * se  # independent tests: Holm spends (nearly) all of α, it is not a blunt cut


def test_holm_rejects_what_bonferroni_does_and_more():
    rng = np.random.default_rng(1)
    for _ in range(500):
        p = list(rng.uniform(0, 0.05, size=4))
        holm = np.array(fam.holm(p))
        assert np.all(holm <= np.minimum(1, 4 * np.array(p)) + 1e-15)
        assert np.all(holm >= np.array(p))


@pytest.mark.parametrize("k", [1, 2, 5, 26, 200])
@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_the_permutation_cap_lets_holm_reach_alpha_over_k(k, alpha):
    cap = fam.family_max_permutations(k, alpha)
    assert 1 / (cap + 1) <= alpha / k / 2  # the floor sits below the smallest threshold, with room


def test_family_test_raises_the_cap_only_where_the_default_cannot_resolve_alpha_over_k():
    default = fam.default_cap("crossfit-permutation", {})
    small, _ = fam.family_test({}, 2, 0.01)
    assert "max_permutations" not in (small.get("options") or {})  # 2 models: the default already resolves α/2
    k = int(2 * default * 0.01) + 1  # so many models that α/k falls below the default's floor
    big, warning = fam.family_test({"options": {"scorer": "ridge"}}, k, 0.01)
    assert big["options"]["max_permutations"] == fam.family_max_permutations(k, 0.01) and warning is None
    kept, warning = fam.family_test({"options": {"max_permutations": 99}}, 2, 0.01)
    assert kept["options"]["max_permutations"] == 99 and "cannot resolve" in warning
    assert fam.family_test({"procedure": "split"}, 50, 0.01) == ({"procedure": "split"}, None)  # analytic: no cap


def test_an_owners_verdict_never_moves_with_the_batch_but_batch_bh_does():
    """The same owner's two p-values among 0, 10 and 10,000 other owners' (uniform) p-values:
    Holm within the request never changes; the batch-wide BH adjustment does."""
    rng = np.random.default_rng(2)
    mine = [0.003, 0.2]
    holm_alone = fam.holm(mine)
    bh = []
    for others in (0, 10, 10_000):
        batch = mine + list(rng.uniform(size=2 * others))
        assert fam.holm(batch[:2]) == holm_alone
        bh.append(fam.batch_bh(batch, 0.05)[0])
    assert holm_alone[0] <= 0.01 and bh[0] <= 0.05 < bh[-1]  # BH would lose this owner's finding in a big batch


# ----------------------------------------------------------------------------------------------
# intake
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def registry_file(tmp_path, tiny_pixel_dir):
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"models": {"a": {"uri": str(tiny_pixel_dir), "access": "gray-box"},
                                               "b": {"uri": str(tiny_pixel_dir), "access": "gray-box"}},
                                    "defaults": {"test": {"alpha": 0.05, "min_samples": 5}}}))
    return path


@pytest.fixture()
def collections(tmp_path):
    for name in ("p", "u", "q"):
        write_images(tmp_path / name, 3, seed=len(name) + ord(name[0]))
    (tmp_path / "shards").mkdir()
    (tmp_path / "list.txt").write_text("p/0000.png\n")
    return tmp_path


def test_registry_is_validated_once_with_its_defaults(tmp_path, registry_file, tiny_pixel_dir):
    reg = load_registry(str(registry_file), output=str(tmp_path / "out"))
    assert list(reg.models) == ["a", "b"] and reg.alpha == 0.05 and reg.models["a"]["uri"] == str(tiny_pixel_dir)
    bad = tmp_path / "bad.yaml"
    for data, needle in [({"models": {"a": {"uri": "x", "access": "gray-box"}}, "defaults": {"preset": "white-box"}},
                          "defaults (with model 'a')"),
                         ({"models": {"a": {"uri": "x"}}, "audits": []}, "unknown key(s) ['audits']"),
                         ({"models": {"a": {"uri": "x"}}, "defaults": {"id": "z"}}, "a registry cannot set"),
                         ({"models": {}}, "at least one"),
                         ([1, 2], "expected a mapping")]:
        bad.write_text(yaml.safe_dump(data))
        with pytest.raises(IntakeError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            load_registry(str(bad), output=str(tmp_path))
    with pytest.raises(IntakeError, match="does not exist"):
        load_registry(str(tmp_path / "nope.yaml"), output=str(tmp_path))


def test_the_reference_model_is_run_with_every_audit_and_never_audited(tmp_path, tiny_pixel_dir, collections):
    """``defaults.controls.reference_model``: requests cannot name it, "every model" leaves it out, and
    the manifest of any request carries it (its control re-runs each audit's test on it)."""
    from cdi_ray.requests.expand import expand

    path = tmp_path / "ref.yaml"
    models = {name: {"uri": str(tiny_pixel_dir), "access": "gray-box"} for name in ("a", "b", "ref")}
    path.write_text(yaml.safe_dump({"models": models, "defaults": {"controls": {"reference_model": "ref"}}}))
    reg = load_registry(str(path), output=str(tmp_path / "out"))
    assert reg.audited == ("a", "b")
    p, u = str(collections / "p"), str(collections / "u")
    every = parse_row(1, {"request_id": "all", "owner": "A", "published": p, "unpublished": u}, reg)
    named = parse_row(2, {"request_id": "r", "owner": "B", "published": p, "unpublished": u, "models": "a ref"}, reg)
    assert every.models == ("a", "b")
    assert named.reason == "unknown_model" and "reference model" in named.detail
    manifest = expand([every], reg, output=str(tmp_path / "out"), feature_store=str(tmp_path / "fs")).manifest
    assert sorted(manifest.models) == ["a", "b", "ref"] and [a.model for a in manifest.audits] == ["a", "b"]
    assert all(manifest.controls_of(a).reference_model == "ref" for a in manifest.audits)
    path.write_text(yaml.safe_dump({"models": {"ref": models["ref"]},
                                    "defaults": {"controls": {"reference_model": "ref"}}}))
    with pytest.raises(IntakeError, match="only model 'ref' is the reference model"):
        load_registry(str(path), output=str(tmp_path))


ROWS = [  # (cells, expected reason or None)
    ({"request_id": "ok-1", "owner": "A", "published": "p", "unpublished": "u"}, None),
    ({"request_id": "ok-2", "owner": "B", "published": "q", "unpublished": "u", "models": "b",
      "contact": "b@example.org"}, None),
    ({"request_id": "ok-3", "owner": "C", "published": '{"list_file": "list.txt"}', "unpublished": "u",
      "metadata": None}, None),
    ({"request_id": "ok-1", "owner": "D", "published": "p", "unpublished": "u"}, "duplicate_id"),
    ({"request_id": "no-u", "owner": "E", "published": "p", "unpublished": ""}, "missing_field"),
    ({"request_id": "", "owner": "F", "published": "p", "unpublished": "u"}, "missing_field"),
    ({"request_id": "bad__id", "owner": "G", "published": "p", "unpublished": "u"}, "invalid_id"),
    ({"request_id": "gone", "owner": "H", "published": "nowhere", "unpublished": "u"}, "unreadable_source"),
    ({"request_id": "who", "owner": "I", "published": "p", "unpublished": "u", "models": "a zz"}, "unknown_model"),
    ({"request_id": "json", "owner": "J", "published": '{"webdataset": ', "unpublished": "u"}, "invalid_source"),
    ({"request_id": "keys", "owner": "K", "published": '{"tar": "x.tar"}', "unpublished": "u"}, "invalid_source"),
    ({"request_id": "ftp", "owner": "L", "published": "ftp://x/p", "unpublished": "u"}, "invalid_source"),
    ({"request_id": "meta", "owner": "M", "published": '["p/0000.png"]', "unpublished": "u", "metadata": "m.jsonl"},
     "invalid_source"),
    ({"request_id": "nosh", "owner": "N", "published": "shards/none-*.tar", "unpublished": "u"}, "unreadable_source"),
]


def _write(path, rows, fmt):
    cols = ["request_id", "owner", "contact", "published", "unpublished", "metadata", "models"]
    if fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                w.writerow({c: r.get(c) or "" for c in cols})
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({k: (json.loads(v) if isinstance(v, str) and v[:1] in "{[" and k in
                                                ("published", "unpublished") and v.endswith(("}", "]")) else v)
                                            for k, v in r.items()}) + "\n" for r in rows))
    else:
        pq.write_table(pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in cols}), path)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_bad_row_is_rejected_with_its_reason_and_the_others_are_accepted(fmt, tmp_path, registry_file,
                                                                                collections):
    reg = load_registry(str(registry_file), output=str(tmp_path / "out"))
    path = collections / f"requests.{fmt}"
    _write(path, [cells for cells, _ in ROWS], fmt)
    intake = read_requests(str(path), reg, output=str(tmp_path / "out"))
    assert [r.request_id for r in intake.accepted] == ["ok-1", "ok-2", "ok-3"]
    got = {(x.row, x.reason) for x in intake.rejected}
    assert got == {(i + 1, reason) for i, (_, reason) in enumerate(ROWS) if reason}
    assert {x.reason for x in intake.rejected} <= set(REASONS) and all(x.detail for x in intake.rejected)
    ok1, ok2, ok3 = intake.accepted
    assert ok1.models == ("a", "b") and ok2.models == ("b",) and ok2.contact == "b@example.org"
    assert ok1.published == str(collections / "p")  # relative to the requests file
    assert ok3.published == {"list_file": str(collections / "list.txt")}
    dup = next(x for x in intake.rejected if x.reason == "duplicate_id")
    assert "row 1" in dup.detail and dup.owner == "D"


def test_a_request_file_that_cannot_be_used_is_invalid_input(tmp_path, registry_file):
    reg = load_registry(str(registry_file), output=str(tmp_path))
    (tmp_path / "a.csv").write_text("request_id,owner,published,unpublishd\n1,a,p,u\n")
    (tmp_path / "b.csv").write_text("request_id,owner,published\n1,a,p\n")
    (tmp_path / "c.txt").write_text("x")
    for name, needle in [("a.csv", "unknown column"), ("b.csv", "missing column"), ("c.txt", "unknown format"),
                         ("d.csv", "does not exist")]:
        with pytest.raises(IntakeError, match=needle):
            read_requests(str(tmp_path / name), reg, output=str(tmp_path))


def test_a_jsonl_line_that_is_not_an_object_is_one_rejection(tmp_path, registry_file, collections):
    reg = load_registry(str(registry_file), output=str(tmp_path))
    path = collections / "r.jsonl"
    path.write_text('{"request_id": "x", "owner": "o", "published": "p", "unpublished": "u"}\n[1]\n{oops\n')
    intake = read_requests(str(path), reg, output=str(tmp_path))
    assert [r.request_id for r in intake.accepted] == ["x"]
    assert [(x.row, x.reason) for x in intake.rejected] == [(2, "invalid_row"), (3, "invalid_row")]


def test_metadata_is_attached_to_folder_and_list_sources(tmp_path, registry_file):
    reg = load_registry(str(registry_file), output=str(tmp_path))
    r = parse_row(1, {"request_id": "m", "owner": "o", "published": "p", "unpublished": '{"list_file": "l.txt"}',
                      "metadata": "meta.jsonl"}, reg)
    assert isinstance(r, Request)
    assert r.published == {"folder": "p", "metadata": "meta.jsonl"}
    assert r.unpublished == {"list_file": "l.txt", "metadata": "meta.jsonl"}
    shard = parse_row(2, {"request_id": "s", "owner": "o", "published": "x/*.tar", "unpublished": "u",
                          "metadata": "meta.jsonl"}, reg)
    assert shard.reason == "invalid_source" and "carry their own" in shard.detail


def test_the_example_requests_files_are_valid():
    examples = Path(__file__).resolve().parents[1] / "examples" / "requests"
    reg = load_registry(str(examples / "registry.yaml"), output="/tmp/unused")
    for name in ("requests.csv", "requests.jsonl"):
        intake = read_requests(str(examples / name), reg, output="/tmp/unused", probe=False)
        assert intake.accepted and not intake.rejected, intake.rejected


def test_outputs_outside_the_output_root_are_refused_before_anything_runs(tmp_path, registry_file):
    (tmp_path / "r.csv").write_text("request_id,owner,published,unpublished\nx,o,p,u\n")
    with pytest.raises(IntakeError, match="outside the configured output root"):
        run_requests(str(tmp_path / "r.csv"), str(registry_file), str(tmp_path / "out"),
                     output_root=str(tmp_path / "allowed"))
    assert not (tmp_path / "out").exists()


def test_family_verdicts_come_from_the_verdict_policy_and_name_the_family():
    from cdi_ray.stats import TestResult

    def result(p):
        return TestResult(procedure="crossfit-permutation", pvalue=p, statistic=3.0, statistic_name="t", effect_size=1.0,
                          auc=0.8, direction="P>U", pvalue_reverse=0.99, n_published=60, n_unpublished=60, alpha=0.01,
                          seed=0, calibrated=True)

    label = " after Holm's adjustment across the 2 models audited for this request"
    out = fam.decide([result(0.004), result(0.2), None], alpha=0.01, controls=[[], [], []], min_samples=[None] * 3,
                     family_label=label)
    assert out[2].verdict == "inconclusive" and out[2].p_adjusted is None  # a failed audit: in the family, p = 1
    assert out[0].verdict == "not_detected" and out[0].p_adjusted == pytest.approx(0.012)  # 3 models: 3 × 0.004
    out = fam.decide([result(0.004), result(0.2)], alpha=0.01, controls=[[], ["P and U differ"]], min_samples=[None] * 2,
                     family_label=label)
    assert out[0].verdict == "used" and out[0].p_adjusted == pytest.approx(0.008)
    assert label in out[0].reason and fam.BATCH_PHRASE not in out[0].reason
    assert out[1].verdict == "inconclusive" and "P and U differ" in out[1].reason  # a fired control, as in any audit

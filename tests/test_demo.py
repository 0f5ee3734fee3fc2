"""The embedded default, end to end through the Ray pipeline, at a small n."""
import json

from cdi_ray.demo.audit import demo_audits, materialise, run_demo
from cdi_ray.images import content_hash

N = 60  # above stats.MIN_SAMPLES (50); the easy model's members separate at n≈20 (docs/DEMO_DATA.md)
PRESET = "gray-box"  # forward passes only: a third of the white-box cost, still decisive on the easy model


def test_demo_audit_reaches_the_right_verdicts(ray_session, tmp_path):
    res = run_demo(tmp_path, n=N, models=("easy",), preset=PRESET)
    entries = {e["audit_id"]: e for e in res["results"]["audits"]}
    assert all(e["status"] == "done" for e in entries.values()), entries
    assert entries["easy-members"]["verdict"] == "used", entries["easy-members"]["verdict_reason"]
    # the held-out-vs-held-out audit must never accuse
    assert entries["easy-heldout"]["verdict"] != "used"
    assert res["never_false_used"]
    on_disk = json.loads((tmp_path / "results" / "results.json").read_text())
    assert {a["audit_id"] for a in on_disk["audits"]} == {a.id for a in demo_audits(("easy",))}
    assert "easy-members" in res["table"] and "expected" in res["table"]


def test_demo_collections_are_deterministic_and_disjoint(tmp_path):
    a = materialise(tmp_path / "a", n=N, models=("easy",))
    b = materialise(tmp_path / "b", n=N, models=("easy",))

    def hashes(folder):
        return sorted(content_hash(p.read_bytes()) for p in folder.iterdir())

    for name in a:
        assert hashes(a[name]) == hashes(b[name]), name
        assert len(hashes(a[name])) == N
    # P of the held-out audit and U share no image; members and held-out share none
    assert not set(hashes(a["heldout-u-easy"])) & set(hashes(a["heldout-p-easy"]))
    assert not set(hashes(a["members-easy"])) & set(hashes(a["heldout-u-easy"]))


def test_default_sizes_fit_the_bundle_and_keep_each_models_sets_apart(tmp_path):
    from cdi_ray.demo.audit import DEMO_SIZES

    folders = materialise(tmp_path, models=("easy", "hard"))

    def hashes(name):
        return {content_hash(p.read_bytes()) for p in folders[name].iterdir()}

    for m, z in DEMO_SIZES.items():
        sets = {k: hashes(f"{k}-{m}") for k in ("members", "mix50", "heldout-u", "heldout-p")}
        assert [len(sets[k]) for k in ("members", "mix50", "heldout-u", "heldout-p")] == \
               [z.members, z.mix50, z.unpublished, z.heldout]
        for a, b in (("members", "mix50"), ("members", "heldout-u"), ("mix50", "heldout-u"), ("heldout-p", "heldout-u"),
                     ("mix50", "heldout-p")):
            assert not sets[a] & sets[b], (m, a, b)

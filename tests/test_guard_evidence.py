"""Issue 10's evidence on a shipped demo model (easy), in process, with gray-box features:

(i) members vs held-out → used; (ii) held-out vs held-out → not used; (iii) held-out classes 0–4
vs held-out classes 5–9 — a pair the model never saw — → inconclusive, while the unguarded test
would have said used; (iv) the same shift with genuine members in P → still not used.
The full measurement (both models, white-box, false-used rates over 100s of pairs) is
``jobs/guard_evidence.py``; its figures are in docs/VERDICTS.md.
"""
import numpy as np
import pytest

from cdi_ray.controls.evidence import guarded_audit
from cdi_ray.demo.bundle import load_bundle, load_split
from cdi_ray.demo.features import demo_descriptors, demo_features

N = 60
pytestmark = pytest.mark.slow  # ≈ 20 s: features of ~300 images in process


@pytest.fixture(scope="module")
def pools():
    bundle, split = load_bundle(), load_split("easy")
    rng = np.random.default_rng(0)
    members = rng.permutation(np.asarray(split["members"]))
    held = rng.permutation(np.asarray(split["heldout"]))
    labels = bundle.labels
    rest = held[2 * N:]
    low, high = rest[labels[rest] < 5], rest[labels[rest] >= 5]
    sets = {
        "members": members[:N],
        "members_low": members[labels[members] < 5][: N // 2],
        "held_u": held[:N],
        "held_p": held[N:2 * N],
        "low": low[:N],
        "high": high[:N],
    }
    union = np.unique(np.concatenate(list(sets.values())))  # each image's features once (the sets overlap)
    X, _, _ = demo_features("easy", union, preset="gray-box", cache=None)
    D = demo_descriptors(union)
    return {k: (X[np.searchsorted(union, idx)], D[np.searchsorted(union, idx)]) for k, idx in sets.items()}


def _audit(pools, p_parts, u_part):
    XP = np.concatenate([pools[k][0] for k in p_parts])
    DP = np.concatenate([pools[k][1] for k in p_parts])
    XU, DU = pools[u_part]
    return guarded_audit(XP, XU, DP, DU, seed=0, max_permutations=999)


def test_members_vs_heldout_is_used(pools):
    a = _audit(pools, ["members"], "held_u")
    assert a.guarded == "used" and a.unguarded == "used" and not a.control_fired


def test_heldout_vs_heldout_is_not_used(pools):
    a = _audit(pools, ["held_p"], "held_u")
    assert a.guarded == "not_detected" and a.unguarded == "not_detected"


def test_class_shift_is_inconclusive_where_the_unguarded_test_says_used(pools):
    a = _audit(pools, ["low"], "high")
    assert a.unguarded == "used" and a.pvalue <= 0.01  # the false accusation an unguarded CDI makes
    assert a.control_fired and a.guarded == "inconclusive" and "without the model" in a.reason


def test_class_shift_with_members_is_still_not_used(pools):
    a = _audit(pools, ["members_low", "low"], "high")
    assert a.control_fired and a.guarded == "inconclusive"

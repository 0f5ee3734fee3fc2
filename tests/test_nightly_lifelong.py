"""Standing audits through ``run_nightly`` on a tiny model: the life-long rule's state is stored with
each night, advances with new images, stands still without them, survives a crash and restart,
and the audit page states the night and the α spent (docs/VERDICTS.md §5)."""
from __future__ import annotations

import json
import shutil

import pytest

from cdi_ray import storage
from cdi_ray.pipeline import aggregate
from cdi_ray.pipeline.nightly import run_nightly
from cdi_ray.pipeline.standing import NIGHT_STATE_SCHEMA, StandingAudit, take_look
from cdi_ray.results_schema import AuditDocument, ResultsFile
from cdi_ray.spec import parse_manifest
from cdi_ray.stats.sequential import SequentialDesign
from _pipeline_helpers import write_images

FAST = {"dl": {"n_draws": 2}}
ALPHA = 0.05


def _manifest(model, p, u, pool, root) -> dict:
    """The standing audit ``artist`` on folders p and u that grow night by night, and an audit ``pool``
    over every image they will ever hold: its first night computes all features once, so later
    nights read them from the store (the test pays for one feature stream, not one per night)."""
    common = {"model": "m", "overrides": FAST, "test": {"alpha": ALPHA, "min_samples": 10}}
    return {"models": {"m": {"uri": str(model), "access": "gray-box", "batch_size": 64}},
            "controls": {"model_free": False},
            "audits": [{"id": "artist", "published": str(p), "unpublished": str(u), **common},
                       {"id": "pool", "published": str(pool / "p"), "unpublished": str(pool / "u"), **common}],
            "output": str(root)}


def _night(man: dict, date: str) -> tuple[dict, dict, dict]:
    """(run_nightly's answer, the artist's results entry, its stored state file) of one night."""
    res = run_nightly(parse_manifest(man), date=date)
    assert res["exit_code"] == 0
    text = storage.read_bytes(storage.join(man["output"], date, "results.json"))
    ResultsFile.model_validate_json(text)  # the documented schema, sequential section included
    AuditDocument.model_validate_json(storage.read_bytes(storage.join(man["output"], date, "audits", "artist.json")))
    entry = json.loads(text)["audits"][0]
    state = json.loads(storage.read_bytes(storage.join(man["output"], date, "sequential", "artist.json")))
    return res, entry, state


def _publish(pool, folder, side: str, names) -> None:
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(pool / side / name, folder / name)


def test_standing_audit_state_advances_stands_still_and_survives_a_restart(ray_session, tiny_pixel_dir, tmp_path,
                                                                            monkeypatch):
    pool, p, u, root = tmp_path / "pool", tmp_path / "p", tmp_path / "u", tmp_path / "nightly"
    names = [f"{i:04d}.png" for i in range(32)]
    write_images(pool / "p", 32, seed=21)
    write_images(pool / "u", 32, seed=22)
    _publish(pool, p, "p", names[:12])
    _publish(pool, u, "u", names[:12])
    man = _manifest(tiny_pixel_dir, p, u, pool, root)

    # night 1: the first look, on the whole collection; α spent = α·g(E₁) > 0, stored with the night
    _, e1, s1 = _night(man, "2026-12-01")
    q1 = e1["sequential"]
    assert s1["schema"] == NIGHT_STATE_SCHEMA and s1["nights"] == 1 and len(s1["state"]["looks"]) == 1
    assert (q1["night"], q1["look"], q1["took_look"], q1["first_look_on"]) == (1, 1, True, "2026-12-01")
    assert 0 < q1["alpha_spent"] < ALPHA and q1["alpha_remaining"] == pytest.approx(ALPHA - q1["alpha_spent"])
    assert len(s1["state"]["tested_published"]) == 12 and len(s1["state"]["tested_unpublished"]) == 12

    # night 2: nothing new → no look, no α spent, the same decision; only the night is counted
    _, e2, s2 = _night(man, "2026-12-02")
    q2 = e2["sequential"]
    assert s2["state"] == s1["state"] and s2["nights"] == 2
    assert (q2["night"], q2["look"], q2["took_look"]) == (2, 1, False)
    assert (q2["alpha_spent"], q2["nominal_pvalue"], q2["level"]) == (q1["alpha_spent"], q1["nominal_pvalue"], q1["level"])
    assert e2["verdict"] == e1["verdict"] and e2["p_value"] == e1["p_value"]
    # the audit page states the night, the looks and the α spent
    page = (root / "2026-12-02" / "audits" / "artist.html").read_text()
    assert '<span id="night">2</span>' in page and '<span id="look">1</span>' in page
    assert "α spent" in page and 'id="alpha-spent"' in page and "life-long" in page

    # night 3: 10 new images per side → a second look over the new ones only; more α spent
    _publish(pool, p, "p", names[12:22])
    _publish(pool, u, "u", names[12:22])
    _, e3, s3 = _night(man, "2026-12-03")
    q3 = e3["sequential"]
    assert (q3["night"], q3["look"], q3["took_look"]) == (3, 2, True)
    assert q1["alpha_spent"] < q3["alpha_spent"] < ALPHA
    assert s3["state"]["looks"][:1] == s1["state"]["looks"]  # the past is kept, the look appended
    assert (s3["state"]["looks"][1]["n_new_published"], s3["state"]["looks"][1]["n_new_unpublished"]) == (10, 10)

    # night 3 "crashes" after its look was stored but before results.json: the night is not complete,
    # and a restarted process re-runs it from night 2's stored state — the same look, not a second one
    (root / "2026-12-03" / "results.json").unlink()
    _, e3b, s3b = _night(man, "2026-12-03")
    assert s3b == s3 and e3b["sequential"] == q3 and e3b["verdict"] == e3["verdict"]

    # night 4 resumes from night 3's stored state — on the aggregator actors, as a large batch would
    monkeypatch.setattr(aggregate, "DRIVER_AGGREGATION_IMAGES", 0)
    _publish(pool, p, "p", names[22:])
    _publish(pool, u, "u", names[22:])
    _, e4, s4 = _night(man, "2026-12-04")
    assert (e4["sequential"]["night"], e4["sequential"]["look"]) == (4, 3)
    assert s4["state"]["looks"][:2] == s3["state"]["looks"] and e4["sequential"]["alpha_spent"] > q3["alpha_spent"]


def test_a_failed_or_changed_audit_never_restarts_its_life_long_rule(tmp_path):
    """An unreadable state, or a different model, fails the audit with a reason; it never starts over."""
    import numpy as np

    rng = np.random.default_rng(0)
    P, U = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    keys = lambda side, n: [f"{side}{i}" for i in range(n)]  # noqa: E731
    first = StandingAudit("a", "2026-12-01", str(tmp_path / "1" / "a.json"), None, 0.01, 0, SequentialDesign(), 10,
                          fingerprint="fp1", feature_key="k")
    look = take_look(first, P, U, keys("p", 30), keys("u", 30))
    assert look.look.took_look and look.night == 1
    other_model = StandingAudit("a", "2026-12-02", str(tmp_path / "2" / "a.json"), first.state_uri, 0.01, 0,
                                SequentialDesign(), 10, fingerprint="fp2", feature_key="k")
    with pytest.raises(ValueError, match="model fingerprint changed"):
        take_look(other_model, P, U, keys("p", 30), keys("u", 30))
    (tmp_path / "1" / "a.json").write_text("{not json")
    same = StandingAudit("a", "2026-12-02", str(tmp_path / "2" / "a.json"), first.state_uri, 0.01, 0,
                         SequentialDesign(), 10, fingerprint="fp1", feature_key="k")
    with pytest.raises(ValueError, match="cannot read the audit's life-long state"):
        take_look(same, P, U, keys("p", 30), keys("u", 30))
    assert not (tmp_path / "2" / "a.json").exists()


def test_no_look_below_min_samples_and_the_decision_is_held(tmp_path):
    """Before the first look the audit waits for min_samples per side (nothing spent, no state to
    restart from later); a collection that shrinks below it later holds the last decision."""
    import numpy as np

    rng = np.random.default_rng(1)
    P, U = rng.normal(size=(40, 4)), rng.normal(size=(40, 4))
    keys = lambda side, n: [f"{side}{i}" for i in range(n)]  # noqa: E731
    sa = lambda night, prev: StandingAudit("a", f"2026-12-0{night}", str(tmp_path / str(night) / "a.json"),  # noqa: E731
                                           prev, 0.01, 0, SequentialDesign(), 30, fingerprint="fp", feature_key="k")
    wait = take_look(sa(1, None), P[:20], U[:20], keys("p", 20), keys("u", 20))
    assert wait.look is None and wait.to_dict()["alpha_spent"] == 0 and "needs 30" in wait.to_dict()["reason"]
    assert json.loads((tmp_path / "1" / "a.json").read_text())["state"] is None
    first = take_look(sa(2, sa(1, None).state_uri), P, U, keys("p", 40), keys("u", 40))
    assert first.look.took_look and first.night == 2 and first.first_night == "2026-12-01"
    held = take_look(sa(3, sa(2, None).state_uri), P[:10], U[:10], keys("p", 10), keys("u", 10))
    assert not held.look.took_look and held.look.alpha_spent == first.look.alpha_spent and held.night == 3
    assert json.loads((tmp_path / "3" / "a.json").read_text())["state"] == \
        json.loads((tmp_path / "2" / "a.json").read_text())["state"]

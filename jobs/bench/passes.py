"""Section ``passes``: passes of f per image of each preset as planned, against METHOD.md's count."""
from __future__ import annotations

from jobs.bench.models import Bench, feature_config
from jobs.bench.table import Row

#: METHOD.md's table, passes of f per image (forward, forward+backward least, most).
SPEC_PASSES = {"white-box": (39, 16, 25), "gray-box": (29, 0, 0)}


def section_passes(bench: Bench, args, state: dict) -> list[Row]:
    rows = []
    for preset in args.presets:
        planned = feature_config(preset, bench).passes_per_image()
        fwd, fb, fb_max = SPEC_PASSES[preset]
        ok = planned["forward"] <= fwd and planned["forward_backward"] <= fb
        rows.append(Row("passes", f"{preset}: planned fwd, fwd+bwd (least–most)",
                        f"{planned['forward']}, {planned['forward_backward']}–{planned['forward_backward_max']}",
                        f"≤ spec {fwd}, {fb}–{fb_max}", ok))
    return rows


def planned_passes(preset: str, bench: Bench, args) -> dict[str, float]:
    p = feature_config(preset, bench).passes_per_image()
    return {"fwd": p["forward"], "fb": p["forward_backward"]}

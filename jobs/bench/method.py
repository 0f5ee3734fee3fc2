"""Section ``method``: the feature extractor alone on decoded images (no Ray): images/s, the passes
it performed, and the ratio to the rate the floor allows for those passes."""
from __future__ import annotations

import time

from jobs.bench.floor import TARGET_E2E_RATIO, Floor
from jobs.bench.models import Bench, feature_config, image_metas, sync
from jobs.bench.table import Row


def section_method(bench: Bench, args, state: dict) -> list[Row]:
    import torch

    from cdi_ray.features.extractor import FeatureExtractor

    floor: Floor = state["floor"]
    x_all, labels = bench.images(args.method_images)
    rows = []
    for preset in args.presets:
        extractor = FeatureExtractor(bench.model, feature_config(preset, bench))
        warm = min(args.batch, 4)
        extractor(torch.from_numpy(x_all[:warm]), image_metas(warm, labels))
        fwd = fb = 0
        wall = cpu = 0.0
        for s in range(0, len(x_all), args.batch):
            x = torch.from_numpy(x_all[s:s + args.batch])
            metas = image_metas(len(x), None if labels is None else labels[s:s + args.batch], offset=s)
            sync(bench.device)
            w0, c0 = time.perf_counter(), time.process_time()
            extractor(x, metas)
            sync(bench.device)
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
            fwd += int(extractor.last_pass_counts["forward"].sum())
            fb += int(extractor.last_pass_counts["forward_backward"].sum())
        n = len(x_all)
        per = {"fwd": fwd / n, "fb": fb / n}
        state.setdefault("performed", {})[preset] = per
        rate = {"wall": n / wall, "cpu": n / cpu}
        ratio = {c: rate[c] / floor.images_per_s(per["fwd"], per["fb"], c) for c in ("wall", "cpu")}
        state.setdefault("method", {})[preset] = {"rate": rate, "ratio": ratio}
        main = "cpu" if bench.device == "cpu" else "wall"
        rows.append(Row("method", f"{preset}: passes performed, fwd, fwd+bwd per image (mean over {n})",
                        f"{per['fwd']:.1f}, {per['fb']:.2f}"))
        rows.append(Row("method", f"{preset}: images/s, wall / cpu (batch {args.batch})",
                        f"{rate['wall']:.2f} / {rate['cpu']:.2f}"))
        rows.append(Row("method", f"{preset}: ratio to the floor for the passes performed, wall / cpu",
                        f"{ratio['wall']:.3f} / {ratio['cpu']:.3f}", f"{main} ≥ {TARGET_E2E_RATIO}",
                        ratio[main] >= TARGET_E2E_RATIO))
    return rows

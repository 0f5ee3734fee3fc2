"""Section ``floor``: f's raw batched throughput, forward and forward+backward w.r.t. the input,
per batch size, at the feature actors' thread count. The best batch size is the floor every
ratio of the benchmark is taken against."""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

from jobs.bench.models import Bench, image_metas, sync
from jobs.bench.table import Row

#: Target of issue #8: the method layer and an audit end to end run at ≥ 0.8× the rate the floor allows.
TARGET_E2E_RATIO = 0.8


@dataclass(frozen=True)
class Floor:
    """f's best throughput (rows/s) by wall and CPU clock, and the batch sizes it was reached at."""

    fwd_wall: float
    fwd_cpu: float
    fb_wall: float
    fb_cpu: float
    batch_fwd: int
    batch_fb: int

    def images_per_s(self, fwd: float, fb: float, clock: str = "wall") -> float:
        """The rate f allows for ``fwd`` forward and ``fb`` forward+backward passes per image."""
        f, g = (self.fwd_wall, self.fb_wall) if clock == "wall" else (self.fwd_cpu, self.fb_cpu)
        return 1.0 / (fwd / f + fb / g)


def measure_f(bench: Bench, batch: int, seconds: float) -> dict[str, float]:
    """Rows/s of f on noised latents at batch ``batch``: forward (inference mode) and
    forward+backward of Σ‖f(z_t)−ε‖ w.r.t. z_t — what the extractor's passes do, minus everything else."""
    import torch

    model = bench.model
    x, labels = bench.images(batch)
    metas = image_metas(batch, labels)
    with torch.no_grad():
        z = model.encode(torch.from_numpy(x).to(model.device), None).float()
        cond = model.conditioning(metas)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(z.device)
    t = 100
    a = float(model.alphas_cumprod[t])
    z_t = a ** 0.5 * z + (1 - a) ** 0.5 * eps
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(bench.autocast)
    autocast = (lambda: torch.autocast(device_type=torch.device(bench.device).type, dtype=dtype)) if dtype else contextlib.nullcontext

    def fwd():
        with torch.inference_mode(), autocast():
            model.predict_noise(z_t, t, cond)

    def fb():
        x_in = z_t.detach().clone().requires_grad_(True)
        with autocast():
            pred = model.predict_noise(x_in, t, cond).float()
        loss = torch.linalg.vector_norm((pred - eps).flatten(1), dim=1).sum()
        torch.autograd.grad(loss, x_in)

    out = {}
    for name, step in (("fwd", fwd), ("fb", fb)):
        step()  # warm-up (allocator, kernels)
        sync(bench.device)
        n, w0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - w0 < seconds or n == 0:
            step()
            n += batch
        sync(bench.device)
        out[f"{name}_wall"] = n / (time.perf_counter() - w0)
        out[f"{name}_cpu"] = n / max(time.process_time() - c0, 1e-9)
    return out


def best_floor(per_batch: dict[int, dict[str, float]], clock: str) -> Floor:
    """The floor: forward and forward+backward each at the batch size that is fastest on ``clock``."""
    bf = max(per_batch, key=lambda b: per_batch[b][f"fwd_{clock}"])
    bb = max(per_batch, key=lambda b: per_batch[b][f"fb_{clock}"])
    return Floor(per_batch[bf]["fwd_wall"], per_batch[bf]["fwd_cpu"], per_batch[bb]["fb_wall"], per_batch[bb]["fb_cpu"],
                 bf, bb)


def quick_floor(bench: Bench, args, state: dict) -> Floor:
    """The floor at its best batch sizes, re-measured now (the machine's load drifts)."""
    bf, bb = (state["floor"].batch_fwd, state["floor"].batch_fb) if "floor" in state else (args.batch, args.batch)
    seconds = max(1.0, args.seconds / 2)
    r = {b: measure_f(bench, b, seconds) for b in {bf, bb}}
    return Floor(r[bf]["fwd_wall"], r[bf]["fwd_cpu"], r[bb]["fb_wall"], r[bb]["fb_cpu"], bf, bb)


def _fmt_rates(r: dict) -> str:
    return f"fwd {r['fwd_wall']:.0f} / {r['fwd_cpu']:.0f}; fwd+bwd {r['fb_wall']:.0f} / {r['fb_cpu']:.0f}"


def section_floor(bench: Bench, args, state: dict) -> list[Row]:
    per_batch = {b: measure_f(bench, b, args.seconds) for b in args.batches}
    clock = "cpu" if bench.device == "cpu" else "wall"
    floor = best_floor(per_batch, clock)
    state["floor"], state["floor_per_batch"] = floor, per_batch
    rows = [Row("floor", f"f rows/s at batch {b}, wall / cpu", _fmt_rates(r)) for b, r in per_batch.items()]
    rows.append(Row("floor", f"**floor** (best batch by {clock} clock: fwd {floor.batch_fwd}, fwd+bwd "
                             f"{floor.batch_fb}), rows/s, wall / cpu",
                    _fmt_rates(asdict(floor))))
    return rows

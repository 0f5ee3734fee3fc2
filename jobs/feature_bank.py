"""A bank of per-draw membership signals on the demo models, for the feature-signal study.

Where does the membership signal of a diffusion model live, and what does it cost? Instead of
extracting every candidate feature configuration separately, this computes once per image the
raw quantities that candidate features are made of, each a function of documented noise draws
(``cdi_ray.features.context``: stream, draw, timestep — so a preset built from them later
reproduces the bank's values through the real ``FeatureExtractor``):

* ``loss_t{t}_d{k}`` = ‖f(z_t, t) − ε‖ with ε the ``k``-th draw of the ``"dl"`` stream, for
  every t in :data:`LOSS_TIMESTEPS` and k < :data:`LOSS_DRAWS` — one forward each;
* ``pia_t{t}_p{p}`` = ‖ε0 − f(sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε0, t)‖_p, ε0 = f(z, 0) (PIA with other
  timesteps and norm orders; the PIA paper uses p = 4) — one forward per t;
* ``secmi_t{t}`` = SecMI's ‖z_det − z_step‖ with the inversion reaching t (stride 10; the
  original SecMI inverts to t = 90 and uses the squared L2 norm — a monotone transform, so the
  squared value is not stored);
* ``no_t{t}_i{m}_{loss,delta}`` = Noise Optimisation with timestep t and m L-BFGS iterations
  (forward+backward passes).

Three sets (``--set``), cached separately: ``losses`` (the loss draws, PIA and SecMI at a few t),
``proximal`` (PIA and SecMI at small t, added after ``losses`` showed the signal there) and ``no``.

    python jobs/feature_bank.py --model hard --part tune                   # 2,250 images, ≈ 30 min on 2 busy cores
    python jobs/feature_bank.py --model hard --part tune --set proximal    # PIA and SecMI at small t
    python jobs/feature_bank.py --model hard --part tune --set no          # Noise Optimisation settings
    python jobs/feature_bank.py --smoke-test

Chunks of 250 images are cached (``--cache``), so a killed run resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_halves import CHUNK, DEFAULT_CACHE, demo_halves  # noqa: E402

LOSS_TIMESTEPS = (10, 20, 30, 50, 75, 100, 150, 200, 300)
LOSS_DRAWS = 8
PIA_TIMESTEPS = (50, 100, 200)
PIA_ORDERS = (2.0, 4.0, 5.0)
SECMI_TIMESTEPS = (50, 90, 100)
NO_SETTINGS = ((50, 5), (100, 10))  # (timestep, L-BFGS iterations)
BANK_VERSION = 1
#: Second set (run after the first showed that PIA and SecMI are strongest at small t).
PROXIMAL_PIA_TIMESTEPS = (10, 20, 30, 40, 50, 75, 100)
PROXIMAL_PIA_ORDERS = (2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
PROXIMAL_SECMI_TIMESTEPS = (20, 30, 40)
SETS = ("losses", "proximal", "no")


def bank_spec(which: str) -> dict:
    """The quantities of bank set ``which``: ``losses`` (loss draws, PIA and SecMI at a few t),
    ``proximal`` (PIA and SecMI at small t), ``no`` (Noise Optimisation settings)."""
    empty = {"version": BANK_VERSION, "loss_timesteps": (), "loss_draws": 0, "pia_timesteps": (), "pia_orders": (),
             "secmi_timesteps": (), "no_settings": ()}
    if which == "losses":
        return {**empty, "loss_timesteps": LOSS_TIMESTEPS, "loss_draws": LOSS_DRAWS, "pia_timesteps": PIA_TIMESTEPS,
                "pia_orders": PIA_ORDERS, "secmi_timesteps": SECMI_TIMESTEPS}
    if which == "proximal":
        return {**empty, "pia_timesteps": PROXIMAL_PIA_TIMESTEPS, "pia_orders": PROXIMAL_PIA_ORDERS,
                "secmi_timesteps": PROXIMAL_SECMI_TIMESTEPS}
    if which == "no":
        return {**empty, "no_settings": NO_SETTINGS}
    raise ValueError(f"bank set must be one of {SETS}; got {which!r}")


def bank_columns(spec: dict) -> list[str]:
    cols = [f"loss_t{t}_d{k}" for t in spec["loss_timesteps"] for k in range(spec["loss_draws"])]
    cols += [f"pia_t{t}_p{p:g}" for t in spec["pia_timesteps"] for p in spec["pia_orders"]]
    cols += [f"secmi_t{t}" for t in spec["secmi_timesteps"]]
    cols += [f"no_t{t}_i{m}_{what}" for t, m in spec["no_settings"] for what in ("loss", "delta")]
    return cols


def forward_passes(spec: dict) -> dict[str, int]:
    """Forward passes per image of each bank quantity (what a feature made of it costs)."""
    out = {f"loss_t{t}_d{k}": 1 for t in spec["loss_timesteps"] for k in range(spec["loss_draws"])}
    out.update({f"pia_t{t}_p{p:g}": 1 for t in spec["pia_timesteps"] for p in spec["pia_orders"]})
    out["pia_eps0"] = 1  # f(z, 0), shared by PIA and SecMI
    out.update({f"secmi_t{t}": t // 10 - 1 + 2 for t in spec["secmi_timesteps"]})
    return out


def compute_chunk(model, indices: np.ndarray, spec: dict, seed: int) -> np.ndarray:
    import torch

    from cdi_ray.demo.audit import encode_png
    from cdi_ray.demo.bundle import load_bundle
    from cdi_ray.features.context import CleanKey, EvalContext, NoisedKey
    from cdi_ray.features.no import NoiseOptimisation, NoiseOptimisationConfig
    from cdi_ray.features.pia import pnorm
    from cdi_ray.features.secmi import SecMI, SecMIConfig
    from cdi_ray.features.base import Request
    from cdi_ray.images import content_hash

    bundle = load_bundle()
    hashes = [content_hash(encode_png(bundle.images[int(i)])) for i in indices]
    z = model.encode(torch.from_numpy(bundle.images_float(indices)), None).float()
    ctx = EvalContext(model, z, None, seed=seed, content_hashes=hashes)
    cols: dict[str, torch.Tensor] = {}
    keys = [NoisedKey("dl", k, t) for t in spec["loss_timesteps"] for k in range(spec["loss_draws"])]
    needs_eps0 = bool(spec["pia_timesteps"] or spec["secmi_timesteps"])
    ctx.prefetch([Request(k) for k in keys] + ([Request(CleanKey(0))] if needs_eps0 else []))
    for k in keys:
        cols[f"loss_t{k.t}_d{k.draw}"] = ctx.loss(k)
    eps0 = ctx.get(CleanKey(0)).pred
    for t in spec["pia_timesteps"]:
        r = eps0 - ctx.forward(ctx.q_sample(ctx.z, t, eps0), t)
        for p in spec["pia_orders"]:
            cols[f"pia_t{t}_p{p:g}"] = pnorm(r, p)
    for t in spec["secmi_timesteps"]:
        cols[f"secmi_t{t}"] = SecMI(SecMIConfig(t=t, step=10)).compute(ctx)["secmi"]
    for t, m in spec["no_settings"]:
        out = NoiseOptimisation(NoiseOptimisationConfig(timestep=t, max_iter=m)).compute(ctx)
        cols[f"no_t{t}_i{m}_loss"], cols[f"no_t{t}_i{m}_delta"] = out["no_loss"], out["no_delta_norm"]
    return np.stack([cols[c].detach().double().numpy() for c in bank_columns(spec)], axis=1)


def bank(model_name: str, indices: np.ndarray, *, which: str = "losses", seed: int = 0, cache: Path = DEFAULT_CACHE,
         log=print) -> tuple[np.ndarray, list[str], float]:
    """``(X, columns, seconds)`` of bank set ``which`` for bundle images ``indices`` (rows in that order)."""
    from cdi_ray.demo.bundle import demo_model_dir
    from cdi_ray.models import load_model

    spec = bank_spec(which)
    model = load_model(demo_model_dir(model_name))
    order = np.unique(np.asarray(indices, dtype=np.int64))
    rows, seconds = [], 0.0
    tag = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    for start in range(0, len(order), CHUNK):
        chunk = order[start:start + CHUNK]
        key = hashlib.sha256(f"{model.fingerprint}|{tag}|{seed}|{chunk.tobytes().hex()}".encode()).hexdigest()[:16]
        file = cache / f"bank-{model_name}-{key}.npz"
        if file.exists():
            data = np.load(file)
            rows.append(data["X"])
            seconds += float(data["seconds"])
            continue
        t0 = time.perf_counter()
        X = compute_chunk(model, chunk, spec, seed)
        s = time.perf_counter() - t0
        file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(file, X=X, seconds=s)
        rows.append(X)
        seconds += s
        log(f"  bank {model_name}: images {start + len(chunk)}/{len(order)} ({s:.0f} s)")
    X = np.concatenate(rows)
    return X[np.searchsorted(order, indices)], bank_columns(spec), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="hard")
    p.add_argument("--part", default="tune", choices=("tune", "eval", "all"))
    p.add_argument("--set", default="losses", choices=SETS, help="which quantities (see bank_spec)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    members, heldout = demo_halves(args.model).part(args.part)
    if args.smoke_test:
        members, heldout = members[:8], heldout[:8]
    for name, idx in (("members", members), ("heldout", heldout)):
        X, cols, s = bank(args.model, idx, which=args.set, cache=Path(args.cache))
        print(f"{args.model} {args.part} {name}: {X.shape} in {s:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Performance benchmark: how close an audit runs to the model's own floor (issue #8).

The cost of an audit is evaluations of the model f; everything else is overhead. One run measures
and prints one table (docs/PERFORMANCE.md records a full run):

1. ``floor``   — f's raw batched throughput, forward and forward+backward w.r.t. the input, per
                 batch size, at the feature actors' thread count; the best batch size is the floor;
2. ``passes``  — passes of f per image of each preset: planned, performed, and METHOD.md's count;
3. ``method``  — the feature extractor alone on decoded images: images/s, and the ratio to the
                 rate the floor allows for the passes it performed;
4. ``e2e``     — ``run_manifest`` through Ray (list → hash → decode → actors → store → aggregator
                 → results) on ≥ 2,000 images from local files and from S3 (a moto server);
5. ``scaling`` — 100 vs 1,000 collections of 20 images against one model, each in a fresh driver
                 process: time ratio, feature-actor (= model load) count, driver peak memory;
6. ``stats``   — the default test on 20,000 + 20,000 × 26 (jobs/calibration.py's benchmark);
7. ``shards``  — small files vs tar vs Parquet shards from S3 (moto), the same images
                 (:func:`cdi_ray.pipeline.bench_sources.bench_sources`; docs/PIPELINE.md).

    python jobs/benchmark.py                          # the full run (16 min on an idle 2-core machine)
    python jobs/benchmark.py --quick                  # development: small counts, ~5 min
    python jobs/benchmark.py --only floor,passes,method --preset gray-box
    python jobs/benchmark.py --gpu-dit-xl             # model layer on a DiT-XL/2-256 (random weights, bf16, batch 64)
    python jobs/benchmark.py --gpu-dit-xl --tiny      # the same code path on CPU with a tiny DiT (shape check)

Rates are reported by wall clock and, where the work runs in this process, by CPU time: on a
shared machine CPU time is the steadier clock (other processes stretch the wall clock, not the
CPU seconds a computation needs). Ratios compare figures of the same clock from the same run;
the end-to-end ratio uses a floor re-measured right before that run. Ray's workers run at
niceness 0 here (``RAY_worker_niceness``, default 15) so that on a shared machine the actors
compete for CPU on the same terms as the floor measured in this process.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTIONS = ("floor", "passes", "method", "e2e", "scaling", "stats", "shards")

#: METHOD.md's table, passes of f per image (forward, forward+backward least, most).
SPEC_PASSES = {"white-box": (39, 16, 25), "gray-box": (29, 0, 0)}

#: Targets of issue #8.
TARGET_E2E_RATIO = 0.8
TARGET_SCALING_TIME_RATIO = 11.0
TARGET_MEMORY_RATIO = 1.25   # "flat": driver peak memory at 10× the collections within 25 %

#: DiT-XL/2 at 256 px (Peebles & Xie): transformer and the SD KL autoencoder, built from config.
DIT_XL_2_256 = {
    "transformer": dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                        sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215),
}


@dataclass
class Row:
    """One line of the table; ``ok`` is None where the figure has no target."""

    section: str
    measure: str
    value: str
    target: str = ""
    ok: bool | None = None


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


# ==================================================================================================
# models
# ==================================================================================================
@dataclass
class Bench:
    """What the sections share: the model under test and where it lives."""

    model: object
    model_uri: str | None      # a directory the pipeline can load (None: in-memory only, no e2e)
    name: str
    images: Callable[[int], tuple[np.ndarray, list[int] | None]]  # n → images in [-1, 1], labels
    device: str
    autocast: str | None


def load_bench(args, workdir: Path) -> Bench:
    from cdi_ray.models.loader import load_model

    if args.model == "dit-xl":
        if args.tiny:
            from cdi_ray.models.testing import make_tiny_dit

            path = make_tiny_dit(workdir / "tiny-dit", image_size=16)
            model = load_model(path, device=args.device, dtype=args.dtype)
            return Bench(model, str(path), "tiny DiT (CPU shape check)", _random_images(model), args.device, args.autocast)
        model = _dit_xl(args.device, args.dtype)
        return Bench(model, None, "DiT-XL/2-256 (random weights)", _random_images(model), args.device, args.autocast)
    if args.tiny:
        from cdi_ray.models.testing import make_tiny_pixel_ddpm

        path = make_tiny_pixel_ddpm(workdir / "tiny-pixel", image_size=16, channels=1)
        name = "tiny pixel DDPM"
    else:
        from cdi_ray.demo.bundle import demo_model_dir

        path = demo_model_dir(args.model)
        name = f"demo model '{args.model}'"
    model = load_model(path, device=args.device, dtype=args.dtype)
    return Bench(model, str(path), f"{name} ({sum(p.numel() for p in model.unet.parameters()) / 1e6:.2f} M params)",
                 _bundle_images, args.device, args.autocast)


def _bundle_images(n: int):
    """``n`` demo images (cycled if more than the bundle holds) as the demo models' input."""
    from cdi_ray.demo.bundle import load_bundle

    b = load_bundle()
    idx = np.arange(n) % len(b)
    return b.images_float(idx), None


def _random_images(model):
    def images(n: int):
        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (n, model.image_channels, model.image_size, model.image_size)).astype(np.float32)
        labels = (np.arange(n) % model.num_classes).tolist() if model.num_classes else None
        return x, labels
    return images


def _dit_xl(device: str, dtype):
    """DiT-XL/2-256 from config with random weights (no download)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    from cdi_ray.models.dit import DiT

    torch.manual_seed(0)
    with torch.device(device):
        transformer = DiTTransformer2DModel(**DIT_XL_2_256["transformer"])
        vae = AutoencoderKL(**DIT_XL_2_256["vae"])
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    return DiT(transformer, vae, scheduler, device=device, dtype=dtype, missing_label="null")


def _metas(n: int, labels, offset: int = 0):
    from cdi_ray.models.base import ImageMeta

    return [ImageMeta(content_hash=f"{offset + i:064x}", label=None if labels is None else int(labels[i]))
            for i in range(n)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ==================================================================================================
# 1. floor
# ==================================================================================================
def measure_f(bench: Bench, batch: int, seconds: float) -> dict[str, float]:
    """Rows/s of f on noised latents at batch ``batch``: forward (inference mode) and
    forward+backward of Σ‖f(z_t)−ε‖ w.r.t. z_t — what the extractor's passes do, minus everything else."""
    import torch

    model = bench.model
    x, labels = bench.images(batch)
    metas = _metas(batch, labels)
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
        _sync(bench.device)
        n, w0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - w0 < seconds or n == 0:
            step()
            n += batch
        _sync(bench.device)
        out[f"{name}_wall"] = n / (time.perf_counter() - w0)
        out[f"{name}_cpu"] = n / max(time.process_time() - c0, 1e-9)
    return out


def best_floor(per_batch: dict[int, dict[str, float]], clock: str) -> Floor:
    """The floor: forward and forward+backward each at the batch size that is fastest on ``clock``."""
    bf = max(per_batch, key=lambda b: per_batch[b][f"fwd_{clock}"])
    bb = max(per_batch, key=lambda b: per_batch[b][f"fb_{clock}"])
    return Floor(per_batch[bf]["fwd_wall"], per_batch[bf]["fwd_cpu"], per_batch[bb]["fb_wall"], per_batch[bb]["fb_cpu"],
                 bf, bb)


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


# ==================================================================================================
# 2.–3. passes and the method layer
# ==================================================================================================
def _feature_config(preset: str, bench: Bench):
    from cdi_ray.features.config import FeatureConfig

    return FeatureConfig(features=preset, device=bench.device, autocast_dtype=bench.autocast)


def section_passes(bench: Bench, args, state: dict) -> list[Row]:
    rows = []
    for preset in args.presets:
        planned = _feature_config(preset, bench).passes_per_image()
        fwd, fb, fb_max = SPEC_PASSES[preset]
        ok = planned["forward"] <= fwd and planned["forward_backward"] <= fb
        rows.append(Row("passes", f"{preset}: planned fwd, fwd+bwd (least–most)",
                        f"{planned['forward']}, {planned['forward_backward']}–{planned['forward_backward_max']}",
                        f"≤ spec {fwd}, {fb}–{fb_max}", ok))
    return rows


def section_method(bench: Bench, args, state: dict) -> list[Row]:
    import torch

    from cdi_ray.features.extractor import FeatureExtractor

    floor: Floor = state["floor"]
    x_all, labels = bench.images(args.method_images)
    rows = []
    for preset in args.presets:
        extractor = FeatureExtractor(bench.model, _feature_config(preset, bench))
        warm = min(args.batch, 4)
        extractor(torch.from_numpy(x_all[:warm]), _metas(warm, labels))
        fwd = fb = 0
        wall = cpu = 0.0
        for s in range(0, len(x_all), args.batch):
            x = torch.from_numpy(x_all[s:s + args.batch])
            metas = _metas(len(x), None if labels is None else labels[s:s + args.batch], offset=s)
            _sync(bench.device)
            w0, c0 = time.perf_counter(), time.process_time()
            extractor(x, metas)
            _sync(bench.device)
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


# ==================================================================================================
# 4. end to end through Ray
# ==================================================================================================
def image_name(i: int) -> str:
    return f"{i:07d}.png"


def write_collection(folder: Path, start: int, n: int) -> list[Path]:
    """``n`` distinct demo-bundle PNGs (bundle images from ``start``; a pixel is nudged where the
    bundle repeats, so every file has its own content hash)."""
    from cdi_ray.demo.audit import encode_png
    from cdi_ray.demo.bundle import load_bundle

    b = load_bundle()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        img = b.images[i % len(b)].copy()
        rep = i // len(b)
        if rep:
            img.flat[rep % img.size] ^= np.uint8(1 + rep // img.size)
        p = folder / image_name(i)
        p.write_bytes(encode_png(img))
        paths.append(p)
    return paths


def upload(folder: Path, prefix: str) -> str:
    """Copy ``folder``'s files to ``s3://{prefix}/`` (bucket created); returns the URI."""
    import boto3

    bucket, _, key = prefix.partition("/")
    s3 = boto3.client("s3")
    with contextlib.suppress(Exception):
        s3.create_bucket(Bucket=bucket)
    for p in sorted(folder.iterdir()):
        s3.put_object(Bucket=bucket, Key=f"{key}/{p.name}", Body=p.read_bytes())
    return f"s3://{prefix}/"


@contextlib.contextmanager
def moto_server():
    """A moto S3 server on 127.0.0.1 for this process and the Ray workers it starts (so it must
    start before Ray: workers inherit the environment Ray was started with)."""
    from cdi_ray import storage
    from cdi_ray.pipeline.bench_sources import moto_endpoint

    with moto_endpoint() as endpoint:
        env = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        storage.reset_client()  # a client cached before would point elsewhere
        try:
            yield env
        finally:
            _restore_env(old)
            storage.reset_client()


def _restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class ProcessCpu:
    """CPU seconds of this process's descendants (the local Ray), sampled from /proc every
    ``interval`` s while running; a process's last sample counts after it exits.

    Groups by process title (Ray retitles a worker ``ray::<what it runs>``; the latest title wins,
    so an idle worker that became a feature actor counts as one from its start): ``actors``
    (feature actors, decode fused in), ``tasks`` (hash/write tasks, idle workers), ``aggregators``,
    ``ray_data`` (Ray Data's helper actors), ``daemons`` (GCS, raylet, Ray's agents), ``driver``
    (a benchmark child driver).
    """

    DAEMON_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")

    def __init__(self, root: int | None = None, interval: float = 0.25):
        import threading

        self.root, self.interval = root or os.getpid(), interval
        self._seen: dict[tuple[int, int], tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "ProcessCpu":
        self._scan()
        self._baseline = dict(self._seen)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._scan()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._scan()

    RAY_DATA_TITLES = ("ray::_StatsActor", "ray::_AutoscalingCoordinatorActor", "ray::ActorLocationTracker")
    GROUPS = ("actors", "tasks", "aggregators", "ray_data", "daemons", "driver")
    WORKERS = ("actors", "tasks", "aggregators", "ray_data")  # what the pipeline's work costs
    SPECIFIC = ("actors", "aggregators", "ray_data", "driver")

    @classmethod
    def group(cls, title: str) -> str:
        if "benchmark.py" in title:
            return "driver"
        if "FeatureActor" in title:
            return "actors"
        if "AuditAggregator" in title:
            return "aggregators"
        if title.startswith(cls.RAY_DATA_TITLES):
            return "ray_data"
        if title.startswith(cls.DAEMON_TITLES) or not (title.startswith("ray::") or "default_worker.py" in title):
            return "daemons"
        return "tasks"

    def _scan(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        parent: dict[int, int] = {}
        stats: dict[int, list[str]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                parent[int(d)], stats[int(d)] = int(fields[1]), fields
        mine, frontier = set(), {self.root}
        while frontier:
            frontier = {p for p, pp in parent.items() if pp in frontier and p not in mine}
            mine |= frontier
        for pid in mine:
            fields = stats[pid]
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            key = (pid, int(fields[19]))  # (pid, start time): a reused pid is another process
            cpu = (int(fields[11]) + int(fields[12])) / tick
            old_group, old_cpu = self._seen.get(key, ("", 0.0))
            # an exiting process has an empty title, and a worker's role never goes back to idle
            group = old_group if old_group in self.SPECIFIC or not title.strip() else self.group(title)
            self._seen[key] = (group, max(cpu, old_cpu))

    def seconds(self) -> dict[str, float]:
        """CPU seconds per group spent since ``__enter__``."""
        out = dict.fromkeys(self.GROUPS, 0.0)
        for key, (group, cpu) in self._seen.items():
            out[group] += cpu - self._baseline.get(key, (group, 0.0))[1]
        return out


def start_ray(args) -> None:
    import ray

    if ray.is_initialized():
        return
    old = {"RAY_worker_niceness": os.environ.get("RAY_worker_niceness")}
    os.environ.setdefault("RAY_worker_niceness", "0")  # read by the raylet it starts (see the module docstring)
    try:
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    finally:
        _restore_env(old)


def e2e_case(args) -> dict:
    """Run in a child driver (a new Ray job, cold workers — as ``ray job submit`` gives each batch):
    one audit of ``args.e2e_published`` vs ``args.e2e_unpublished``; returns the figures."""
    import ray

    from cdi_ray.pipeline.run import run_manifest
    from cdi_ray.spec import parse_manifest

    ray.init(address=args.ray_address, log_to_driver=False)
    out = Path(args.workdir)
    manifest = parse_manifest({
        "models": {"m": {"uri": args.model_uri, "access": "white-box", "batch_size": args.batch,
                         "num_cpus": args.threads, "min_replicas": args.actors, "max_replicas": args.actors}},
        "audits": [{"id": "bench", "model": "m", "published": args.e2e_published,
                    "unpublished": args.e2e_unpublished, "preset": args.e2e_case, "test": {"min_samples": 2}}],
        "output": str(out / "results"),
        "feature_store": str(out / "store"),
    })
    t0 = time.perf_counter()
    with ProcessCpu(root=os.getppid()) as cpu:
        batch = run_manifest(manifest)
    wall = time.perf_counter() - t0
    return {"seconds": wall, "cpu_s": cpu.seconds(), "computed": batch.run["features"]["computed"],
            "done": batch.summary.get("done"), "timings": batch.run["timings"],
            "first_error": next((a["error"] for a in batch.audits if a["status"] != "done"), None)}


def child_driver(args, root: Path, model_uri: str, *case_args: str) -> dict:
    """Run ``case_args`` (``--e2e-case …`` / ``--scaling-case …``) in a fresh driver process on this
    Ray cluster; its last stdout line is the case's JSON."""
    import ray

    cmd = [sys.executable, __file__, *case_args, "--workdir", str(root), "--model-uri", model_uri,
           "--ray-address", ray.get_runtime_context().gcs_address, "--batch", str(args.batch),
           "--threads", str(args.threads), "--actors", str(args.actors)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {' '.join(case_args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def section_e2e(bench: Bench, args, state: dict) -> list[Row]:
    if bench.model_uri is None:
        return [Row("e2e", "skipped", "the model exists only in memory (no directory for the actors)")]
    start_ray(args)
    work = Path(state["workdir"]) / "e2e"
    n = args.e2e_images
    p_dir, u_dir = work / "P", work / "U"
    write_collection(p_dir, 0, n // 2)
    write_collection(u_dir, n // 2, n - n // 2)
    sources = {"local": (str(p_dir), str(u_dir))}
    if "s3" in args.sources:
        sources["s3"] = (upload(p_dir, "bench/P"), upload(u_dir, "bench/U"))
    if "s3-tar" in args.sources:  # the same images as WebDataset shards: one object per ~250 images
        from cdi_ray.packing import pack

        for side, folder in (("P", p_dir), ("U", u_dir)):
            upload(folder, f"bench/{side}")  # pack's source; bucket created
            pack(f"s3://bench/{side}/", f"s3://bench/{side}-tar/", fmt="webdataset", shard_size=250)
        sources["s3-tar"] = ("s3://bench/P-tar/*.tar", "s3://bench/U-tar/*.tar")
    main = "cpu" if bench.device == "cpu" else "wall"
    rows = []
    for preset in args.presets:
        for src in args.sources:
            floor = _quick_floor(bench, args, state)
            per = state.get("performed", {}).get(preset) or _planned(preset, bench, args)
            implied = floor.images_per_s(per["fwd"], per["fb"], "wall") * args.actors
            r = child_driver(args, work / f"{preset}-{src}", bench.model_uri, "--e2e-case", preset,
                             "--e2e-published", sources[src][0], "--e2e-unpublished", sources[src][1])
            used = r["cpu_s"]
            # CPU clock: the floor's CPU seconds for these passes against the CPU seconds of Ray's
            # workers (everything the pipeline runs, not Ray's daemons or the driver)
            floor_cpu_s = n / floor.images_per_s(per["fwd"], per["fb"], "cpu")
            ratio = {"wall": n / r["seconds"] / implied, "cpu": floor_cpu_s / sum(used[g] for g in ProcessCpu.WORKERS),
                     "actors_cpu": floor_cpu_s / used["actors"] if used["actors"] else 0.0}
            state.setdefault("e2e", {})[f"{preset}/{src}"] = {**r, "images_per_s": n / r["seconds"], "ratio": ratio,
                                                              "floor_cpu_s": floor_cpu_s, "implied": implied}
            ok = ratio[main] >= TARGET_E2E_RATIO and r["computed"] == n and r["done"] == 1
            rows.append(Row("e2e", f"{preset} from {src}: images/s ({r['computed']} computed, {args.actors} actor(s) × "
                                   f"{args.threads} thread(s)); stage seconds",
                            f"{n / r['seconds']:.2f} in {r['seconds']:.1f} s; "
                            + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())))
            rows.append(Row("e2e", f"{preset} from {src}: CPU s — floor for these passes; " + ", ".join(ProcessCpu.GROUPS),
                            f"{floor_cpu_s:.1f}; " + ", ".join(f"{used[g]:.1f}" for g in ProcessCpu.GROUPS)))
            rows.append(Row("e2e", f"{preset} from {src}: ratio to the floor — wall (floor {implied:.2f} images/s "
                                   f"measured just before) / cpu (floor ÷ Ray workers: actors, tasks, aggregators, "
                                   f"Ray Data) / cpu in the feature actors alone",
                            f"{ratio['wall']:.3f} / {ratio['cpu']:.3f} / {ratio['actors_cpu']:.3f}",
                            f"{main} ≥ {TARGET_E2E_RATIO}", ok))
            if r["first_error"]:
                rows.append(Row("e2e", f"{preset} from {src}: error", r["first_error"], "", False))
    return rows


def _planned(preset: str, bench: Bench, args) -> dict[str, float]:
    p = _feature_config(preset, bench).passes_per_image()
    return {"fwd": p["forward"], "fb": p["forward_backward"]}


def _quick_floor(bench: Bench, args, state: dict) -> Floor:
    """The floor at its best batch sizes, re-measured now (the machine's load drifts)."""
    bf, bb = (state["floor"].batch_fwd, state["floor"].batch_fb) if "floor" in state else (args.batch, args.batch)
    seconds = max(1.0, args.seconds / 2)
    r = {b: measure_f(bench, b, seconds) for b in {bf, bb}}
    return Floor(r[bf]["fwd_wall"], r[bf]["fwd_cpu"], r[bb]["fb_wall"], r[bb]["fb_cpu"], bf, bb)


# ==================================================================================================
# 5. scaling: each case in its own driver process
# ==================================================================================================
def scaling_case(args) -> dict:
    """Run in a child process: one manifest of ``args.scaling_case`` collections; returns the figures."""
    import ray

    from cdi_ray.pipeline.run import run_manifest
    from cdi_ray.spec import parse_manifest

    ray.init(address=args.ray_address, log_to_driver=False)
    root = Path(args.workdir)
    n, k = args.scaling_case, args.images_per_collection
    half = k // 2
    audits = [{"id": f"c{i:05d}", "model": "m",
               "published": [str(root / "images" / image_name(i * k + j)) for j in range(half)],
               "unpublished": [str(root / "images" / image_name(i * k + j)) for j in range(half, k)],
               "features": ["dl"], "overrides": {"dl": {"n_draws": 1}}, "test": {"min_samples": 2}}
              for i in range(n)]
    manifest = parse_manifest({
        "models": {"m": {"uri": args.model_uri, "access": "gray-box", "batch_size": args.batch,
                         "num_cpus": args.threads, "min_replicas": args.actors, "max_replicas": args.actors}},
        "audits": audits, "output": str(root / f"out-{n}"), "feature_store": str(root / f"store-{n}"),
    })
    before = _feature_actor_count()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    with PeakRss() as rss:
        batch = run_manifest(manifest)
    wall = time.perf_counter() - t0
    return {"collections": n, "images": n * k, "seconds": wall, "computed": batch.run["features"]["computed"],
            "done": batch.summary.get("done"), "feature_actors": _feature_actor_count() - before,
            "first_error": next((a["error"] for a in batch.audits if a["status"] != "done"), None),
            "rss_before_mb": rss0, "peak_rss_mb": rss.peak_mb,
            "timings": batch.run["timings"]}


def _feature_actor_count() -> int:
    """FeatureActor instances this Ray cluster has created (each loads the model once, in its constructor)."""
    from ray._private.state import actors

    return sum("FeatureActor" in str(a.get("ActorClassName", "")) for a in actors().values())


class PeakRss:
    """Peak resident memory of this process while the block runs (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.interval, self.peak_mb = interval, _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _rss_mb())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def section_scaling(bench: Bench, args, state: dict) -> list[Row]:
    if bench.model_uri is None:
        return [Row("scaling", "skipped", "the model exists only in memory")]
    start_ray(args)
    root = Path(state["workdir"]) / "scaling"
    k = args.images_per_collection
    write_collection(root / "images", 0, max(args.collections) * k)
    results = [child_driver(args, root, bench.model_uri, "--scaling-case", str(n),
                            "--images-per-collection", str(k)) for n in args.collections]
    state["scaling"] = results
    rows = []
    for r in results:
        t = r["timings"]
        rows.append(Row("scaling", f"{r['collections']} collections × {k} images: seconds; stage seconds",
                        f"{r['seconds']:.1f}; " + ", ".join(f"{s} {v:.1f}" for s, v in t.items())))
        rows.append(Row("scaling", f"{r['collections']} collections: model loads (feature actors) / actors; "
                                   "images computed; audits done",
                        f"{r['feature_actors']} / {args.actors}; {r['computed']} / {r['images']}; "
                        f"{r['done']} / {r['collections']}", "loads = actors, all computed and done",
                        r["feature_actors"] == args.actors and r["computed"] == r["images"]
                        and r["done"] == r["collections"]))
        rows.append(Row("scaling", f"{r['collections']} collections: driver RSS before the run → peak during it, MB",
                        f"{r['rss_before_mb']:.0f} → {r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['rss_before_mb']:.0f})"))
    if len(results) >= 2:
        small, big = results[0], results[-1]
        work = big["images"] / small["images"]
        ratio = big["seconds"] / small["seconds"]
        target = TARGET_SCALING_TIME_RATIO * work / 10
        rows.append(Row("scaling", f"time ratio {big['collections']} / {small['collections']} collections ({work:.0f}× the work)",
                        f"{ratio:.2f}", f"≤ {target:.1f}", ratio <= target))
        mem = big["peak_rss_mb"] / small["peak_rss_mb"]
        rows.append(Row("scaling", "driver peak memory ratio", f"{mem:.2f}", f"≤ {TARGET_MEMORY_RATIO} (flat)",
                        mem <= TARGET_MEMORY_RATIO))
    return rows


# ==================================================================================================
# 6. statistics, 7. shards
# ==================================================================================================
def section_stats(bench: Bench, args, state: dict) -> list[Row]:
    spec = importlib.util.spec_from_file_location("cdi_ray_calibration", ROOT / "jobs" / "calibration.py")
    calibration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibration)
    rows = []
    for r in calibration.statistics_cost(args.stats_n, seed=0):
        rows.append(Row("stats", f"{r['n_published']:,} + {r['n_unpublished']:,} × {r['k']}, {r['case']}, "
                                 f"block {r['block_size']}, cap {r['max_permutations']}: permutations drawn, p, CPU s, wall s",
                        f"{r['permutations_drawn']}, {r['pvalue']:.3g}, {r['cpu_s']:.2f}, {r['wall_s']:.2f}"))
    return rows


def section_shards(bench: Bench, args, state: dict) -> list[Row]:
    from cdi_ray.pipeline.bench_sources import bench_sources

    result = bench_sources(n_images=args.e2e_images)
    return [Row("shards", f"{kind}: images/s from S3 ({r['objects']} objects)", f"{r['images_per_s']:.1f}")
            for kind, r in result["per_kind"].items()]


SECTION_FUNCS = {"floor": section_floor, "passes": section_passes, "method": section_method, "e2e": section_e2e,
                 "scaling": section_scaling, "stats": section_stats, "shards": section_shards}


# ==================================================================================================
# driver
# ==================================================================================================
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections ({','.join(SECTIONS)})")
    p.add_argument("--quick", action="store_true", help="small counts for development (noisy figures)")
    p.add_argument("--tiny", action="store_true", help="tiny random models and counts: checks the code path, not speed")
    p.add_argument("--gpu-dit-xl", action="store_true",
                   help="model layer (floor, passes, method) on a DiT-XL/2-256 from config, cuda, bf16 autocast, batch 64")
    p.add_argument("--model", default="easy", help="demo model easy|hard (default easy), or dit-xl")
    p.add_argument("--preset", action="append", dest="presets", choices=sorted(SPEC_PASSES), help="repeatable; default both")
    p.add_argument("--source", action="append", dest="sources", choices=("local", "s3", "s3-tar"),
                   help="repeatable; default local and s3 (small objects); s3-tar: the same images as tar shards on S3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, help="images per extractor call / feature-actor batch (default 64)")
    p.add_argument("--batches", help="batch sizes tried for the floor, e.g. 16,32,64,128")
    p.add_argument("--threads", type=int, default=1, help="torch threads = CPUs per feature actor (default 1)")
    p.add_argument("--actors", type=int, default=1, help="feature actors in the e2e and scaling runs (default 1)")
    p.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs of the local Ray (default 8)")
    p.add_argument("--seconds", type=float, help="seconds per floor measurement")
    p.add_argument("--method-images", type=int, help="images for the method-layer measurement")
    p.add_argument("--e2e-images", type=int, help="images per end-to-end run (half P, half U)")
    p.add_argument("--collections", help="scaling cases, e.g. 100,1000")
    p.add_argument("--images-per-collection", type=int, default=20)
    p.add_argument("--stats-n", type=int, help="|P| = |U| of the statistics benchmark (default 20000)")
    p.add_argument("--json", help="also write the table and raw figures as JSON here")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one)")
    # internal: one scaling case in a child driver
    p.add_argument("--scaling-case", type=int, help=argparse.SUPPRESS)
    p.add_argument("--e2e-case", help=argparse.SUPPRESS)
    p.add_argument("--e2e-published", help=argparse.SUPPRESS)
    p.add_argument("--e2e-unpublished", help=argparse.SUPPRESS)
    p.add_argument("--ray-address", help=argparse.SUPPRESS)
    p.add_argument("--model-uri", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scaling_case or args.e2e_case:
        args.batch = args.batch or 64
        return args
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown}; valid: {','.join(SECTIONS)}")
    if "method" in args.sections or "e2e" in args.sections:
        args.sections = list(dict.fromkeys(["floor", *args.sections]))  # ratios need the floor
    if args.gpu_dit_xl:
        args.model = "dit-xl"
        args.device = args.device if args.device != "cpu" or args.tiny else "cuda"
        args.batch = args.batch or 64
        args.sections = [s for s in args.sections if s in ("floor", "passes", "method")]
    if args.device.startswith("cuda") and not __import__("torch").cuda.is_available():
        p.error(f"device {args.device!r}: no CUDA device here; add --tiny to run the same code path on CPU")
    args.presets = args.presets or ["white-box", "gray-box"]
    args.sources = args.sources or ["local", "s3"]
    args.autocast = "bfloat16" if args.gpu_dit_xl and not args.tiny else None
    args.dtype = __import__("torch").bfloat16 if args.autocast else __import__("torch").float32
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    defaults = {  # per size: batch, floor batches, seconds, method images, e2e images, collections, stats n
        "tiny": (4, "4,8", 0.2, 4, 16, "2,4", 200),
        "quick": (64, "32,64,128", 1.0, 64, 256, "10,100", 2000),
        "full": (64, "16,32,64,128,256", 3.0, 256, 2000, "100,1000", 20000),
    }[size]
    args.batch = args.batch or defaults[0]
    if args.gpu_dit_xl and not args.tiny and not args.batches:
        args.batches = "32,64,128"  # DiT-XL/2's forward+backward activations at 256 rows approach 100 GB
    args.batches = [int(b) for b in (args.batches or defaults[1]).split(",")]
    args.seconds = args.seconds or defaults[2]
    args.method_images = args.method_images or defaults[3]
    args.e2e_images = args.e2e_images or defaults[4]
    args.collections = [int(c) for c in (args.collections or defaults[5]).split(",")]
    args.stats_n = args.stats_n or defaults[6]
    if args.tiny:
        args.images_per_collection = min(args.images_per_collection, 10)  # 5 + 5: the smallest 5-fold test
    return args


def format_table(rows: list[Row]) -> str:
    """The table as Markdown (pasted into docs/PERFORMANCE.md as is)."""
    lines = ["| section | measure | value | target | ok |", "|---|---|---|---|---|"]
    for r in rows:
        ok = "" if r.ok is None else "yes" if r.ok else "**NO**"
        lines.append(f"| {r.section} | {r.measure} | {r.value} | {r.target} | {ok} |")
    return "\n".join(lines)


def run(args, on_section=None) -> tuple[list[Row], dict]:
    """Run the selected sections; returns the rows and the raw figures. ``on_section(rows, state)``
    is called after each section (the full run saves its progress with it)."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cdi-bench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(args.workdir or tmp)
        state: dict = {"workdir": str(workdir)}
        bench = load_bench(args, workdir)
        if ("e2e" in args.sections and {"s3", "s3-tar"} & set(args.sources)) or "shards" in args.sections:
            stack.enter_context(moto_server())
        rows = [Row("setup", "model, device, torch threads, autocast",
                    f"{bench.name}, {bench.device}, {torch.get_num_threads()}, {bench.autocast or 'none'}")]
        for section in args.sections:
            t0 = time.perf_counter()
            rows += SECTION_FUNCS[section](bench, args, state)
            print(f"[{section}] {time.perf_counter() - t0:.1f} s, load average {os.getloadavg()[0]:.1f}",
                  file=sys.stderr, flush=True)
            if on_section:
                on_section(rows, state)
    return rows, state


def header(started: _dt.datetime) -> str:
    return (f"# cdi-ray benchmark — {started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}\n# python {' '.join(sys.argv)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scaling_case or args.e2e_case:
        print(json.dumps(scaling_case(args) if args.scaling_case else e2e_case(args)))
        return 0
    started = _dt.datetime.now(_dt.timezone.utc)

    def save(rows: list[Row], state: dict) -> None:
        if not args.json:
            return
        raw = {k: (asdict(v) if k == "floor" else v) for k, v in state.items()}
        Path(args.json).write_text(json.dumps({"started": started.isoformat(timespec="seconds"), "argv": sys.argv,
                                               "table": header(started) + "\n" + format_table(rows),
                                               "rows": [asdict(r) for r in rows], "raw": raw}, indent=1, default=str))

    rows, state = run(args, on_section=save)
    print(header(started))
    print(format_table(rows))
    save(rows, state)
    return 0 if all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

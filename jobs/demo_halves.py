"""The tuning and evaluation halves of the demo models' images, and chunked, cached features.

NEVER TUNE ON WHAT YOU REPORT (issue 17): every setting of the statistics and feature studies
(scorer, shrinkage, feature preset, timesteps) is chosen on the **tuning half** of the ``hard``
model's members and of the held-out pool; figures are reported on the **evaluation half** (and
on ``easy``, which is used for reporting only). The halves are a fixed, seeded split:

    rng = numpy.random.default_rng(HALVES_SEED)
    members  → rng.permutation(members):  first half = tuning, second half = evaluation
    held-out → rng.permutation(held-out): first half = tuning, second half = evaluation

(members permuted first, then the held-out pool, from one generator). With the shipped split
files: hard — 1,000 + 1,000 members, 1,250 + 1,250 held-out images.

Features are extracted in chunks of :data:`CHUNK` images (bundle indices in ascending order) by
:func:`cdi_ray.demo.features.demo_features`, each chunk cached on disk, so a killed run resumes
where it stopped and every job that asks for the same images and configuration reads the cache.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HALVES_SEED = 20251117
CHUNK = 250
DEFAULT_CACHE = Path(os.environ.get("CDI_RAY_FEATURE_CACHE", Path.home() / ".cache" / "cdi-ray" / "reference"))


@dataclass(frozen=True)
class Halves:
    """Bundle indices of one demo model's members and held-out images, split in two halves."""

    members_tune: np.ndarray
    members_eval: np.ndarray
    heldout_tune: np.ndarray
    heldout_eval: np.ndarray

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(members, held-out) of ``"tune"``, ``"eval"`` or ``"all"``."""
        if name == "tune":
            return self.members_tune, self.heldout_tune
        if name == "eval":
            return self.members_eval, self.heldout_eval
        if name == "all":
            return (np.sort(np.r_[self.members_tune, self.members_eval]),
                    np.sort(np.r_[self.heldout_tune, self.heldout_eval]))
        raise ValueError(f"part must be 'tune', 'eval' or 'all'; got {name!r}")


def demo_halves(model: str) -> Halves:
    from cdi_ray.demo.bundle import load_split

    split = load_split(model)
    members, heldout = np.asarray(split["members"]), np.asarray(split["heldout"])
    rng = np.random.default_rng(HALVES_SEED)
    pm, ph = rng.permutation(members), rng.permutation(heldout)
    hm, hh = len(pm) // 2, len(ph) // 2
    return Halves(np.sort(pm[:hm]), np.sort(pm[hm:]), np.sort(ph[:hh]), np.sort(ph[hh:]))


def cached_features(model: str, indices: np.ndarray, *, preset="white-box", overrides=None, seed: int = 0,
                    cache: Path = DEFAULT_CACHE, log=print) -> tuple[np.ndarray, list[str], float]:
    """Features of bundle images ``indices`` (any order) on demo model ``model``, chunk-cached.

    Returns ``(X, columns, seconds)`` with rows in the order of ``indices``; ``seconds`` is the
    extraction time of the runs that computed the chunks.
    """
    from cdi_ray.demo.features import demo_features

    indices = np.asarray(indices, dtype=np.int64)
    order = np.unique(indices)
    rows, columns, seconds = [], None, 0.0
    for start in range(0, len(order), CHUNK):
        chunk = order[start:start + CHUNK]
        t0 = time.perf_counter()
        X, columns, s = demo_features(model, chunk, seed=seed, preset=preset, overrides=overrides, cache=cache)
        seconds += s
        if time.perf_counter() - t0 > 1:
            log(f"  {model} {preset}: images {start + len(chunk)}/{len(order)} ({s:.0f} s)")
        rows.append(X)
    X = np.concatenate(rows) if rows else np.zeros((0, 0))
    pos = np.searchsorted(order, indices)
    return X[pos], list(columns or []), seconds


def part_features(model: str, part: str, **kwargs) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(members X, held-out X, columns) of a half (``"tune"``/``"eval"``) or of both (``"all"``),
    each half read through its own chunk cache so "all" reuses the halves' extractions.

    ``preset="gray-box"`` is read from the white-box extraction: its 14 columns are white-box
    columns computed from the same noise draws (every family's values are independent of which
    other families run), so they need no extraction of their own."""
    if kwargs.get("preset") == "gray-box":
        Xm, Xh, cols = part_features(model, part, **{**kwargs, "preset": "white-box"})
        keep = [j for j, c in enumerate(cols) if not c.startswith(("gm_", "no_"))]
        return Xm[:, keep], Xh[:, keep], [cols[j] for j in keep]
    h = demo_halves(model)
    parts = ("tune", "eval") if part == "all" else (part,)
    Xm, Xh, cols = [], [], None
    for p in parts:
        m, u = h.part(p)
        a, cols, _ = cached_features(model, m, **kwargs)
        b, _, _ = cached_features(model, u, **kwargs)
        Xm.append(a)
        Xh.append(b)
    return np.concatenate(Xm), np.concatenate(Xh), cols

"""Per-image random streams.

METHOD.md requires that an image's features never depend on the batch, actor,
machine or order it was processed in. Every random draw therefore comes from a
``torch.Generator`` seeded by (audit seed, image content hash, stream name) —
never from global RNG state — and each image in a batch gets its own generator.
"""
from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, content_hash: str, stream: str) -> int:
    """A 63-bit seed for one named random stream of one image."""
    digest = hashlib.sha256(f"{int(seed)}\x00{content_hash}\x00{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_generators(seed: int, content_hashes: list[str], stream: str, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per image for ``stream``; pass the list to ``per_image_randn``."""
    gens = []
    for h in content_hashes:
        g = torch.Generator(device=device)
        g.manual_seed(stream_seed(seed, h, stream))
        gens.append(g)
    return gens


def per_image_randn(shape: tuple[int, ...], generators: list[torch.Generator], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of shape ``(len(generators), *shape)``, row i drawn from ``generators[i]``.

    Drawn on the generator's device and moved afterwards, so a row is the same
    whatever the batch it sits in.
    """
    rows = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
    out = torch.stack(rows) if rows else torch.empty((0, *shape))
    return out.to(device=device if device is not None else out.device, dtype=dtype)

"""Per-batch evaluation context: the one place that calls the model.

Notation (METHOD.md): ``z`` clean latent (pixels for pixel models), ``ε`` standard normal noise,
``z_t = sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε``, ``f(z_t, t)`` the model's noise prediction (with the
image's conditioning).

What it does for the features:

* **Per-image noise** — ``noise(stream, draw)`` is the ``draw``-th ε of a named stream, row i
  drawn from a CPU generator seeded by (audit seed, image content hash, ``"{stream}:{draw}"``)
  (``cdi_ray.seeding``): independent of batch, order, device and of which features run.
* **Memoised shared evaluations** — first-level evaluations several features need are keyed:
  ``NoisedKey(stream, draw, t)`` is f(z_t, t) with z_t made from ``noise(stream, draw)``;
  ``CleanKey(t)`` is f(z, t). ``prefetch`` computes a set of them in a few large forwards
  (keys concatenated along the batch axis, several timesteps in one call, chunked by
  ``max_micro_batch`` rows). A key asked for with ``grad=True`` is computed by a forward+backward
  pass that also yields the forward value, so a feature needing only the value (ML) reuses the
  gradient pass of another (GM).
* **Pass counting** — ``counts["forward"]`` and ``counts["forward_backward"]`` are ``(B,)``
  int64 tensors: how many evaluations of f each image has had.

Forward passes run under ``torch.inference_mode``; gradient passes under ``torch.enable_grad``
with ``torch.autograd.grad`` w.r.t. the input only (no parameter ``.grad`` is touched).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from cdi_ray.features.base import Request
from cdi_ray.models.base import DiffusionModel
from cdi_ray.seeding import image_generators, per_image_randn


@dataclass(frozen=True, order=True)
class NoisedKey:
    """f(sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε, t) with ε = ``noise(stream, draw)``; its target is ε."""

    stream: str
    draw: int
    t: int


@dataclass(frozen=True, order=True)
class CleanKey:
    """f(z, t) evaluated on the clean latent."""

    t: int


EvalKey = NoisedKey | CleanKey


@dataclass(frozen=True)
class Evaluation:
    """A memoised evaluation. ``pred`` (B, C, H, W); for a ``NoisedKey`` computed with a gradient,
    ``loss`` = ‖f(z_t,t)−ε‖ (B,) and ``grad`` = ∂loss/∂z_t (B, C, H, W)."""

    pred: torch.Tensor
    loss: torch.Tensor | None = None
    grad: torch.Tensor | None = None


def stream_name(stream: str, draw: int) -> str:
    """The seeding stream of the ``draw``-th ε of ``stream``."""
    return f"{stream}:{int(draw)}"


def image_noise(
    seed: int, content_hashes: list[str], stream: str, draw: int, shape: tuple[int, ...], *, device=None
) -> torch.Tensor:
    """ε of shape ``(len(content_hashes), *shape)``: the ``draw``-th draw of ``stream`` per image.

    Drawn from CPU generators so the values are the same on every device.
    """
    gens = image_generators(seed, content_hashes, stream_name(stream, draw), device="cpu")
    return per_image_randn(tuple(shape), gens, device=device)


class EvalContext:
    """Everything the features of one batch share.

    Args:
        model (`DiffusionModel`): the model; ``model.device`` is where evaluations run.
        z (`Tensor` of shape (B, C, H, W)): clean latents, float32 on ``model.device``.
        cond: the batch's conditioning (``model.conditioning``); rows picked with ``model.select``.
        seed (`int`): the audit seed.
        content_hashes (`list[str]`): one per image, same order as ``z``.
        max_micro_batch (`int`, *optional*, defaults to 256): most rows in one forward call of f.
        max_micro_batch_grad (`int`, *optional*, defaults to 64): most rows in one forward+backward call.
        autocast_dtype (`torch.dtype`, *optional*): run f under ``torch.autocast`` with it.
    """

    def __init__(
        self,
        model: DiffusionModel,
        z: torch.Tensor,
        cond: Any,
        *,
        seed: int,
        content_hashes: list[str],
        max_micro_batch: int = 256,
        max_micro_batch_grad: int = 64,
        autocast_dtype: torch.dtype | None = None,
    ):
        if z.ndim != 4 or z.shape[0] != len(content_hashes):
            raise ValueError(f"z must be (B, C, H, W) with B = len(content_hashes) = {len(content_hashes)}, got {tuple(z.shape)}")
        if max_micro_batch < 1 or max_micro_batch_grad < 1:
            raise ValueError(f"micro-batch sizes must be >= 1, got {max_micro_batch}, {max_micro_batch_grad}")
        self.model = model
        self.z = z.float()
        self.cond = cond
        self.seed = int(seed)
        self.content_hashes = list(content_hashes)
        self.max_micro_batch = int(max_micro_batch)
        self.max_micro_batch_grad = int(max_micro_batch_grad)
        self.autocast_dtype = autocast_dtype
        self.device = z.device
        self.B = int(z.shape[0])
        self.counts = {
            "forward": torch.zeros(self.B, dtype=torch.long),
            "forward_backward": torch.zeros(self.B, dtype=torch.long),
        }
        self._noise: dict[tuple[str, int], torch.Tensor] = {}
        self._memo: dict[EvalKey, Evaluation] = {}
        self._all = torch.arange(self.B, device=self.device)

    # ------------------------------------------------------------------ schedule and noise
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.z.shape[1:])  # type: ignore[return-value]

    def abar(self, t: int) -> float:
        """ᾱ_t as a Python float (float64 schedule)."""
        return float(self.model.alphas_cumprod[int(t)])

    def q_sample(self, z: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """z_t = sqrt(ᾱ_t)·z + sqrt(1-ᾱ_t)·ε."""
        a = self.abar(t)
        return math.sqrt(a) * z + math.sqrt(1.0 - a) * eps

    def noise(self, stream: str, draw: int = 0) -> torch.Tensor:
        """The ``draw``-th ε of ``stream`` for every image, (B, C, H, W) on the device."""
        k = (stream, int(draw))
        if k not in self._noise:
            self._noise[k] = image_noise(self.seed, self.content_hashes, stream, draw, self.latent_shape, device=self.device)
        return self._noise[k]

    def noised(self, key: NoisedKey) -> torch.Tensor:
        return self.q_sample(self.z, key.t, self.noise(key.stream, key.draw))

    # ------------------------------------------------------------------ raw passes
    def _index(self, index: torch.Tensor | None, rows: int) -> torch.Tensor:
        if index is None:
            if rows != self.B:
                raise ValueError(f"{rows} rows need an explicit image index (B = {self.B})")
            return self._all
        return torch.as_tensor(index, device=self.device).long()

    @staticmethod
    def _timesteps(t: int | torch.Tensor, rows: int) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            t = t.detach().to("cpu").long().reshape(-1)
            return t.expand(rows) if t.numel() == 1 else t
        return torch.full((rows,), int(t), dtype=torch.long)

    def _f(self, z_in: torch.Tensor, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One call of the model on rows ``z_in`` at per-row timesteps ``t`` (CPU long)."""
        if index.shape[0] == self.B and torch.equal(index, self._all):
            cond = self.cond
        else:
            cond = self.model.select(self.cond, index)
        t_arg: int | torch.Tensor = int(t[0]) if bool((t == t[0]).all()) else t.to(self.device)
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                out = self.model.predict_noise(z_in, t_arg, cond)
        else:
            out = self.model.predict_noise(z_in, t_arg, cond)
        return out.float()

    @staticmethod
    def _chunks(rows: int, size: int) -> Iterable[slice]:
        for s in range(0, rows, size):
            yield slice(s, min(rows, s + size))

    def forward(self, z_in: torch.Tensor, t: int | torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """f(z_in, t) for rows ``z_in`` (N, C, H, W) of images ``index`` (N,) (default: the batch).

        ``t`` is an int or an (N,) tensor of per-row timesteps. Counted as one forward per row.
        """
        n = z_in.shape[0]
        idx = self._index(index, n)
        ts = self._timesteps(t, n)
        outs = []
        with torch.inference_mode():
            for sl in self._chunks(n, self.max_micro_batch):
                outs.append(self._f(z_in[sl], ts[sl], idx[sl]))
        self.counts["forward"].index_add_(0, idx.cpu(), torch.ones(n, dtype=torch.long))
        return torch.cat(outs) if outs else z_in.new_empty(z_in.shape)

    def value_and_grad(
        self, z_in: torch.Tensor, t: int | torch.Tensor, target: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """loss = ‖f(z_in, t) − target‖ per row, its gradient w.r.t. ``z_in``, and f(z_in, t).

        Rows are independent (the summed loss has a block-diagonal Jacobian), so a row's gradient
        does not depend on what else is in the call. Counted as one forward+backward per row.
        """
        n = z_in.shape[0]
        idx = self._index(index, n)
        ts = self._timesteps(t, n)
        losses, grads, preds = [], [], []
        for sl in self._chunks(n, self.max_micro_batch_grad):
            with torch.inference_mode(False), torch.enable_grad():
                x = z_in[sl].detach().clone().float().requires_grad_(True)
                pred = self._f(x, ts[sl], idx[sl])
                loss = torch.linalg.vector_norm((pred - target[sl].float()).flatten(1), ord=2, dim=1)
                (g,) = torch.autograd.grad(loss.sum(), x)
            losses.append(loss.detach())
            grads.append(g.detach())
            preds.append(pred.detach())
        self.counts["forward_backward"].index_add_(0, idx.cpu(), torch.ones(n, dtype=torch.long))
        return torch.cat(losses), torch.cat(grads), torch.cat(preds)

    # ------------------------------------------------------------------ memoised shared evaluations
    def prefetch(self, requests: Iterable[Request]) -> None:
        """Compute every requested key not yet memoised: gradient keys in one batched
        forward+backward sweep, the remaining keys in one batched forward sweep."""
        requests = list(requests)
        grad_keys = sorted({r.key for r in requests if r.grad}, key=_sort_key)
        for k in grad_keys:
            if not isinstance(k, NoisedKey):
                raise ValueError(f"only NoisedKey evaluations carry a gradient, got {k!r}")
        grad_keys = [k for k in grad_keys if not (k in self._memo and self._memo[k].grad is not None)]
        gset = set(grad_keys)
        fwd_keys = sorted({r.key for r in requests if r.key not in gset and r.key not in self._memo}, key=_sort_key)

        if grad_keys:
            z_in = torch.cat([self.noised(k) for k in grad_keys])
            target = torch.cat([self.noise(k.stream, k.draw) for k in grad_keys])
            ts = torch.cat([torch.full((self.B,), k.t, dtype=torch.long) for k in grad_keys])
            idx = self._all.repeat(len(grad_keys))
            loss, grad, pred = self.value_and_grad(z_in, ts, target, idx)
            for i, k in enumerate(grad_keys):
                sl = slice(i * self.B, (i + 1) * self.B)
                self._memo[k] = Evaluation(pred=pred[sl], loss=loss[sl], grad=grad[sl])
        if fwd_keys:
            z_in = torch.cat([self.noised(k) if isinstance(k, NoisedKey) else self.z for k in fwd_keys])
            ts = torch.cat([torch.full((self.B,), k.t, dtype=torch.long) for k in fwd_keys])
            idx = self._all.repeat(len(fwd_keys))
            pred = self.forward(z_in, ts, idx)
            for i, k in enumerate(fwd_keys):
                self._memo[k] = Evaluation(pred=pred[i * self.B:(i + 1) * self.B])

    def get(self, key: EvalKey, *, grad: bool = False) -> Evaluation:
        """The memoised evaluation of ``key`` (computed now if it was not prefetched)."""
        if key not in self._memo or (grad and self._memo[key].grad is None):
            self.prefetch([Request(key, grad)])
        return self._memo[key]

    def loss(self, key: NoisedKey) -> torch.Tensor:
        """‖f(z_t, t) − ε‖ per image for a noised key (B,)."""
        ev = self.get(key)
        if ev.loss is not None:
            return ev.loss
        return torch.linalg.vector_norm((ev.pred - self.noise(key.stream, key.draw)).flatten(1), ord=2, dim=1)


def _sort_key(k: EvalKey) -> tuple:
    return (0, "", 0, k.t) if isinstance(k, CleanKey) else (1, k.stream, k.draw, k.t)

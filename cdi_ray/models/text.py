"""Captions → text embeddings, for the caption-conditioned families (``text-to-image``, ``uvit`` t2i).

* :func:`choose_captions` picks one caption per image: the image's only caption, or — when the
  collection gives several — one drawn with the image's own ``"cond"`` generator, so the choice
  depends on (seed, image) only, never on the batch. An image without a caption is an error
  unless the model was loaded with ``missing_caption="empty"`` (the empty prompt ``""``, which
  is also what classifier-free-guidance training used for "no caption").
* :class:`TextEncoder` runs a CLIP tokenizer + text encoder (``last_hidden_state``, padded to the
  tokenizer's ``model_max_length``, as Stable Diffusion and U-ViT do) and keeps each caption's
  embedding in an LRU cache: every feature config of an actor asks for the same batch's
  conditioning, and the empty prompt recurs; the text encoder runs once per caption.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch

from . import _common as C
from .base import ImageMeta

MissingCaption = Literal["error", "empty"]

TEXT_LAYOUT = "text_encoder/ (transformers CLIPTextModel config.json + weights) + tokenizer/ (CLIPTokenizer files)"


def check_missing_caption(value: str) -> None:
    if value not in ("error", "empty"):
        raise ValueError(f"missing_caption must be 'error' or 'empty', got {value!r}")


def choose_captions(metas: list[ImageMeta], generators: list[torch.Generator] | None,
                    missing_caption: MissingCaption) -> list[str]:
    """One caption per image (see the module docstring); ``generators=None`` takes each image's first."""
    C.check_generators(generators, len(metas))
    chosen = []
    for i, m in enumerate(metas):
        captions = tuple(m.captions or ())
        if not captions:
            if missing_caption == "empty":
                chosen.append("")
                continue
            raise ValueError(f"image {m.content_hash} has no caption, but this model is text-conditional; give every "
                             "image a caption (a sidecar JSONL/CSV or a Parquet caption column), or load the model "
                             "with missing_caption='empty' to use the empty prompt")
        bad = [c for c in captions if not isinstance(c, str)]
        if bad:
            raise ValueError(f"image {m.content_hash} has a caption that is not text: {bad[0]!r}")
        if len(captions) == 1 or generators is None:
            chosen.append(captions[0])
        else:
            chosen.append(captions[int(torch.randint(len(captions), (1,), generator=generators[i]))])
    return chosen


class TextEncoder:
    """A CLIP tokenizer + text encoder with a per-caption embedding cache.

    Args:
        tokenizer (`CLIPTokenizer`): pads/truncates to ``tokenizer.model_max_length`` tokens.
        text_encoder (`CLIPTextModel`): frozen; its ``last_hidden_state`` is the embedding.
        device (`torch.device`).
        out_dtype (`torch.dtype`): dtype of the returned embeddings (the noise predictor's).
        cache_size (`int`): captions kept (LRU); an SD embedding is 77×768 values.
    """

    def __init__(self, tokenizer, text_encoder, *, device: torch.device, out_dtype: torch.dtype, cache_size: int = 1024):
        if int(cache_size) < 1:
            raise ValueError(f"caption_cache_size must be at least 1, got {cache_size!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.out_dtype = out_dtype
        self.max_length = int(tokenizer.model_max_length)
        positions = int(text_encoder.config.max_position_embeddings)
        if self.max_length > positions:
            raise ValueError(f"the tokenizer pads to {self.max_length} tokens but the text encoder has only "
                             f"{positions} positions")
        self.hidden_size = int(text_encoder.config.hidden_size)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # captions run through the text encoder (for tests and logs)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        """Embeddings ``(B, max_length, hidden_size)`` in ``out_dtype`` on ``device``."""
        todo = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if todo:
            ids = self.tokenizer(todo, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            hidden = self.text_encoder(ids).last_hidden_state.to(self.out_dtype)
            self.encoded += len(todo)
            for caption, h in zip(todo, hidden):
                self._cache[caption] = h
        rows = []
        for c in captions:
            self._cache.move_to_end(c)
            rows.append(self._cache[c])
        out = torch.stack(rows) if rows else torch.empty(0, self.max_length, self.hidden_size, dtype=self.out_dtype,
                                                         device=self.device)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out


def load_text_encoder(root: Path, *, device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype,
                      cache_size: int, layout: str) -> TextEncoder:
    """``root/tokenizer/`` + ``root/text_encoder/`` (local files only), every failure → ModelLoadError."""
    from transformers import CLIPTextModel, CLIPTokenizer

    for sub, what in (("tokenizer", "CLIPTokenizer"), ("text_encoder", "CLIPTextModel")):
        if not (root / sub).is_dir():
            raise C.load_error(root, f"missing subfolder '{sub}/' (expected a {what}; this model is text-conditional)",
                               f"save it with `{what}.save_pretrained('{root / sub}')`; this family's layout is {layout}")
    cfg = C.read_json(root / "text_encoder" / "config.json")
    if cfg is None:
        raise C.load_error(root, "missing or unreadable 'text_encoder/config.json'",
                           f"re-save the text encoder with `CLIPTextModel.save_pretrained('{root / 'text_encoder'}')`")
    if cfg.get("model_type") != "clip_text_model" and "CLIPTextModel" not in (cfg.get("architectures") or []):
        raise C.load_error(root, f"'text_encoder/' holds a {cfg.get('architectures') or cfg.get('model_type')!r}, "
                           "expected a CLIPTextModel", f"put the model's CLIP text encoder there; layout: {layout}")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 — anything transformers/tokenizers raises
        raise C.load_error(root, f"the tokenizer in 'tokenizer/' does not load ({C.first_line(exc)})",
                           "save the model's CLIPTokenizer there with `save_pretrained` (vocab + merges or "
                           "tokenizer.json)") from None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one line per actor in the logs is enough
    try:
        text_encoder, info = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
    except Exception as exc:  # noqa: BLE001
        raise C.load_error(root, f"the weights in 'text_encoder/' do not load ({C.first_line(exc)})",
                           "check that 'text_encoder/' holds the config and weights saved together by `save_pretrained`") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in (info.get("missing_keys") or []) if not k.endswith("position_ids")]
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = (missing or [m[0] for m in mismatched])[:3]
        raise C.load_error(root, f"'text_encoder/' weights do not match its config ({len(missing) + len(mismatched)} "
                           f"missing or wrong-shaped tensors, e.g. {bad})",
                           "re-save 'text_encoder/' so that config.json and the weights come from the same model")
    text_encoder = C.freeze(text_encoder, device, dtype)
    try:
        return TextEncoder(tokenizer, text_encoder, device=device, out_dtype=out_dtype, cache_size=cache_size)
    except ValueError as exc:
        raise C.load_error(root, str(exc), "use the tokenizer and text encoder the model was trained with") from None

"""The per-image row of a feature stream: one definition, one encoding, one decoding.

Planning writes a model's work as :class:`ImageRow` s (:func:`encode`, a Parquet file in read
order); the stream's stages receive them as column batches and read them back with
:func:`decode` — the decode stage to fetch and check the bytes, the feature actor to condition
the model and to know which feature configs each image needs.

On the wire every column is flat (strings and integers), so that Ray Data moves the batches as
plain Arrow columns between stages whatever fuses with what: ``label`` is ``-1`` for an image
the model gets no class for, ``captions`` a JSON list, ``configs`` the config keys joined by
``","``. Nothing outside this module reads or writes those encodings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

#: ``label`` on the wire for "no class label" (class indices are never negative).
NO_LABEL = -1

#: Wire columns of a stream row, in order.
SCHEMA = pa.schema([
    ("uri", pa.string()),            # where the bytes are (a file, or a shard for members)
    ("loc", pa.string()),            # where inside the shard ("" for a whole file)
    ("content_hash", pa.string()),   # sha256 of the bytes: re-checked when decoded, the seed root
    ("key", pa.string()),            # the store key: the content hash, or (content, conditioning)
    ("label", pa.int64()),           # class index the model is conditioned on, NO_LABEL for none
    ("captions", pa.string()),       # JSON list of the image's captions
    ("configs", pa.string()),        # feature-config keys to compute, ","-joined
    ("describe", pa.bool_()),        # also compute the model-free descriptors of these bytes
])
COLUMNS = tuple(SCHEMA.names)


@dataclass(frozen=True)
class ImageRow:
    """One image to compute under one model.

    Attributes:
        uri (`str`): a URI holding the bytes; ``loc`` says where inside a shard.
        content_hash (`str`): sha256 of the encoded bytes.
        key (`str`): the image's store key (:mod:`cdi_ray.conditioning`).
        configs (`tuple[str, ...]`): feature-config keys this image is computed under (one decode
            serves all of them).
        label (`int`, *optional*): class index the model is conditioned on.
        captions (`tuple[str, ...]`): captions the model is conditioned on.
        describe (`bool`): also compute the image's model-free descriptors in the decode stage.
    """

    uri: str
    loc: str
    content_hash: str
    key: str
    configs: tuple[str, ...]
    label: int | None = None
    captions: tuple[str, ...] = ()
    describe: bool = False


def encode(rows: Iterable[ImageRow]) -> pa.Table:
    """Rows → a wire table (:data:`SCHEMA`)."""
    rows = list(rows)
    return pa.table({
        "uri": [r.uri for r in rows],
        "loc": [r.loc for r in rows],
        "content_hash": [r.content_hash for r in rows],
        "key": [r.key for r in rows],
        "label": [NO_LABEL if r.label is None else int(r.label) for r in rows],
        "captions": [json.dumps(list(r.captions)) for r in rows],
        "configs": [",".join(r.configs) for r in rows],
        "describe": [bool(r.describe) for r in rows],
    }, schema=SCHEMA)


def encode_columns(*, uri, loc, content_hash, key, label, captions, configs, describe) -> pa.Table:
    """Column arrays → a wire table, for planning's columnar path.

    ``label``: integers or nulls (null → no label); ``captions`` and ``configs``: lists of strings.
    """
    label = pa.array(label, pa.int64()).fill_null(NO_LABEL)
    captions = pa.array([json.dumps(list(c or ())) for c in _pylist(captions)], pa.string())
    configs = pa.array([",".join(c) for c in _pylist(configs)], pa.string())
    return pa.table([pa.array(uri, pa.string()), pa.array(loc, pa.string()), pa.array(content_hash, pa.string()),
                     pa.array(key, pa.string()), label, captions, configs, pa.array(describe, pa.bool_())],
                    schema=SCHEMA)


def _pylist(values) -> list:
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


def _strings(batch: Mapping, name: str, n: int, default: str = "") -> list[str]:
    return [str(v) for v in batch[name]] if name in batch else [default] * n


def decode(batch: Mapping[str, Sequence]) -> list[ImageRow]:
    """A column batch (numpy or Arrow columns) → rows. Columns other stages add are ignored;
    ``key`` defaults to the content hash, ``configs`` to none, the rest to "nothing"."""
    hashes = [str(h) for h in batch["content_hash"]]
    n = len(hashes)
    keys = _strings(batch, "key", n) if "key" in batch else hashes
    labels = [int(v) for v in batch["label"]] if "label" in batch else [NO_LABEL] * n
    captions = _strings(batch, "captions", n)
    configs = _strings(batch, "configs", n)
    describe = [bool(v) for v in batch["describe"]] if "describe" in batch else [False] * n
    return [ImageRow(uri, loc, h, k, tuple(c.split(",")) if c else (), None if lab < 0 else lab,
                     tuple(json.loads(cap)) if cap else (), d)
            for uri, loc, h, k, c, lab, cap, d in zip(_strings(batch, "uri", n), _strings(batch, "loc", n), hashes,
                                                       keys, configs, labels, captions, describe)]


def passthrough(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The row columns a stage hands on unchanged to the next (everything but where the bytes are)."""
    return {c: np.asarray(batch[c]) for c in ("content_hash", "key", "label", "captions", "configs") if c in batch}

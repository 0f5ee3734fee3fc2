"""Sidecar metadata of loose image files (JSONL or CSV: image name → label and/or caption(s)),
and the label / caption values every source shape shares."""
from __future__ import annotations

import csv
import io
import json

from cdi_ray import storage
from cdi_ray.redaction import shown
from cdi_ray.sources.records import ImageEntry

_NAME_KEYS = ("file", "name", "image", "path")


def parse_captions(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(v for v in value if v.strip())
    raise ValueError(f"captions must be a string or a list of strings, got {type(value).__name__} {shown(value)}")


def parse_label(value) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"a label must be a class name or an integer index, got {type(value).__name__} {shown(value)}")
    return str(value).strip()


def read_sidecar(uri: str) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """``image name → (label, captions)`` from a JSONL or CSV sidecar.

    Each JSONL line / CSV row names an image (``file``, ``name``, ``image`` or ``path``: its path
    relative to the collection's folder, or its file name) and gives ``label`` and/or ``caption`` /
    ``captions`` (CSV: several captions separated by ``|``).

    Raises:
        ValueError: the sidecar is malformed; the message names the line and the fix.
    """
    text = storage.read_bytes(uri).decode("utf-8-sig")
    rows: list[tuple[int, dict]] = []
    if uri.lower().endswith(".csv"):
        for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
            caps = row.get("captions") or row.get("caption")
            rows.append((n, {**row, "captions": caps.split("|") if caps else None, "caption": None}))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{uri} line {n}: not valid JSON ({exc.msg}) — write one JSON object per line") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{uri} line {n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
    out: dict[str, tuple[str | None, tuple[str, ...]]] = {}
    for n, row in rows:
        name = next((row[k] for k in _NAME_KEYS if row.get(k)), None)
        if not isinstance(name, str):
            raise ValueError(f"{uri} line {n}: no image name — give it as one of {', '.join(_NAME_KEYS)}")
        try:
            caps = parse_captions(row.get("captions")) or parse_captions(row.get("caption"))
            out[name.strip().lstrip("./")] = (parse_label(row.get("label")), caps)
        except ValueError as exc:
            raise ValueError(f"{uri} line {n}: {exc}") from None
    return out


def attach_sidecar(entries: list[storage.FileEntry], root: str | None, sidecar: str) -> list[ImageEntry]:
    """Loose files with their sidecar metadata (matched by path under ``root``, else by file name)."""
    meta = read_sidecar(sidecar)
    out = []
    for e in entries:
        rel = e.uri[len(root.rstrip("/")) + 1:] if root and e.uri.startswith(root.rstrip("/") + "/") else None
        label, caps = meta.get(rel) if rel in meta else meta.get(storage.basename(e.uri), (None, ()))
        out.append(ImageEntry(e.uri, e.size, e.version, label=label, captions=caps, error=e.error))
    return out


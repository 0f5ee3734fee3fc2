"""What an image is conditioned on, per model, and the store key that records it.

A collection names classes its own way (``"n01440764"``, ``"tabby"``, ``"3"``); a class-conditional
model wants an index in ``0 … num_classes-1`` (or its null class). :func:`resolve_labels` maps one
onto the other with, in order: the audit's ``labels.map``, the model's own class names
(``id2label``), or the label read as an integer index.

**Why conditioning is part of an image's store key.** Features are stored under
(model fingerprint, feature-config hash, image key). For an unconditional model the image key is
the content hash: labels and captions cannot change its features, so a labelled shard run reuses
what an unlabelled folder run stored. For a conditional model the same bytes under another label
(or caption) give *different* features, so the key is ``sha256(content hash, the label index or
captions actually passed to the model)`` — an audit that labels an image differently never
reuses features computed with another label, and one that labels it the same way always does,
whatever container the bytes came in. The adapter receives exactly what the key encodes (nothing
for unconditional models), so the key can never under-describe a stored row. The per-image seed
stays the content hash (:mod:`cdi_ray.seeding`): a label change changes the conditioning only,
not the noise draws.

This module imports neither Ray nor torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

#: Which images of an audit get no label, at most this many named in an error.
_EXAMPLES = 3


@dataclass(frozen=True)
class Conditioning:
    """What one image is passed to one model: a class index and/or captions, and its store key."""

    key: str
    label: int | None = None
    captions: tuple[str, ...] = ()


def image_key(content_hash: str, kind: str, label: int | None = None, captions: tuple[str, ...] = ()) -> str:
    """The store key of an image under a model of conditioning ``kind`` (see the module docstring)."""
    if kind == "class":
        payload = {"content": content_hash, "label": label}
    elif kind == "text":
        payload = {"content": content_hash, "captions": list(captions)}
    else:
        return content_hash
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_label_map(value, *, read_bytes=None) -> dict[str, int]:
    """A label map given inline (``{name: index}``) or as the URI of a JSON object / two-column CSV."""
    if value is None:
        return {}
    if isinstance(value, dict):
        raw = value
    else:
        if read_bytes is None:
            from cdi_ray.storage import read_bytes
        text = read_bytes(value).decode("utf-8-sig")
        if value.lower().endswith(".csv"):
            rows = [ln.split(",") for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
            if rows and not rows[0][-1].strip().lstrip("-").isdigit():
                rows = rows[1:]  # a header row
            raw = {r[0].strip(): r[-1].strip() for r in rows}
        else:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError(f"label map {value}: expected a JSON object {{name: index}}")
    out = {}
    for k, v in raw.items():
        try:
            out[str(k)] = int(v)
        except (TypeError, ValueError):
            raise ValueError(f"label map: the index of {k!r} is {v!r}, not an integer") from None
    return out


@dataclass
class LabelReport:
    """How an audit's images were conditioned (goes into the report's provenance)."""

    kind: str
    missing_policy: str = "error"
    labelled: int = 0
    null_class_used: int = 0
    captioned: int = 0
    uncaptioned: int = 0
    label_source: str | None = None
    null_class: int | None = None
    examples: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"kind": self.kind}
        if self.kind == "class":
            d.update(missing=self.missing_policy, labelled=self.labelled, null_class_used=self.null_class_used,
                     null_class=self.null_class, label_map=self.label_source)
        elif self.kind == "text":
            d.update(captioned=self.captioned, uncaptioned=self.uncaptioned)
        return d


@dataclass
class LabelProblems:
    """Images a class-conditional model cannot be given as labelled (each list keeps its first examples)."""

    unlabelled: list[str] = field(default_factory=list)
    unknown: list[tuple[str, str]] = field(default_factory=list)
    outside: list[tuple[str, str, int]] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: {"unlabelled": 0, "unknown": 0, "outside": 0})
    no_null_class: bool = False
    num_classes: int = 0

    def add(self, other: "LabelProblems") -> "LabelProblems":
        for name in ("unlabelled", "unknown", "outside"):
            getattr(self, name).extend(getattr(other, name)[:_EXAMPLES - len(getattr(self, name))])
            self.counts[name] += other.counts[name]
        self.no_null_class |= other.no_null_class
        self.num_classes = self.num_classes or other.num_classes
        return self

    def message(self) -> str | None:
        """One message naming the images and the fix; None when there is no problem."""
        if self.no_null_class:
            return ("labels.missing is 'null' but the model has no null class — give every image a label, "
                    "or load the model with options {null_class: <index>} if it was trained with one")
        problems = []
        if self.counts["unlabelled"]:
            problems.append(f"{self.counts['unlabelled']} image(s) have no class label (e.g. {', '.join(self.unlabelled)}) "
                            f"but the model is class-conditional — give labels (a .cls/.json member, a label column "
                            f"or a sidecar), or set the audit's labels: {{missing: null}} to use the null class")
        if self.counts["unknown"]:
            ex = ", ".join(f"{u} ({lab!r})" for u, lab in self.unknown)
            problems.append(f"{self.counts['unknown']} label(s) are neither in the label map nor class names of the model "
                            f"(e.g. {ex}) — add them to the audit's labels: {{map: …}}")
        if self.counts["outside"]:
            ex = ", ".join(f"{u} ({lab!r} → {i})" for u, lab, i in self.outside)
            problems.append(f"{self.counts['outside']} label(s) fall outside the model's classes [0, {self.num_classes - 1}] "
                            f"(e.g. {ex}) — fix the labels or the label map")
        return "; ".join(problems) or None


def condition_images(uris: list[str], hashes: list[str | None], labels: list[str | None],
                     captions: list[tuple[str, ...]], info: dict, *, label_map: dict[str, int], missing: str,
                     map_source: str | None = None) -> tuple[list[Conditioning | None], LabelReport, LabelProblems]:
    """What each image (columns of one collection) is passed to one model, the report, and the problems.

    Images without a hash (they could not be read) get ``None``; so do images with a label problem.
    :func:`conditioning_for` is the same for listed entries, raising on problems.
    """
    kind = info.get("conditioning_kind", "none")
    report = LabelReport(kind, missing_policy=missing, label_source=map_source, null_class=info.get("null_class"))
    problems = LabelProblems()
    out: list[Conditioning | None] = [None] * len(uris)
    if kind == "class":
        names = {str(v): int(k) for k, v in (info.get("class_names") or {}).items()}
        num, null = int(info["num_classes"]), info.get("null_class")
        problems.num_classes = num
        if missing == "null" and null is None:
            problems.no_null_class = True
            return out, report, problems
        for i, (uri, h, label) in enumerate(zip(uris, hashes, labels)):
            if h is None:
                continue
            if label is None:
                if missing != "null":
                    problems.counts["unlabelled"] += 1
                    if len(problems.unlabelled) < _EXAMPLES:
                        problems.unlabelled.append(uri)
                    continue
                index = int(null)
                report.null_class_used += 1
            else:
                index = label_map.get(label, names.get(label))
                if index is None:
                    if not label.lstrip("-").isdigit():
                        problems.counts["unknown"] += 1
                        if len(problems.unknown) < _EXAMPLES:
                            problems.unknown.append((uri, label))
                        continue
                    index = int(label)
                if not (0 <= index < num or index == null):
                    problems.counts["outside"] += 1
                    if len(problems.outside) < _EXAMPLES:
                        problems.outside.append((uri, label, index))
                    continue
                report.labelled += 1
            out[i] = Conditioning(image_key(h, kind, label=index), label=index)
        return out, report, problems
    for i, (h, caps) in enumerate(zip(hashes, captions)):
        if h is None:
            continue
        if kind == "text":
            caps = tuple(caps)
            report.captioned += bool(caps)
            report.uncaptioned += not caps
            out[i] = Conditioning(image_key(h, kind, captions=caps), captions=caps)
        else:
            out[i] = Conditioning(h)
    return out, report, problems


def merge_reports(a: LabelReport, b: LabelReport) -> LabelReport:
    """The report of two collections conditioned the same way (an audit's P and U)."""
    return LabelReport(a.kind, a.missing_policy, a.labelled + b.labelled, a.null_class_used + b.null_class_used,
                       a.captioned + b.captioned, a.uncaptioned + b.uncaptioned, a.label_source, a.null_class)


def conditioning_for(entries, hashes: dict[str, str], info: dict, *, label_map: dict[str, int],
                     missing: str, map_source: str | None = None) -> tuple[dict[str, Conditioning], LabelReport]:
    """``uri → Conditioning`` of an audit's hashed images under one model, and the report of it.

    Args:
        entries: the audit's :class:`cdi_ray.sources.ImageEntry` (anything with ``uri``, ``label``, ``captions``).
        hashes: ``uri → content hash`` (images not in it could not be read and get nothing).
        info: the model's description (``conditioning_kind``, ``num_classes``, ``null_class``, ``class_names``).
        label_map: collection label → model class index (may be empty).
        missing: ``"error"`` or ``"null"`` — what an image without a label gets.

    Raises:
        ValueError: a class-conditional model and images without a usable label (unless
            ``missing="null"`` and the model has a null class), or labels outside the model's range;
            the message names the images and the fix.
    """
    entries = list(entries)
    uris = [e.uri for e in entries]
    conds, report, problems = condition_images(uris, [hashes.get(u) for u in uris], [e.label for e in entries],
                                               [tuple(e.captions) for e in entries], info, label_map=label_map,
                                               missing=missing, map_source=map_source)
    message = problems.message()
    if message:
        raise ValueError(message)
    return {u: c for u, c in zip(uris, conds) if c is not None}, report

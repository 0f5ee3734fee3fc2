"""Request intake: a requests file and a model registry → typed requests and named rejections.

A **requests file** (CSV, JSONL or Parquet) has one row per dataset owner's request:

=============  ========  ===================================================================
column         required  what
=============  ========  ===================================================================
request_id     yes       unique, path-safe id (letters, digits, ``.``, ``_``, ``-``; no ``__``)
owner          yes       who asks (a name or an account id; shown on their report)
contact        no        how to reach them (kept in the operator's ledger and their folder)
published      yes       a folder, an ``s3://`` prefix, a list file, or shards — any manifest
                         source; in a CSV cell a JSON object such as
                         ``{"webdataset": "s3://…/*.tar"}`` or ``{"list_file": "…"}``
unpublished    yes       the same, for the held-out collection
metadata       no        a labels/captions sidecar (JSONL / CSV) for both collections
models         no        space-separated registry names; default: every registry model
=============  ========  ===================================================================

A **model registry** is a YAML file with the manifest's ``models:`` mapping and, optionally,
``defaults:`` — audit options applied to every request's audits (``preset``, ``features``,
``overrides``, ``test``, ``controls``, ``labels``, ``seed``, ``calibration``). ``defaults.test.alpha``
is the level of each owner's family of tests (docs/VERDICTS.md, "Bulk requests").

A bad row never stops the others: it becomes a :class:`Rejection` with one of
:data:`REASONS` and a sentence naming the fix. A file that cannot be read at all (or has unknown
columns), or a registry that is invalid, raises :class:`IntakeError` — nothing can run.

Ray-free: reading, validation with :func:`cdi_ray.spec.parse_manifest`, and a cheap existence
probe of each source (first image found, list file present, shard pattern matched).
"""
from __future__ import annotations

import csv
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdi_ray import storage

COLUMNS = ("request_id", "owner", "contact", "published", "unpublished", "metadata", "models")
REQUIRED = ("request_id", "owner", "published", "unpublished")
#: Why a row was rejected (the ``reason`` column of ``rejected.csv``).
REASONS = ("missing_field", "invalid_id", "duplicate_id", "invalid_source", "unreadable_source", "unknown_model",
           "invalid_row")
#: Request ids become folder names and the prefix of audit ids ``<request_id>__<model>``.
REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SEPARATOR = "__"
#: Longest registry model name: an audit id ``<request_id>__<model>`` must stay ≤ 128 characters.
MAX_MODEL_NAME = 128 - 64 - len(SEPARATOR)
#: Audit options a registry's ``defaults:`` may set (everything but what each request gives).
DEFAULT_KEYS = ("preset", "features", "overrides", "test", "controls", "labels", "seed", "calibration")
#: Source probes in flight (S3 calls are latency-bound).
PROBE_THREADS = 16


class IntakeError(ValueError):
    """A requests file or registry that cannot be used at all; the message names it and the fix."""


@dataclass(frozen=True)
class Request:
    """One accepted row: an owner's published and unpublished collections and the models to audit.

    ``published`` / ``unpublished`` are manifest sources as plain data (a string, a list or a
    mapping), with ``metadata`` already attached where given; relative paths are resolved.
    """

    row: int
    request_id: str
    owner: str
    contact: str | None
    published: Any
    unpublished: Any
    models: tuple[str, ...]
    metadata: str | None = None

    def as_row(self) -> dict:
        """The request as a requests-file row (JSONL), for the owner's own reproducible copy."""
        return {"request_id": self.request_id, "owner": self.owner, "contact": self.contact,
                "published": self.published, "unpublished": self.unpublished, "models": " ".join(self.models)}


@dataclass(frozen=True)
class Rejection:
    """A row that cannot run, with a reason from :data:`REASONS` and what to fix."""

    row: int
    request_id: str | None
    owner: str | None
    reason: str
    detail: str

    def __post_init__(self):
        if self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}; use one of {REASONS}")


@dataclass(frozen=True)
class Registry:
    """The models requests may name, and the audit options every request's audits get."""

    uri: str
    models: dict[str, dict]  #: name → validated model spec (JSON form, paths resolved)
    defaults: dict = field(default_factory=dict)

    @property
    def alpha(self) -> float:
        """Level of each owner's family of tests (``defaults.test.alpha``, default 0.01)."""
        return float((self.defaults.get("test") or {}).get("alpha", 0.01))

    @property
    def reference_model(self) -> str | None:
        """The reference-model control's model (``defaults.controls.reference_model``): a model that
        cannot have seen any owner's images, run alongside every audit — never audited itself."""
        return (self.defaults.get("controls") or {}).get("reference_model")

    @property
    def audited(self) -> tuple[str, ...]:
        """The models a request may name (every registry model but the reference)."""
        return tuple(m for m in self.models if m != self.reference_model)

    def models_for(self, names) -> dict[str, dict]:
        """The manifest's ``models:`` for audits of ``names``: those, and the reference model."""
        ref = self.reference_model
        return {m: self.models[m] for m in dict.fromkeys([*names, *([ref] if ref else [])])}


@dataclass(frozen=True)
class Intake:
    """Accepted requests (in file order) and rejected rows."""

    accepted: list[Request]
    rejected: list[Rejection]


# ----------------------------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------------------------
def load_registry(uri: str, *, output: str) -> Registry:
    """Read and validate a model registry (YAML, local or ``s3://``).

    Every model is checked with the ``defaults`` it will run under (a gray-box model with a
    white-box preset is refused here, not once per request).

    Raises:
        IntakeError: unreadable, not a mapping, unknown keys, or an invalid model / default.
    """
    from cdi_ray.spec import ManifestError, parse_manifest

    data = _read_yaml(uri, "registry")
    if not isinstance(data, dict) or "models" not in data:
        raise IntakeError(f"registry {uri}: expected a mapping with `models:` (as in a manifest) and optional "
                          f"`defaults:`")
    unknown = sorted(set(data) - {"models", "defaults"})
    if unknown:
        raise IntakeError(f"registry {uri}: unknown key(s) {unknown} — allowed: models, defaults")
    models, defaults = data["models"], data.get("defaults") or {}
    if not isinstance(models, dict) or not models:
        raise IntakeError(f"registry {uri}: `models:` must map at least one name to a model ({{uri: …}})")
    if not isinstance(defaults, dict):
        raise IntakeError(f"registry {uri}: `defaults:` must be a mapping of audit options")
    bad = sorted(set(defaults) - set(DEFAULT_KEYS))
    if bad:
        raise IntakeError(f"registry {uri}: defaults has key(s) {bad} a registry cannot set — allowed: "
                          f"{', '.join(DEFAULT_KEYS)}")
    long = sorted(str(n) for n in models if len(str(n)) > MAX_MODEL_NAME or SEPARATOR in str(n))
    if long:
        raise IntakeError(f"registry {uri}: model name(s) {long} are longer than {MAX_MODEL_NAME} characters or "
                          f"contain {SEPARATOR!r} — shorten them")
    controls = defaults.get("controls")
    reference = controls.get("reference_model") if isinstance(controls, dict) else None
    audited = [name for name in models if name != reference]
    if not audited:
        raise IntakeError(f"registry {uri}: its only model {reference!r} is the reference model "
                          f"(defaults.controls.reference_model) — add the models to audit")
    probe = {"models": models, "output": output,
             "audits": [{"id": f"registry-check-{i}", "model": name, "published": "p", "unpublished": "u", **defaults}
                        for i, name in enumerate(audited)]}
    base = None if storage.is_remote(uri) else str(Path(storage.local_path(uri)).parent)
    try:
        manifest = parse_manifest(probe, base_dir=base, source=uri)
    except ManifestError as exc:
        problems = [re.sub(r"^audits\[(\d+)\]", lambda m: f"defaults (with model {audited[int(m.group(1))]!r})", p)
                    for p in exc.problems]
        raise IntakeError(f"invalid registry {uri}:\n" + "\n".join(f"  - {p}" for p in problems)) from None
    return Registry(uri=uri, models={n: m.model_dump(mode="json") for n, m in manifest.models.items()},
                    defaults=json.loads(json.dumps(defaults)))


def _read_yaml(uri: str, what: str) -> Any:
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        raise IntakeError(f"{what} {uri} does not exist — check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IntakeError(f"cannot read {what} {uri}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise IntakeError(f"{what} {uri} is not valid YAML: {exc}") from None


# ----------------------------------------------------------------------------------------------
# the requests file
# ----------------------------------------------------------------------------------------------
def read_rows(uri: str) -> list[tuple[int, dict | str]]:
    """``(row number, cells)`` of a requests file; a JSONL line that is not an object is kept as its
    error text (the row is rejected, the others read on). Row numbers count data rows from 1.

    Raises:
        IntakeError: missing or unreadable file, unknown format, unknown or missing columns.
    """
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        raise IntakeError(f"requests file {uri} does not exist — check the path") from None
    except OSError as exc:
        raise IntakeError(f"cannot read requests file {uri}: {exc}") from None
    name = uri.lower()
    if name.endswith(".csv"):
        text = _text(raw, uri)
        reader = csv.DictReader(io.StringIO(text))
        _check_columns(reader.fieldnames or [], uri)
        rows: list[tuple[int, dict | str]] = [(i, dict(r)) for i, r in enumerate(reader, start=1)]
    elif name.endswith((".jsonl", ".ndjson")):
        rows, seen = [], set()
        for i, line in enumerate((ln for ln in _text(raw, uri).splitlines() if ln.strip()), start=1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                rows.append((i, f"not valid JSON ({exc.msg}) — write one JSON object per line"))
                continue
            if not isinstance(obj, dict):
                rows.append((i, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            seen |= set(obj)
            rows.append((i, obj))
        _check_columns(sorted(seen), uri, require=False)
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(raw))
        except (pa.ArrowException, OSError) as exc:
            raise IntakeError(f"requests file {uri} is not a readable Parquet file: {exc}") from None
        _check_columns(table.column_names, uri)
        rows = [(i, r) for i, r in enumerate(table.to_pylist(), start=1)]
    else:
        raise IntakeError(f"requests file {uri}: unknown format — name it .csv, .jsonl (or .ndjson) or .parquet")
    return rows


def _text(raw: bytes, uri: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IntakeError(f"requests file {uri} is not UTF-8 text — save it as UTF-8") from None


def _check_columns(names, uri: str, *, require: bool = True) -> None:
    unknown = sorted(set(names) - set(COLUMNS))
    if unknown:
        raise IntakeError(f"requests file {uri}: unknown column(s) {unknown} — the columns are {', '.join(COLUMNS)}")
    missing = [c for c in REQUIRED if c not in names]
    if require and missing:
        raise IntakeError(f"requests file {uri}: missing column(s) {missing} — every requests file has "
                          f"{', '.join(REQUIRED)}")


def _cell(value: Any) -> Any:
    """A cell as data: empty → None; a string holding a JSON object or list → that object; a
    Parquet struct → its non-null fields."""
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN from a numeric-typed empty cell
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        if value[0] in "{[":
            return json.loads(value)
        return value
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value


def parse_row(row: int, cells: dict, registry: Registry) -> Request | Rejection:
    """One row → a :class:`Request`, or a :class:`Rejection` naming what is wrong (no I/O)."""
    rid = cells.get("request_id")
    rid = str(rid).strip() if rid is not None and str(rid).strip() else None
    owner = cells.get("owner")
    owner = str(owner).strip() if owner is not None and str(owner).strip() else None

    def reject(reason, detail):
        return Rejection(row, rid, owner, reason, detail)

    values: dict[str, Any] = {}
    for col in ("published", "unpublished", "metadata", "models", "contact"):
        try:
            values[col] = _cell(cells.get(col))
        except json.JSONDecodeError as exc:
            return reject("invalid_source" if col != "models" else "invalid_row",
                          f"{col}: the cell starts like JSON but is not valid JSON ({exc.msg}) — write a JSON object "
                          f"such as {{\"webdataset\": \"s3://…/*.tar\"}}, or a plain folder / prefix")
    missing = [c for c, v in (("request_id", rid), ("owner", owner), ("published", values["published"]),
                              ("unpublished", values["unpublished"])) if v is None]
    if missing:
        return reject("missing_field", f"empty {', '.join(missing)} — every request needs request_id, owner, "
                                       f"published and unpublished")
    if not REQUEST_ID.match(rid) or SEPARATOR in rid:
        return reject("invalid_id", f"request_id {rid!r} is not a valid id — use at most 64 letters, digits, '.', '_' "
                                    f"or '-', starting with a letter or digit, without {SEPARATOR!r}")
    models = values["models"]
    if models is None:
        names = registry.audited
    elif isinstance(models, str):
        names = tuple(dict.fromkeys(models.replace(",", " ").split()))
    elif isinstance(models, list) and all(isinstance(m, str) for m in models):
        names = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    else:
        return reject("invalid_row", f"models: {models!r} is not a list of model names — write them space-separated")
    if registry.reference_model in names:
        return reject("unknown_model", f"{registry.reference_model!r} is the registry's reference model "
                                       f"(defaults.controls.reference_model): it is the control every audit runs "
                                       f"against, not a model to audit — drop it from models")
    unknown = [m for m in names if m not in registry.models]
    if unknown:
        return reject("unknown_model", f"unknown model(s) {unknown} — use names from the registry "
                                       f"({', '.join(sorted(registry.audited))}), or leave models empty for all of them")
    if not names:
        return reject("invalid_row", "models names no model — leave it empty for every registry model")
    metadata = values["metadata"]
    if metadata is not None and not isinstance(metadata, str):
        return reject("invalid_source", f"metadata: expected the URI of a JSONL / CSV sidecar, got {metadata!r}")
    sources = {}
    for side in ("published", "unpublished"):
        try:
            sources[side] = with_metadata(values[side], metadata)
        except ValueError as exc:
            return reject("invalid_source", f"{side}: {exc}")
    contact = values["contact"]
    return Request(row, rid, owner, None if contact is None else str(contact), sources["published"],
                   sources["unpublished"], names, metadata)


def with_metadata(source: Any, metadata: str | None) -> Any:
    """``source`` with the request's sidecar attached (folders and list files only)."""
    if metadata is None:
        return source
    if isinstance(source, str):
        if source.rstrip("}").lower().endswith((".tar", ".parquet")):
            raise ValueError("shard sources carry their own labels and captions; drop the metadata column for them")
        return {"folder": source, "metadata": metadata}
    if isinstance(source, dict) and ("folder" in source or "list_file" in source):
        if source.get("metadata"):
            raise ValueError("metadata is given both in the source and in the metadata column — keep one")
        return {**source, "metadata": metadata}
    raise ValueError("a metadata sidecar needs a folder / prefix or a list file source (shards carry their own; "
                     "for a list of URIs use {\"list_file\": …})")


# ----------------------------------------------------------------------------------------------
# validation against the manifest schema (the existence probe: cdi_ray.requests.probe)
# ----------------------------------------------------------------------------------------------
def validate(request: Request, registry: Registry, *, output: str, base_dir: str | None) -> Request | Rejection:
    """Check the request's sources (and its audits' options) exactly as a manifest would, and
    resolve relative paths against ``base_dir`` (the requests file's folder)."""
    from cdi_ray.spec import ManifestError, parse_manifest

    data = {"models": registry.models_for(request.models), "output": output,
            "audits": [{"id": f"check-{i}", "model": m, "published": request.published,
                        "unpublished": request.unpublished, **registry.defaults}
                       for i, m in enumerate(request.models)]}
    try:
        manifest = parse_manifest(data, base_dir=base_dir)
    except ManifestError as exc:
        problems = [re.sub(r"^audits\[\d+\]\.", "", p) for p in dict.fromkeys(exc.problems)]
        source = any(p.startswith(("published", "unpublished")) for p in problems)
        return Rejection(request.row, request.request_id, request.owner, "invalid_source" if source else "invalid_row",
                         "; ".join(dict.fromkeys(problems)))
    a = manifest.audits[0]
    dump = lambda s: s if isinstance(s, (str, list)) else s.model_dump(mode="json", exclude_none=True)  # noqa: E731
    return Request(request.row, request.request_id, request.owner, request.contact, dump(a.published),
                   dump(a.unpublished), request.models, request.metadata)


def read_requests(uri: str, registry: Registry, *, output: str, probe: bool = True) -> Intake:
    """Read, validate and probe every row of a requests file (relative paths: the file's folder).

    Raises:
        IntakeError: the file itself cannot be used (see :func:`read_rows`).
    """
    base = None if storage.is_remote(uri) else str(Path(storage.local_path(uri)).parent)
    accepted: list[Request] = []
    rejected: list[Rejection] = []
    first: dict[str, int] = {}
    for row, cells in read_rows(uri):
        parsed = parse_row(row, cells, registry) if isinstance(cells, dict) else \
            Rejection(row, None, None, "invalid_row", cells)
        if isinstance(parsed, Request):
            if parsed.request_id in first:
                parsed = Rejection(row, parsed.request_id, parsed.owner, "duplicate_id",
                                   f"request_id {parsed.request_id!r} is already used by row {first[parsed.request_id]} "
                                   f"— give every request its own id")
            else:
                first[parsed.request_id] = row
                parsed = validate(parsed, registry, output=output, base_dir=base)
        (accepted if isinstance(parsed, Request) else rejected).append(parsed)
    if probe and accepted:
        from cdi_ray.requests.probe import probe_source

        def one(r: Request):
            for side, source in (("published", r.published), ("unpublished", r.unpublished)):
                why = probe_source(source)
                if why:
                    return Rejection(r.row, r.request_id, r.owner, "unreadable_source", f"{side}: {why}")
            return r

        with ThreadPoolExecutor(min(PROBE_THREADS, len(accepted))) as pool:
            checked = list(pool.map(one, accepted))
        accepted = [r for r in checked if isinstance(r, Request)]
        rejected += [r for r in checked if isinstance(r, Rejection)]
    rejected.sort(key=lambda r: r.row)
    return Intake(accepted, rejected)

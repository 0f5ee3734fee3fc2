"""Readable manifest errors: pydantic's validation errors → one ``"field.path: what — fix"`` line each."""
from __future__ import annotations

from pydantic import BaseModel, ValidationError

from cdi_ray.redaction import ECHO_LIMIT, redact, shorten, shown
from cdi_ray.spec.schema import AuditSpec, ControlsSpec, FdrSpec, LabelsSpec, Manifest, ModelSpec, TestSpec

class ManifestError(ValueError):
    """A manifest that cannot be used; ``problems`` holds one ``"field.path: what — fix"`` per issue."""

    def __init__(self, problems: list[str], source: str | None = None):
        # redacted and bounded: a message never carries a secret, nor a value expanded to megabytes
        self.problems = [redact(shorten(p, 4 * ECHO_LIMIT)) for p in problems]
        self.source = source
        head = f"invalid manifest {source}" if source else "invalid manifest"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))



def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(manifest)"


_SOURCE_HINT = ("give a folder/prefix string, a list of image URIs, {list_file: URI}, {folder: URI, metadata: URI}, "
                "{webdataset: PATTERN} or {parquet: PATTERN, image_column: …}")


def _allowed_keys(model: type[BaseModel] | None) -> str:
    return ", ".join(model.model_fields) if model else ""


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (for 'allowed keys' hints)."""
    cur: type[BaseModel] | None = Manifest
    parts = list(loc[:-1])
    i = 0
    while i < len(parts) and cur is not None:
        p = parts[i]
        if cur is Manifest and p == "models":
            cur, i = ModelSpec, i + 2  # models.<name>
            continue
        if cur is Manifest and p == "audits":
            cur, i = AuditSpec, i + 2  # audits[i]
            continue
        if cur is Manifest and p == "fdr":
            cur = FdrSpec
        elif cur is AuditSpec and p == "test":
            cur = TestSpec
        elif cur is AuditSpec and p == "labels":
            cur = LabelsSpec
        elif p == "controls" and cur in (Manifest, AuditSpec):
            cur = ControlsSpec
        else:
            return None
        i += 1
    return cur


def _describe(err: dict) -> str:
    loc = tuple(err.get("loc", ()))
    where = _loc(loc)
    kind = err.get("type", "")
    msg = err.get("msg", "")
    value = err.get("input")
    if kind == "extra_forbidden":
        owner = _model_at(loc)
        allowed = _allowed_keys(owner)
        hint = f"; allowed keys here: {allowed}" if allowed else ""
        return f"{where}: unknown key {shown(loc[-1])} — remove it or fix its spelling{hint}"
    if kind == "missing":
        return f"{where}: required field is missing — add `{loc[-1]}:`"
    if kind == "literal_error":
        expected = (err.get("ctx") or {}).get("expected", "")
        return f"{where}: {shown(value)} is not allowed — use one of {expected}"
    if kind == "string_pattern_mismatch":
        return f"{where}: {shown(value)} is not a valid name — use letters, digits, '.', '_' or '-' (start with a letter or digit)"
    if kind == "value_error":
        text = msg.removeprefix("Value error, ")
        if where == "(manifest)":
            return text  # cross-reference checks already name their fields
        return f"{where}: {text}"
    if kind in ("int_parsing", "int_type", "float_parsing", "float_type", "int_from_float", "bool_parsing", "bool_type"):
        return f"{where}: {msg.lower()} (got {shown(value)}) — fix the value's type"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{where}: {msg.lower()} (got {shown(value)})"
    return f"{where}: {msg} (got {shown(value)})"


def _problems(exc: ValidationError) -> list[str]:
    """One line per problem; a source (a union) that fails every branch is reported once."""
    out: list[str] = []
    sources: dict[tuple, list[dict]] = {}
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        if len(loc) >= 3 and loc[0] == "audits" and loc[2] in ("published", "unpublished"):
            sources.setdefault(loc[:3], []).append(err)
            continue
        for line in _describe(err).split("\n"):
            if line not in out:
                out.append(line)
    for key, errs in sources.items():
        where, value = _loc(key), errs[0].get("input")
        mine = [e for e in errs if e.get("type") == "value_error"]
        if mine:
            line = f"{where}: {mine[0]['msg'].removeprefix('Value error, ')}"
        elif isinstance(value, dict):
            line = (f"{where}: not a valid source mapping (got keys {sorted(value)}) — use one of {{list_file, metadata}}, "
                    f"{{folder, metadata}}, {{webdataset}}, {{parquet, image_column, label_column, caption_column, id_column}}")
        else:
            line = f"{where}: not a valid image source (got {shown(value)}) — {_SOURCE_HINT}"
        out.append(line)
    return out



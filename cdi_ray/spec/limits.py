"""What a manifest may hold beyond its types: values the writers can store, no secrets, bounded size.

The results are written after every feature has been computed, so a value that cannot be written
would lose the whole batch at its last step. Validation therefore walks the *validated* manifest
(coerced values, free-form ``options`` and ``overrides`` included) and refuses, naming the field:

* an integer outside the signed 64-bit range (``results.parquet``'s ``seed`` and count columns
  are int64; Arrow and most readers cannot hold more);
* a float that is NaN or infinite (``results.json`` is strict JSON: ``allow_nan=False``);
* a string that is not valid Unicode (a lone surrogate: Parquet and JSON files hold UTF-8);
* any string that carries credentials — a URL with user-info or a signed query
  (:func:`cdi_ray.redaction.carries_credentials`): options are copied into every report's
  provenance, so a secret there would leak.

The YAML side (no aliases, bounded nesting and size) is in :mod:`cdi_ray.spec.loading`.
This module imports no Ray.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterator

from cdi_ray.redaction import carries_credentials

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_NO_CREDENTIALS = ("credentials come only from the environment or the instance role (AWS_ACCESS_KEY_ID, "
                   "AWS_SECRET_ACCESS_KEY, AWS_PROFILE …), never from a manifest: remove them")


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{k}" if path else str(k), k  # keys are values too (they can be echoed)
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def value_problems(data: dict) -> list[str]:
    """One ``"field.path: what — fix"`` line per value the writers could not store or must not see."""
    problems: list[str] = []
    for path, value in _walk(data, ""):
        where = path or "(manifest)"
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
            problems.append(f"{where}: {len(str(abs(value)))}-digit integer does not fit a 64-bit integer, which the "
                            f"results files store — use a value between {INT64_MIN} and {INT64_MAX}")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}: {value} is not a finite number, which results.json cannot hold — give a "
                            "finite value")
        elif isinstance(value, str) and not _is_utf8(value):
            problems.append(f"{where}: not valid Unicode text (it holds a lone surrogate, e.g. from an undecodable "
                            "file name) — the results files store UTF-8; fix or rename it")
        elif isinstance(value, str) and carries_credentials(value):
            problems.append(f"{where}: a URL that carries credentials (user-info or a signed query) — "
                            f"{_NO_CREDENTIALS}")
    return list(dict.fromkeys(problems))


#: Key names of free-form option maps that would smuggle a credential into results and reports.
_CREDENTIAL_KEY = re.compile(r"^aws_|secret|password|passwd|credential|api_key|access_key|private_key|session_token|"
                             r"auth_token|^token$", re.I)


def check_no_credential_keys(options: dict, field: str) -> dict:
    """Free-form options are copied into every report's provenance, so a secret there would leak."""
    found = sorted(k for k in _walk_keys(options) if _CREDENTIAL_KEY.search(k))
    if found:
        raise ValueError(f"{field} has credential-like key(s) {found} — {_NO_CREDENTIALS}")
    return options


def _walk_keys(value: Any):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _walk_keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_keys(v)

"""Values as a report shows them: escaped text, numbers, p-values, sort keys, the verdict sentence.

Everything that reaches a page from the results (audit ids, model names, URIs, reasons, manifest
values — user input) goes through :func:`e`, so the page modules never escape by hand.
"""
from __future__ import annotations

import html
import math
from typing import Any

#: Colours of the verdicts (badges on the index, the verdict box on an audit page).
VERDICT_COLOURS = {"used": "#b00020", "not_detected": "#1b5e20", "inconclusive": "#8a6d00"}


def e(value: Any) -> str:
    """HTML-escaped text of ``value`` (``None`` → an em dash)."""
    return "—" if value is None else html.escape(str(value), quote=True)


def as_finite(x: Any) -> float | None:
    """``x`` as a float if it is a finite number, else ``None``."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def fmt_p(p: Any) -> str:
    """A p-value for people: 4 significant digits, scientific below 0.001, ``—`` if absent."""
    p = as_finite(p)
    if p is None:
        return "—"
    if p == 0:
        return "0"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4g}"


def fmt_num(x: Any, digits: int = 3) -> str:
    x = as_finite(x)
    return "—" if x is None else f"{x:.{digits}f}"


def sort_key(x: Any) -> str:
    """``data-sort`` value: a number where there is one, else the text (absent sorts last)."""
    if isinstance(x, bool):
        return "1" if x else "0"
    f = as_finite(x)
    if f is not None:
        return repr(f)
    return "" if x is None else e(x)


FDR_NAMES = {"bh": "Benjamini–Hochberg", "by": "Benjamini–Yekutieli", "bonferroni": "Bonferroni"}



def verdict_sentence(audit: dict) -> str:
    """The verdict in one plain sentence (HTML-escaped): "Evidence that model M was trained on …: strong / none / inconclusive"."""
    model, aid = e(audit.get("model")), e(audit.get("audit_id"))
    what = f"Evidence that model “{model}” was trained on the published collection of audit “{aid}”"
    label = audit.get("verdict")
    if label == "used":
        return f"{what}: <strong>strong</strong>. The model treats these images measurably like its training data."
    if label == "not_detected":
        return (f"{what}: <strong>none</strong> at the chosen level. This does not show that the model was not "
                f"trained on them; the test did not find evidence.")
    if audit.get("status") == "failed":
        return f"{what}: <strong>inconclusive</strong>, because the audit could not be run."
    return f"{what}: <strong>inconclusive</strong>, because of the reason below."

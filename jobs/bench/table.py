"""The benchmark's output: one :class:`Row` per figure, printed as a Markdown table."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    """One line of the table; ``ok`` is None where the figure has no target."""

    section: str
    measure: str
    value: str
    target: str = ""
    ok: bool | None = None


def format_table(rows: list[Row]) -> str:
    """The table as Markdown (pasted into docs/PERFORMANCE.md as is)."""
    lines = ["| section | measure | value | target | ok |", "|---|---|---|---|---|"]
    for r in rows:
        ok = "" if r.ok is None else "yes" if r.ok else "**NO**"
        lines.append(f"| {r.section} | {r.measure} | {r.value} | {r.target} | {ok} |")
    return "\n".join(lines)

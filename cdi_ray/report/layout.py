"""The frame both pages share: the HTML document with its inline CSS and JavaScript, and the
small building blocks (key-value table, JSON block) used on both.

The CSS and the table-sorting script are package data (``static/``), read once and inlined, so a
page fetches nothing and opens the same offline.
"""
from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

from cdi_ray.report.formatting import e


@cache
def static_text(name: str) -> str:
    """The text of ``cdi_ray/report/static/<name>`` (shipped as package data)."""
    return files("cdi_ray.report").joinpath("static", name).read_text(encoding="utf-8")


def html_page(title: str, body: list[str], *, script: bool = False, wide: bool = False) -> str:
    """A whole self-contained document: ``body`` in ``<main>``, the CSS inline, the sorting script if ``script``."""
    css = static_text("report.css")
    js = f"<script>\n{static_text('sort.js')}</script>" if script else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<meta name=\"generator\" content=\"cdi-ray\"><title>{e(title)}</title><style>\n{css}</style></head>"
            f"<body><main{' class=wide' if wide else ''}>{''.join(body)}</main>{js}</body></html>\n")


def kv_table(rows: list[tuple[str, str]], cls: str = "kv") -> str:
    """A two-column table of (label, HTML value) rows; the values are already escaped."""
    return f'<table class="{cls}">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def json_block(obj: Any) -> str:
    """``obj`` as indented, sorted, escaped JSON (provenance a reader can copy)."""
    return f"<pre>{e(json.dumps(obj, indent=2, sort_keys=True, default=str))}</pre>"


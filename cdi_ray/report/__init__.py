"""HTML reports: one self-contained page per audit and a batch index (docs/REPORTS.md).

Ray-free and dependency-free (standard library only): the pages carry their CSS inline, their
plots as inline SVG, and a few lines of inline JavaScript to sort the index table — nothing is
fetched from the network, so a report opens the same offline, in an archive or as an exhibit.
Every string from the results (audit ids, model names, URIs, reasons, manifest values — user
input) goes through :func:`html.escape`.

Entry points:

    render_audit_html(audit_json) -> str      # audits/<audit_id>.json → audits/<audit_id>.html
    render_index_html(results_json, diff=None) -> str   # results.json (+ diff.json) → index.html

One module a job:

* :mod:`~cdi_ray.report.formatting` — escaping, numbers, p-values, the verdict sentence;
* :mod:`~cdi_ray.report.plots` — the SVG plots;
* :mod:`~cdi_ray.report.layout` — the document frame, with ``static/report.css`` and
  ``static/sort.js`` (package data) inlined;
* :mod:`~cdi_ray.report.audit_page` and :mod:`~cdi_ray.report.index_page` — the two pages.
"""
from __future__ import annotations

from cdi_ray.report.audit_page import render_audit_html
from cdi_ray.report.formatting import fmt_p, verdict_sentence
from cdi_ray.report.index_page import render_index_html

__all__ = ["render_audit_html", "render_index_html", "verdict_sentence", "fmt_p"]

"""HTML reports: one self-contained page per audit and a batch index (docs/REPORTS.md).

Ray-free and dependency-free (standard library only): the pages carry their CSS inline, their
plots as inline SVG drawn here, and a few lines of inline JavaScript to sort the index table —
nothing is fetched from the network, so a report opens the same offline, in an archive or as an
exhibit. Every string from the results (audit ids, model names, URIs, reasons, manifest values —
user input) goes through :func:`html.escape`.

Entry points:

    render_audit_html(audit_json) -> str      # audits/<audit_id>.json → audits/<audit_id>.html
    render_index_html(results_json, diff=None) -> str   # results.json (+ diff.json) → index.html

Order of an audit page, for a reader who is not a statistician: the verdict in one sentence, the
reason, then the numbers (p-values raw and adjusted, effect size, n_P / n_U, procedure, level),
the controls, the plots, the images that could not be used, and the provenance a third party
needs to re-run the audit.
"""
from __future__ import annotations

import html
import json
import math
from typing import Any

__all__ = ["render_audit_html", "render_index_html", "verdict_sentence", "fmt_p"]

#: Colours of the two collections in every plot (colour-blind safe pair) and of the verdicts.
C_PUB, C_UNPUB = "#d55e00", "#0072b2"
VERDICT_COLOURS = {"used": "#b00020", "not_detected": "#1b5e20", "inconclusive": "#8a6d00"}
#: Features drawn in the per-feature bar plots (the table under them lists all stored ones).
PLOT_FEATURES = 15
#: Unusable images listed on an audit page (the full list is in images.parquet).
MAX_UNUSABLE_ROWS = 200

CSS = """
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0;background:#f6f6f4}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.sub{color:#666;margin:0 0 18px}
.verdict{border-left:8px solid var(--c);background:color-mix(in srgb,var(--c) 8%,white);padding:14px 18px;margin:14px 0 8px}
.verdict .label{display:inline-block;background:var(--c);color:#fff;font-weight:600;border-radius:4px;padding:1px 8px;
 font-size:13px;text-transform:uppercase;letter-spacing:.03em}
.verdict p.sentence{font-size:19px;font-weight:600;margin:8px 0 6px}
.verdict p.reason{margin:0}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e4e4e4;vertical-align:top}
th{background:#f0f0ee;font-weight:600;white-space:nowrap}
table.kv th{width:34%;background:none;font-weight:500;color:#444}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;border-radius:4px;padding:0 6px;color:#fff;font-size:12px;font-weight:600;white-space:nowrap}
#audits{font-size:14px}#audits td.status{max-width:240px;overflow-wrap:anywhere}
main.wide{max-width:1280px}
.fired{color:#b00020;font-weight:600}.ok{color:#1b5e20}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:18px}
figure{margin:0;border:1px solid #e4e4e4;padding:10px;border-radius:6px}
figcaption{font-size:13px;color:#555;margin-top:6px}
svg text{font:11px system-ui,sans-serif;fill:#333}
pre{background:#f4f4f2;padding:10px;overflow:auto;font-size:12px;max-height:360px}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;word-break:break-all}
.note{color:#666;font-size:13px}
.warn{background:#fff4e5;border:1px solid #f0c36d;padding:8px 12px;border-radius:4px}
.alert{background:#fdecea;border:1px solid #e6a19a;padding:8px 12px;border-radius:4px}
#audits th{cursor:pointer;user-select:none;white-space:nowrap}
#audits th[aria-sort=ascending]::after{content:" \\25B2"}#audits th[aria-sort=descending]::after{content:" \\25BC"}
a{color:#0b57d0}
#unusable td:nth-child(2){width:45%}
@media (max-width:800px){.plots{grid-template-columns:1fr}}
"""

SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var asc=th.getAttribute('aria-sort')!=='ascending';
  t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort')});
  th.setAttribute('aria-sort',asc?'ascending':'descending');
  var rows=Array.prototype.slice.call(t.tBodies[0].rows);
  rows.sort(function(a,b){
   var x=a.cells[i].getAttribute('data-sort'),y=b.cells[i].getAttribute('data-sort');
   var nx=parseFloat(x),ny=parseFloat(y),c;
   if(!isNaN(nx)&&!isNaN(ny)){c=nx-ny}else if(isNaN(nx)!==isNaN(ny)){c=isNaN(nx)?1:-1;return c}else{c=String(x).localeCompare(String(y))}
   return asc?c:-c});
  rows.forEach(function(r){t.tBodies[0].appendChild(r)});
 })})});
// index.html#sort=3 sorts by the 4th column on load (#sort=3- descending): shareable views
var m=location.hash.match(/^#sort=(\\d+)(-?)$/),th=m&&document.querySelectorAll('table.sortable th')[+m[1]];
if(th){th.click();if(m[2])th.click()}
"""


# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------
def e(value: Any) -> str:
    """HTML-escaped text of ``value`` (``None`` → an em dash)."""
    return "—" if value is None else html.escape(str(value), quote=True)


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def fmt_p(p: Any) -> str:
    """A p-value for people: 4 significant digits, scientific below 0.001, ``—`` if absent."""
    p = _finite(p)
    if p is None:
        return "—"
    if p == 0:
        return "0"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4g}"


def fmt_num(x: Any, digits: int = 3) -> str:
    x = _finite(x)
    return "—" if x is None else f"{x:.{digits}f}"


def _sort_key(x: Any) -> str:
    """``data-sort`` value: a number where there is one, else the text (absent sorts last)."""
    if isinstance(x, bool):
        return "1" if x else "0"
    f = _finite(x)
    if f is not None:
        return repr(f)
    return "" if x is None else e(x)


FDR_NAMES = {"bh": "Benjamini–Hochberg", "by": "Benjamini–Yekutieli", "bonferroni": "Bonferroni"}


def _decision_level(audit: dict, fdr: dict | None) -> tuple[str, float | None]:
    """(text, level) of what the p-value was compared with."""
    fdr = fdr or {}
    method = fdr.get("method")
    if method and method != "none":
        q = _finite(fdr.get("q"))
        return (f"FDR-adjusted p-value ≤ q = {e(q)} ({e(FDR_NAMES.get(method, method))} over "
                f"{e(fdr.get('n_tested'))} tested audits)"), q
    a = _finite(audit.get("alpha"))
    return f"raw p-value ≤ α = {e(a)} (no multiple-testing adjustment)", a


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


# ----------------------------------------------------------------------------------------------
# SVG plots (no library: a few axes, bars and lines)
# ----------------------------------------------------------------------------------------------
W, H = 500, 300
ML, MR, MT, MB = 56, 16, 24, 46


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out, t = [], start
    while t <= hi + 1e-9 * step:
        out.append(round(t, 12))
        t += step
    return out


def _fmt_tick(t: float) -> str:
    if t == 0:
        return "0"
    a = abs(t)
    return f"{t:.0e}" if a >= 1e5 or a < 1e-3 else f"{t:.4g}"


def _svg_open(pid: str, title: str) -> list[str]:
    return [f'<svg id="{e(pid)}" class="plot" viewBox="0 0 {W} {H}" width="100%" role="img" '
            f'aria-label="{e(title)}" xmlns="http://www.w3.org/2000/svg">',
            f'<text x="{W / 2}" y="15" text-anchor="middle" style="font-weight:600">{e(title)}</text>']


def _axes(xlo, xhi, ylo, yhi, xlabel, ylabel, *, xticks=None, yticks=None, xfmt=_fmt_tick, yfmt=_fmt_tick,
          xscale=None, yscale=None) -> list[str]:
    X = xscale or (lambda v: ML + (v - xlo) / ((xhi - xlo) or 1) * (W - ML - MR))
    Y = yscale or (lambda v: H - MB - (v - ylo) / ((yhi - ylo) or 1) * (H - MT - MB))
    out = [f'<line x1="{ML}" y1="{H - MB}" x2="{W - MR}" y2="{H - MB}" stroke="#888"/>',
           f'<line x1="{ML}" y1="{MT}" x2="{ML}" y2="{H - MB}" stroke="#888"/>']
    for t in xticks if xticks is not None else _nice_ticks(xlo, xhi):
        x = X(t)
        if ML - 1 <= x <= W - MR + 1:
            out.append(f'<line x1="{x:.1f}" y1="{H - MB}" x2="{x:.1f}" y2="{H - MB + 4}" stroke="#888"/>'
                       f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle">{e(xfmt(t))}</text>')
    for t in yticks if yticks is not None else _nice_ticks(ylo, yhi):
        y = Y(t)
        if MT - 1 <= y <= H - MB + 1:
            out.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="#eee"/>'
                       f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end">{e(yfmt(t))}</text>')
    out.append(f'<text x="{(ML + W - MR) / 2}" y="{H - 8}" text-anchor="middle">{e(xlabel)}</text>')
    out.append(f'<text transform="translate(14,{(MT + H - MB) / 2}) rotate(-90)" text-anchor="middle">{e(ylabel)}</text>')
    return out


def _legend(items: list[tuple[str, str]], x: float = W - MR - 150, y: float = MT + 6) -> list[str]:
    out = []
    for i, (colour, label) in enumerate(items):
        yy = y + 16 * i
        out.append(f'<rect x="{x}" y="{yy}" width="11" height="11" fill="{colour}" fill-opacity="0.6"/>'
                   f'<text x="{x + 16}" y="{yy + 10}">{e(label)}</text>')
    return out


def _empty_plot(pid: str, title: str, why: str) -> str:
    return "".join(_svg_open(pid, title)) + (f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" fill="#777">'
                                             f'{e(why)}</text></svg>')


def plot_scores(hist: dict | None) -> str:
    """Overlaid histograms of the held-out scores of P and U (densities, shared bins)."""
    title = "Held-out scores: published (P) vs unpublished (U)"
    edges = (hist or {}).get("edges") or []
    if len(edges) < 2:
        return _empty_plot("plot-scores", title, "no scores")
    cp, cu = hist.get("published") or [], hist.get("unpublished") or []
    n_p, n_u = max(sum(cp), 1), max(sum(cu), 1)
    width = [b - a for a, b in zip(edges[:-1], edges[1:])]
    dp = [c / n_p / w if w else 0 for c, w in zip(cp, width)]
    du = [c / n_u / w if w else 0 for c, w in zip(cu, width)]
    ymax = max(dp + du + [1e-12]) * 1.08
    xlo, xhi = edges[0], edges[-1]
    X = lambda v: ML + (v - xlo) / ((xhi - xlo) or 1) * (W - ML - MR)  # noqa: E731
    Y = lambda v: H - MB - v / ymax * (H - MT - MB)  # noqa: E731
    out = _svg_open("plot-scores", title)
    out += _axes(xlo, xhi, 0, ymax, "score (higher = more like training data)", "density")
    for dens, colour, cls in ((du, C_UNPUB, "bar-u"), (dp, C_PUB, "bar-p")):
        for a, b, d in zip(edges[:-1], edges[1:], dens):
            if d > 0:
                out.append(f'<rect class="{cls}" x="{X(a):.1f}" y="{Y(d):.1f}" width="{max(X(b) - X(a) - 0.5, 0.5):.1f}" '
                           f'height="{Y(0) - Y(d):.1f}" fill="{colour}" fill-opacity="0.45"/>')
    out += _legend([(C_PUB, f"P, published (n={sum(cp)})"), (C_UNPUB, f"U, unpublished (n={sum(cu)})")])
    return "".join(out) + "</svg>"


def plot_pvalue_curve(curve: dict | None, level: float | None, level_name: str = "α") -> str:
    """p-value against n_P on nested subsets (log-log), with the decision level as a dashed line."""
    title = "p-value vs number of images (nested random subsets)"
    pts = [p for p in (curve or {}).get("points") or [] if _finite(p.get("pvalue")) is not None]
    if not pts:
        return _empty_plot("plot-pcurve", title, (curve or {}).get("skipped") or "not computed")
    ns = [max(float(p["n_published"]), 1.0) for p in pts]
    ps = [max(float(p["pvalue"]), 1e-12) for p in pts]
    lo_p = min(ps + ([level] if level else []))
    ymin = 10 ** math.floor(math.log10(lo_p) - 0.3)
    ylo, yhi = math.log10(ymin), 0.0
    xlo, xhi = math.log10(min(ns)), math.log10(max(ns))
    if xhi - xlo < 0.3:
        xlo, xhi = xlo - 0.15, xhi + 0.15
    X = lambda n: ML + (math.log10(n) - xlo) / (xhi - xlo) * (W - ML - MR)  # noqa: E731
    Y = lambda p: H - MB - (math.log10(p) - ylo) / (yhi - ylo) * (H - MT - MB)  # noqa: E731
    xt = [10 ** k * m for k in range(int(math.floor(xlo)), int(math.ceil(xhi)) + 1) for m in (1, 2, 5)
          if xlo - 1e-9 <= math.log10(10 ** k * m) <= xhi + 1e-9]
    yt = [10.0 ** k for k in range(int(ylo), 1)]
    out = _svg_open("plot-pcurve", title)
    out += _axes(10 ** xlo, 10 ** xhi, ymin, 1.0, "images in P (U subsampled in proportion)", "p-value (log scale)",
                 xticks=xt, yticks=yt, xfmt=lambda t: f"{t:g}", yfmt=lambda t: f"{t:g}",
                 xscale=X, yscale=Y)
    if level:
        y = Y(level)
        out.append(f'<line class="alpha-line" x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="#b00020" '
                   f'stroke-dasharray="6,4"/><text x="{W - MR - 4}" y="{y - 5:.1f}" text-anchor="end" '
                   f'fill="#b00020">{e(level_name)} = {e(_fmt_tick(level))}</text>')
    path = " ".join(f"{'M' if i == 0 else 'L'}{X(n):.1f},{Y(p):.1f}" for i, (n, p) in enumerate(zip(ns, ps)))
    out.append(f'<path d="{path}" fill="none" stroke="{C_PUB}" stroke-width="2"/>')
    for n, p in zip(ns, ps):
        out.append(f'<circle class="pt" cx="{X(n):.1f}" cy="{Y(p):.1f}" r="3.2" fill="{C_PUB}"><title>n_P={n:g}, '
                   f'p={e(fmt_p(p))}</title></circle>')
    return "".join(out) + "</svg>"


def _hbar(pid: str, title: str, rows: list[tuple[str, float]], *, lo: float, hi: float, centre: float,
          xlabel: str, fmt=lambda v: f"{v:.2f}") -> str:
    if not rows:
        return _empty_plot(pid, title, "no features")
    label_w = 130
    h = MT + 6 + 18 * len(rows) + 44
    X = lambda v: label_w + (v - lo) / ((hi - lo) or 1) * (W - label_w - MR - 36)  # noqa: E731
    out = [f'<svg id="{e(pid)}" class="plot" viewBox="0 0 {W} {h}" width="100%" role="img" aria-label="{e(title)}" '
           f'xmlns="http://www.w3.org/2000/svg">',
           f'<text x="{W / 2}" y="15" text-anchor="middle" style="font-weight:600">{e(title)}</text>']
    for i, (name, v) in enumerate(rows):
        y = MT + 6 + 18 * i
        x0, x1 = sorted((X(centre), X(v)))
        colour = C_PUB if v >= centre else C_UNPUB
        short = name if len(name) <= 20 else name[:19] + "…"
        out.append(f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end"><title>{e(name)}</title>{e(short)}</text>'
                   f'<rect class="hbar" x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1):.1f}" height="13" fill="{colour}" '
                   f'fill-opacity="0.7"/><text x="{max(x1, X(centre)) + 4:.1f}" y="{y + 11}">{e(fmt(v))}</text>')
    yb = MT + 6 + 18 * len(rows) + 4
    out.append(f'<line x1="{X(centre):.1f}" y1="{MT + 2}" x2="{X(centre):.1f}" y2="{yb}" stroke="#555"/>')
    for t in _nice_ticks(lo, hi, 4):
        out.append(f'<text x="{X(t):.1f}" y="{yb + 14}" text-anchor="middle">{e(_fmt_tick(t))}</text>')
    out.append(f'<text x="{(label_w + W - MR) / 2}" y="{yb + 32}" text-anchor="middle">{e(xlabel)}</text>')
    return "".join(out) + "</svg>"


def plot_contributions(features: list[dict]) -> str:
    """Signed share of the scorer's weight per feature (largest first)."""
    rows = [(str(f.get("feature")), math.copysign(_finite(f.get("share")) or 0.0, _finite(f.get("weight")) or 0.0))
            for f in features[:PLOT_FEATURES]]
    m = max([abs(v) for _, v in rows] + [1e-12])
    return _hbar("plot-weights", "Per-feature contribution (signed share of scorer weight)", rows, lo=-m, hi=m,
                 centre=0.0, xlabel="share of |weight| (right: pushes towards P)", fmt=lambda v: f"{v:+.2f}")


def plot_feature_auc(features: list[dict]) -> str:
    """Single-feature AUC (P above U), the features that separate most on their own first."""
    fs = sorted(features, key=lambda f: -abs((_finite(f.get("auc")) or 0.5) - 0.5))[:PLOT_FEATURES]
    rows = [(str(f.get("feature")), _finite(f.get("auc")) or 0.5) for f in fs]
    return _hbar("plot-auc", "Single-feature separation (AUC per feature)", rows, lo=0.0, hi=1.0, centre=0.5,
                 xlabel="AUC (0.5: no separation; right: higher in P)")


# ----------------------------------------------------------------------------------------------
# audit page
# ----------------------------------------------------------------------------------------------
def _page(title: str, body: list[str], *, script: bool = False, wide: bool = False) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<meta name=\"generator\" content=\"cdi-ray\"><title>{e(title)}</title><style>{CSS}</style></head>"
            f"<body><main{' class=wide' if wide else ''}>{''.join(body)}</main>" + (f"<script>{SORT_JS}</script>" if script else "")
            + "</body></html>\n")


def _kv(rows: list[tuple[str, str]], cls: str = "kv") -> str:
    return f'<table class="{cls}">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _json_block(obj: Any) -> str:
    return f"<pre>{e(json.dumps(obj, indent=2, sort_keys=True, default=str))}</pre>"


def _controls_table(controls: list[dict]) -> str:
    if not controls:
        return '<p class="note">No distribution-shift control was run for this audit.</p>'
    rows = []
    for c in controls:
        fired = c.get("fired")
        sep = ", ".join(f"{e(s.get('name', s.get('descriptor')))} (AUC {fmt_num(s.get('auc'), 2)})"
                        for s in (c.get("separating") or []) if isinstance(s, dict))
        rows.append(f"<tr><td>{e(c.get('name'))}</td><td class=\"{'fired' if fired else 'ok'}\">"
                    f"{'fired' if fired else 'passed'}</td><td class=\"num\">{fmt_p(c.get('pvalue'))}</td>"
                    f"<td class=\"num\">{e(c.get('alpha'))}</td><td>{e(c.get('reason'))}"
                    f"{'<br><span class=note>most separating: ' + sep + '</span>' if sep else ''}</td></tr>")
    return ("<table><thead><tr><th>control</th><th>result</th><th class=num>p-value</th><th class=num>level</th>"
            "<th>what it means</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _unusable_table(images: list[dict]) -> str:
    if not images:
        return '<p class="note">Every listed image was used.</p>'
    rows = "".join(f"<tr><td>{e(i.get('set'))}</td><td class=mono>{e(i.get('uri'))}</td><td>{e(i.get('reason'))}</td></tr>"
                   for i in images[:MAX_UNUSABLE_ROWS])
    more = (f'<p class="note">… and {len(images) - MAX_UNUSABLE_ROWS} more (all of them are in images.parquet).</p>'
            if len(images) > MAX_UNUSABLE_ROWS else "")
    return (f"<table id=\"unusable\"><thead><tr><th>set</th><th>URI</th><th>reason</th></tr></thead><tbody>{rows}"
            f"</tbody></table>{more}")


def render_audit_html(audit_json: dict) -> str:
    """One self-contained HTML page for ``audits/<audit_id>.json`` (see :func:`cdi_ray.pipeline.results.audit_document`).

    Optional parts (report payload, provenance, controls, scores) may be missing — a failed audit
    has no payload — and the page then says so instead of plotting.
    """
    a = audit_json.get("audit") or {}
    fdr = audit_json.get("fdr") or {}
    rep = audit_json.get("report") or {}
    prov = audit_json.get("provenance") or {}
    test = rep.get("test") or {}
    label = a.get("verdict") or "inconclusive"
    colour = VERDICT_COLOURS.get(label, "#555")
    level_text, level = _decision_level(a, fdr)
    adjusted = fdr.get("method") not in (None, "none")
    b = [f"<h1>Audit “{e(a.get('audit_id'))}”</h1>",
         f'<p class="sub">Model <b>{e(a.get("model"))}</b> · cdi-ray copyrighted-data identification · '
         f'<a href="../index.html">all audits of this batch</a></p>']

    # 1. verdict first, in plain language
    b.append(f'<section id="verdict" class="verdict" style="--c:{colour}"><span class="label">{e(label.replace("_", " "))}'
             f'</span><p class="sentence">{verdict_sentence(a)}</p><p class="reason">{e(a.get("verdict_reason"))}</p></section>')
    if a.get("status") == "failed":
        b.append(f'<p class="alert" id="failure"><b>The audit failed:</b> {e(a.get("error"))}</p>')
    elif label == "used":
        b.append('<p class="note">“Strong” means: the test is significant after the batch\'s multiple-testing control, '
                 'in the direction the training hypothesis predicts, with every distribution-shift control passed '
                 '(docs/VERDICTS.md). The probability of such a result for a model that never saw these images is at '
                 'most the level below.</p>')

    # 2. the numbers
    floor = test.get("p_at_floor")
    p_raw = fmt_p(a.get("p_value")) + (" (no permutation reached the observed statistic: the true p-value is smaller)"
                                       if floor else "")
    tested = a.get("p_value") is not None
    perm = (f"{e(test.get('n_exceedances'))} of {e(test.get('n_permutations'))} random relabellings gave a statistic "
            f"at least as large" if test.get("n_permutations") is not None
            else "none (analytic p-value)" if test else "—")
    rows = [
        ("p-value (raw)", f'<span id="p-raw">{p_raw}</span>'),
        ("p-value, FDR-adjusted", f'<span id="p-adj">{fmt_p(a.get("p_adjusted"))}</span>'
         + ("" if adjusted else ' <span class="note">(no adjustment: fdr.method is none)</span>')),
        ("decision rule", level_text),
        ("FDR decision", "—" if not (adjusted and tested) else "reject (significant)" if a.get("fdr_reject")
         else "not rejected"),
        ("effect size (Cohen's d of held-out scores)", fmt_num(a.get("effect_size"))),
        ("AUC of held-out scores", fmt_num(a.get("auc"))),
        ("direction", e(a.get("direction"))),
        ("images used: published n<sub>P</sub> / unpublished n<sub>U</sub>",
         f'<span id="n">{e(a.get("n_published"))} / {e(a.get("n_unpublished"))}</span>'),
        ("images that could not be used", e(a.get("n_unusable", len(a.get("unusable_images") or [])))),
        ("procedure", f"{e(a.get('procedure'))} "
                      + ("(calibrated)" if a.get("calibrated") else "(NOT calibrated: cannot give “used”)"
                         if a.get("calibrated") is False else "")),
        ("features", "the audited model's own (no reference calibration)"
         if a.get("feature_calibration", "none") == "none" else
         f"reference-calibrated: the audited model's minus {e(a['feature_calibration'].split(':', 1)[-1])}'s "
         f"on the same images"),
        ("per-audit α", e(a.get("alpha"))),
        ("permutations", perm),
        ("seed", e(a.get("seed"))),
    ]
    b.append('<h2>The numbers</h2>' + _kv(rows, "kv numbers"))

    # 3. controls
    b.append("<h2>Distribution-shift controls</h2>" + _controls_table(a.get("controls") or []))

    # 4. plots
    b.append("<h2>Plots</h2>")
    if rep and not rep.get("error"):
        scores = rep.get("scores") or {}
        feats = rep.get("features") or []
        curve = rep.get("pvalue_curve") or {}
        b.append('<div class="plots">')
        b.append(f"<figure>{plot_scores(scores.get('histogram'))}<figcaption>Scores the cross-fitted scorer gave to images "
                 f"it was <em>not</em> fitted on. If the model was trained on P, P's scores sit to the right of U's."
                 f"</figcaption></figure>")
        b.append(f"<figure>{plot_pvalue_curve(curve, level, 'q' if adjusted else 'α')}<figcaption>The audit's test on "
                 f"growing random subsets of P and U (each subset contains the smaller ones; permutations capped at "
                 f"{e(curve.get('max_permutations'))}). The dashed line is the decision level. Evidence from training "
                 f"grows with n; a flat curve near 1 means no signal.</figcaption></figure>")
        b.append(f"<figure>{plot_contributions(feats)}<figcaption>Weights of a ridge discriminant fit on all images "
                 f"(standardized features): which features the score rests on. Descriptive, not a test."
                 f"</figcaption></figure>")
        b.append(f"<figure>{plot_feature_auc(feats)}<figcaption>How well each feature alone separates P from U "
                 f"(on all images, not cross-fitted). Descriptive, not a test.</figcaption></figure>")
        b.append("</div>")
        if feats:
            b.append("<h3>Per-feature table</h3><table id=\"features\"><thead><tr><th>feature</th><th class=num>AUC</th>"
                     "<th class=num>mean difference (SD units)</th><th class=num>weight</th><th class=num>share</th></tr>"
                     "</thead><tbody>" + "".join(
                         f"<tr><td class=mono>{e(f.get('feature'))}</td><td class=num>{fmt_num(f.get('auc'))}</td>"
                         f"<td class=num>{fmt_num(f.get('mean_difference'))}</td><td class=num>{fmt_num(f.get('weight'))}"
                         f"</td><td class=num>{fmt_num(f.get('share'))}</td></tr>" for f in feats) + "</tbody></table>")
    elif rep.get("error"):
        b.append(f'<p class="warn">The plots could not be computed: {e(rep.get("error"))}</p>')
    else:
        b.append('<p class="note" id="no-plots">No plots: the audit was not tested, so there are no scores.</p>')

    # 5. images not used
    b.append("<h2>Images that could not be used</h2>" + _unusable_table(a.get("unusable_images") or []))

    # 6. provenance
    b.append("<h2>Provenance</h2>")
    cols = rep.get("collections") or {}
    model = prov.get("model") or {}
    pr = [
        ("model fingerprint", f'<span class="mono" id="model-fingerprint">{e(a.get("model_fingerprint"))}</span>'),
        ("model", f"{e(model.get('name', a.get('model')))} · <span class=mono>{e(model.get('uri'))}</span>"
                  + (f" · {e(model.get('family'))}" if model.get("family") else "")),
        ("published collection fingerprint",
         f'<span class="mono">{e((cols.get("published") or {}).get("fingerprint"))}</span> '
         f'({e((cols.get("published") or {}).get("n"))} images)'),
        ("unpublished collection fingerprint",
         f'<span class="mono">{e((cols.get("unpublished") or {}).get("fingerprint"))}</span> '
         f'({e((cols.get("unpublished") or {}).get("n"))} images)'),
        ("feature key (store partition)", f'<span class="mono">{e(a.get("feature_key"))}</span>'),
        ("manifest hash", f'<span class="mono">{e(prov.get("manifest_hash"))}</span>'),
        ("seed", e(prov.get("seed", a.get("seed")))),
    ]
    cond = prov.get("conditioning") or {}
    if cond.get("kind") == "class":
        pr.append(("conditioning", f"class labels: {e(cond.get('labelled'))} labelled, {e(cond.get('null_class_used'))} "
                                   f"given the null class {e(cond.get('null_class'))} (missing: {e(cond.get('missing'))}; "
                                   f"label map: {e(cond.get('label_map') or 'the model’s class names / indices')})"))
    elif cond.get("kind") == "text":
        pr.append(("conditioning", f"captions: {e(cond.get('captioned'))} captioned, {e(cond.get('uncaptioned'))} without"))
    run = prov.get("run") or {}
    if run:
        pr.append(("run", f"{e(run.get('run_id'))} · {e(run.get('started_at'))} → {e(run.get('finished_at'))} "
                          f"({e(run.get('seconds'))} s)"))
    b.append(_kv(pr))
    b.append('<p class="note">A collection fingerprint is the SHA-256 of the sorted content hashes (SHA-256 of the '
             'file bytes) of the images used, one per line: the same set of images gives the same fingerprint '
             'whatever their names or order. To reproduce: run the manifest entry below with the same model '
             '(same fingerprint), feature config, seed and software versions (<code>cdi-ray audit</code>).</p>')
    for title, key in (("Manifest entry", "manifest_entry"), ("Feature config", "feature_config"),
                       ("Test options used", None), ("Controls and FDR settings", "controls"),
                       ("Software versions", "software"), ("Timings (s)", "run")):
        if key is None:
            value = test.get("options")
        elif key == "controls":
            value = {"controls": prov.get("controls"), "fdr": prov.get("fdr") or fdr} if prov or fdr else None
        elif key == "run":
            value = (prov.get("run") or {}).get("timings")
        else:
            value = prov.get(key)
        if value:
            b.append(f"<h3>{e(title)}</h3>{_json_block(value)}")
    b.append(f'<p class="note">Made from <code>audits/{e(a.get("audit_id"))}.json</code> '
             f'(schema {e(audit_json.get("schema"))}); re-render with <code>cdi-ray report</code>.</p>')
    return _page(f"cdi-ray audit {a.get('audit_id')}: {label}", b)


# ----------------------------------------------------------------------------------------------
# index page
# ----------------------------------------------------------------------------------------------
def _badge(label: str | None) -> str:
    label = label or "inconclusive"
    return f'<span class="badge" style="background:{VERDICT_COLOURS.get(label, "#555")}">{e(label.replace("_", " "))}</span>'


def _diff_section(diff: dict) -> str:
    out = ["<h2 id=\"diff\">Changes since the previous night</h2>",
           f'<p class="note">previous: <code>{e(diff.get("previous") or "(none)")}</code> · current: '
           f'<code>{e(diff.get("current"))}</code></p>']
    new_used = diff.get("new_used") or []
    if new_used:
        out.append(f'<div class="alert" id="new-used"><b>New “used” verdicts ({len(new_used)})</b><ul>' + "".join(
            f'<li><a href="audits/{e(u.get("audit_id"))}.html">{e(u.get("audit_id"))}</a> on {e(u.get("model"))} — '
            f'p = {fmt_p(u.get("p_value"))}, adjusted {fmt_p(u.get("p_adjusted"))} '
            f'(before: {e(u.get("before") or "new audit")})</li>' for u in new_used) + "</ul></div>")
    else:
        out.append('<p id="new-used">No new “used” verdicts.</p>')
    for title, key in (("New audits", "new_audits"), ("Removed audits", "removed_audits")):
        if diff.get(key):
            out.append(f"<h3>{title} ({len(diff[key])})</h3><p>" + ", ".join(e(x) for x in diff[key]) + "</p>")
    changed = diff.get("changed") or []
    if changed:
        rows = "".join(
            f"<tr><td>{e(c.get('audit_id'))}</td><td>" + "; ".join(
                f"{e(k)}: {e(v.get('before'))} → {e(v.get('after'))}" for k, v in c.items()
                if k != "audit_id" and isinstance(v, dict)) + "</td></tr>" for c in changed)
        out.append(f"<h3>Changed ({len(changed)})</h3><table id=\"changed\"><thead><tr><th>audit</th><th>change</th>"
                   f"</tr></thead><tbody>{rows}</tbody></table>")
    return "".join(out)


def render_index_html(results_json: dict, diff: dict | None = None) -> str:
    """The batch index: summary, FDR settings, one sortable row per audit linking its report, and
    the nightly diff when ``diff`` (``diff.json``) is given."""
    audits = results_json.get("audits") or []
    fdr = results_json.get("fdr") or {}
    s = results_json.get("summary") or {}
    run = results_json.get("run") or {}
    b = ["<h1>cdi-ray audit batch</h1>",
         f'<p class="sub">{e(run.get("output"))} · run {e(run.get("run_id"))} · {e(run.get("finished_at"))}</p>']
    counts = " · ".join(f"{_badge(k)} {e(s.get(k, 0))}" for k in ("used", "not_detected", "inconclusive"))
    method = fdr.get("method")
    fdr_text = ("each audit at its own α (no multiple-testing adjustment)" if method in (None, "none") else
                f"{e(FDR_NAMES.get(method, method))} at q = {e(fdr.get('q'))} over {e(fdr.get('n_tested'))} tested audits")
    b.append(f'<p id="summary">{e(s.get("audits", len(audits)))} audits ({e(s.get("done", 0))} done, '
             f'{e(s.get("failed", 0))} failed): {counts}<br>Multiple-testing control: {fdr_text}.</p>')
    if diff is not None:
        b.append(_diff_section(diff))
    b.append("<h2>Audits</h2><p class=\"note\">Click a column to sort. A verdict of “used” is the strong one; "
             "“inconclusive” says why in its report.</p>")
    head = [("audit", False), ("model", False), ("verdict", False), ("p-value", True), ("FDR-adjusted p", True),
            ("FDR reject", False), ("n_P", True), ("n_U", True), ("effect size", True), ("AUC", True),
            ("controls fired", False), ("status", False)]
    rows = []
    for a in audits:
        aid = a.get("audit_id")
        rank = {"used": 0, "inconclusive": 1, "not_detected": 2}.get(a.get("verdict"), 3)
        cells = [
            (e(aid), f'<a href="audits/{e(aid)}.html">{e(aid)}</a>', ""),
            (e(a.get("model")), e(a.get("model")), ""),
            (str(rank), f'<span title="{e(a.get("verdict_reason"))}">{_badge(a.get("verdict"))}</span>', ""),
            (_sort_key(a.get("p_value")), fmt_p(a.get("p_value")), "num"),
            (_sort_key(a.get("p_adjusted")), fmt_p(a.get("p_adjusted")), "num"),
            (_sort_key(a.get("fdr_reject")), "—" if a.get("p_adjusted") is None else "yes" if a.get("fdr_reject")
             else "no", ""),
            (_sort_key(a.get("n_published")), e(a.get("n_published")), "num"),
            (_sort_key(a.get("n_unpublished")), e(a.get("n_unpublished")), "num"),
            (_sort_key(a.get("effect_size")), fmt_num(a.get("effect_size")), "num"),
            (_sort_key(a.get("auc")), fmt_num(a.get("auc")), "num"),
            (e(a.get("controls_fired")), e(a.get("controls_fired") or "none"), ""),
            (e(a.get("status")), e(a.get("status")) + (f'<br><span class="note">{e(a.get("error"))}</span>'
                                                        if a.get("error") else ""), "status"),
        ]
        rows.append(f'<tr data-audit="{e(aid)}">' + "".join(
            f'<td data-sort="{k}"{f" class={c}" if c else ""}>{v}</td>' for k, v, c in cells) + "</tr>")
    b.append('<table id="audits" class="sortable"><thead><tr>' + "".join(
        f'<th{" class=num" if num else ""}>{e(h)}</th>' for h, num in head) + "</tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>")
    if run.get("timings"):
        b.append("<h2>Run</h2>" + _json_block({k: run.get(k) for k in ("started_at", "finished_at", "seconds", "timings",
                                                                          "images", "max_permutations") if k in run}))
    b.append(f'<p class="note">Made from <code>results.json</code> (schema {e(results_json.get("schema"))}); '
             f'every audit\'s data is in <code>audits/&lt;audit_id&gt;.json</code>.</p>')
    return _page("cdi-ray audit batch", b, script=True, wide=True)

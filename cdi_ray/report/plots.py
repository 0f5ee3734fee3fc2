"""Inline SVG plots of an audit page, drawn with no library: a few axes, bars and lines.

Each function takes the part of the aggregator's report payload it draws and returns one
``<svg>`` element; missing data gives a titled, empty plot that says why.
"""
from __future__ import annotations

import math

from cdi_ray.report.formatting import as_finite, e, fmt_p

#: Colours of the two collections in every plot (colour-blind safe pair).
C_PUB, C_UNPUB = "#d55e00", "#0072b2"
#: Features drawn in the per-feature bar plots (the table under them lists all stored ones).
PLOT_FEATURES = 15
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
    pts = [p for p in (curve or {}).get("points") or [] if as_finite(p.get("pvalue")) is not None]
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
    rows = [(str(f.get("feature")), math.copysign(as_finite(f.get("share")) or 0.0, as_finite(f.get("weight")) or 0.0))
            for f in features[:PLOT_FEATURES]]
    m = max([abs(v) for _, v in rows] + [1e-12])
    return _hbar("plot-weights", "Per-feature contribution (signed share of scorer weight)", rows, lo=-m, hi=m,
                 centre=0.0, xlabel="share of |weight| (right: pushes towards P)", fmt=lambda v: f"{v:+.2f}")


def plot_feature_auc(features: list[dict]) -> str:
    """Single-feature AUC (P above U), the features that separate most on their own first."""
    fs = sorted(features, key=lambda f: -abs((as_finite(f.get("auc")) or 0.5) - 0.5))[:PLOT_FEATURES]
    rows = [(str(f.get("feature")), as_finite(f.get("auc")) or 0.5) for f in fs]
    return _hbar("plot-auc", "Single-feature separation (AUC per feature)", rows, lo=0.0, hi=1.0, centre=0.5,
                 xlabel="AUC (0.5: no separation; right: higher in P)")

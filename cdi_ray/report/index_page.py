"""The batch index (``index.html``): summary, FDR settings, one sortable row per audit linking its
page, and the nightly diff.
"""
from __future__ import annotations

from cdi_ray.report.formatting import FDR_NAMES, VERDICT_COLOURS, e, fmt_num, fmt_p, sort_key
from cdi_ray.report.layout import html_page, json_block


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
            (sort_key(a.get("p_value")), fmt_p(a.get("p_value")), "num"),
            (sort_key(a.get("p_adjusted")), fmt_p(a.get("p_adjusted")), "num"),
            (sort_key(a.get("fdr_reject")), "—" if a.get("p_adjusted") is None else "yes" if a.get("fdr_reject")
             else "no", ""),
            (sort_key(a.get("n_published")), e(a.get("n_published")), "num"),
            (sort_key(a.get("n_unpublished")), e(a.get("n_unpublished")), "num"),
            (sort_key(a.get("effect_size")), fmt_num(a.get("effect_size")), "num"),
            (sort_key(a.get("auc")), fmt_num(a.get("auc")), "num"),
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
        b.append("<h2>Run</h2>" + json_block({k: run.get(k) for k in ("started_at", "finished_at", "seconds", "timings",
                                                                          "images", "max_permutations") if k in run}))
    b.append(f'<p class="note">Made from <code>results.json</code> (schema {e(results_json.get("schema"))}); '
             f'every audit\'s data is in <code>audits/&lt;audit_id&gt;.json</code>.</p>')
    return html_page("cdi-ray audit batch", b, script=True, wide=True)

"""HTML for bulk requests: the owner's request page and the operator's batch index.

Both are drawn with :mod:`cdi_ray.report`'s frame and formatting (self-contained, escaped, no
network); each model's detailed page is :func:`cdi_ray.report.render_audit_html` itself.
"""
from __future__ import annotations

from cdi_ray.report.formatting import VERDICT_COLOURS, e, fmt_num, fmt_p, sort_key
from cdi_ray.report.layout import html_page, json_block, kv_table


def badge(label: str | None) -> str:
    label = label or "inconclusive"
    return (f'<span class="badge" style="background:{VERDICT_COLOURS.get(label, "#555")}">'
            f'{e(label.replace("_", " "))}</span>')


def family_sentence(family: dict) -> str:
    if family.get("method") == "bh":
        return (f"Benjamini–Hochberg at q = {e(family.get('alpha'))} across every request of the operator's batch "
                f"({e(family.get('n_tested'))} tests): this verdict depends on the other requests of the batch.")
    k = family.get("k")
    return (f"Holm's procedure across the {e(k)} model(s) audited for this request, at α = {e(family.get('alpha'))}: "
            f"the chance that any of them says “used” for a model that never saw these images is at most α. "
            f"No other owner's request enters this decision.")


def render_request_html(results: dict, evidence: dict) -> str:
    """``index.html`` of a request folder, from its ``results.json`` and ``evidence.json``."""
    rid, label = results.get("request_id"), results.get("verdict")
    b = [f"<h1>Request “{e(rid)}”</h1>",
         f'<p class="sub">Owner <b>{e(results.get("owner"))}</b> · cdi-ray copyrighted-data identification</p>',
         f'<section id="verdict" class="verdict" style="--c:{VERDICT_COLOURS.get(label, "#555")}"><span class="label">'
         f'{e((label or "").replace("_", " "))}</span><p class="sentence">'
         + (f"Evidence that {e(', '.join(results.get('used_models') or []))} was trained on your published images."
            if label == "used" else "No model audited shows evidence of training on your published images at the "
                                    "chosen level." if label == "not_detected" else
            "At least one audit could not give an answer either way; see the reasons below.")
         + f'</p><p class="reason">{family_sentence(results.get("family") or {})}</p></section>']
    if results.get("state") == "failed":
        b.append(f'<p class="alert" id="failure"><b>Part of this request failed</b> (it is retried on the next run): '
                 f'{e(results.get("reason"))}</p>')
    rows = []
    for a in results.get("audits") or []:
        aid = a.get("audit_id")
        rows.append(
            f'<tr data-model="{e(a.get("model"))}"><td><a href="audits/{e(aid)}.html">{e(a.get("model"))}</a></td>'
            f'<td>{badge(a.get("verdict"))}</td><td class=num>{fmt_p(a.get("p_value"))}</td>'
            f'<td class=num>{fmt_p(a.get("p_adjusted"))}</td><td class=num>{e(a.get("n_published"))} / '
            f'{e(a.get("n_unpublished"))}</td><td class=num>{fmt_num(a.get("effect_size"))}</td>'
            f'<td>{e(a.get("controls_fired") or "none")}</td><td>{e(a.get("verdict_reason"))}</td></tr>')
    adj = "Holm-adjusted p" if (results.get("family") or {}).get("method") == "holm" else "BH-adjusted p"
    b.append('<h2>Per model</h2><table id="models"><thead><tr><th>model</th><th>verdict</th><th class=num>p-value</th>'
             f'<th class=num>{adj}</th><th class=num>n<sub>P</sub> / n<sub>U</sub></th><th class=num>effect size</th>'
             '<th>controls fired</th><th>reason</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")
    b.append('<p class="note">Each model name links to its full audit report: score plots, the p-value as the '
             'collections grow, the distribution-shift controls and the images that could not be used.</p>')
    b.append("<h2>Evidence</h2>")
    ev_rows = [(e(a.get("model")), f'<span class=mono>{e(a.get("model_fingerprint"))}</span>'
                f'<br><span class=note>feature key {e(a.get("feature_key"))} · seed {e(a.get("seed"))}</span>')
               for a in evidence.get("audits") or []]
    b.append(kv_table([("request inputs hash", f'<span class=mono>{e(evidence.get("inputs_hash"))}</span>'),
                       ("cdi-ray version", e(evidence.get("cdi_ray_version")))] + ev_rows))
    rep = evidence.get("reproduce") or {}
    b.append('<p>To check these results from the stored features (the same p-values and verdicts must come back):'
             f'</p><pre>{e(rep.get("verify"))}</pre><p>To recompute them from the images:</p>'
             f'<pre>{e(rep.get("from_images"))}</pre>')
    b.append("<h3>Request</h3>" + json_block(evidence.get("request")))
    b.append('<p class="note">Made from <code>results.json</code> and <code>evidence.json</code> in this folder '
             '(image list: <code>evidence-images.parquet</code>; features: <code>features/</code>).</p>')
    return html_page(f"cdi-ray request {rid}: {label}", b)


def render_batch_html(summary: dict, rows: list[dict], rejected: list[dict]) -> str:
    """The operator's ``index.html``: counts, the family rule, batch-wide BH as a figure, one row per request."""
    b = ["<h1>cdi-ray bulk requests</h1>",
         f'<p class="sub">{e(summary.get("out"))} · run {e(summary.get("run_id"))} · {e(summary.get("finished_at"))}</p>']
    counts = " · ".join(f"{e(k)} {e(v)}" for k, v in (summary.get("states") or {}).items())
    verdicts = " · ".join(f"{badge(k)} {e(v)}" for k, v in (summary.get("verdicts") or {}).items())
    bh = summary.get("batch_bh") or {}
    b.append(f'<p id="summary">{e(summary.get("requests"))} requests: {counts}<br>Request verdicts: {verdicts}<br>'
             f'Decision rule: {e(summary.get("family_rule"))}<br>'
             f'<span id="batch-bh">For comparison, Benjamini–Hochberg at q = {e(bh.get("q"))} over all '
             f'{e(bh.get("n_tested"))} tests of the batch would flag {e(bh.get("flagged"))} (request, model) pair(s); '
             f'the decision rule flagged {e(bh.get("flagged_by_rule"))}.</span></p>')
    head = ["request", "owner", "state", "verdict", "models used", "smallest p", "reason"]
    body = []
    for r in rows:
        ps = [x.get("p_value") for x in r.get("results") or [] if x.get("p_value") is not None]
        link = (f'<a href="requests/{e(r["request_id"])}/index.html">{e(r["request_id"])}</a>'
                if r.get("state") != "rejected" else e(r["request_id"]))
        cells = [(e(r["request_id"]), link), (e(r.get("owner")), e(r.get("owner"))), (e(r.get("state")), e(r.get("state"))),
                 (e(r.get("verdict")), badge(r.get("verdict")) if r.get("verdict") else "—"),
                 (e(" ".join(r.get("used_models") or [])), e(" ".join(r.get("used_models") or [])) or "—"),
                 (sort_key(min(ps) if ps else None), fmt_p(min(ps) if ps else None)),
                 (e(r.get("reason")), e(r.get("reason")) or "")]
        body.append(f'<tr data-request="{e(r["request_id"])}">' + "".join(f'<td data-sort="{k}">{v}</td>' for k, v in cells)
                    + "</tr>")
    b.append('<h2>Requests</h2><table id="requests" class="sortable"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
             + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>")
    if rejected:
        b.append("<h2>Rejected rows</h2><p class=note>Also in <code>rejected.csv</code>; fix the row and run again.</p>"
                 '<table id="rejected"><thead><tr><th>row</th><th>request</th><th>reason</th><th>detail</th></tr></thead>'
                 "<tbody>" + "".join(f"<tr><td>{e(x.get('row'))}</td><td>{e(x.get('request_id'))}</td><td>"
                                     f"{e(x.get('reason'))}</td><td>{e(x.get('detail'))}</td></tr>" for x in rejected)
                 + "</tbody></table>")
    b.append("<h2>Run</h2>" + json_block({k: summary.get(k) for k in ("features", "audits_run", "seconds", "timings")}))
    return html_page("cdi-ray bulk requests", b, script=True, wide=True)

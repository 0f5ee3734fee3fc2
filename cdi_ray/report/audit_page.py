"""The page of one audit (``audits/<audit_id>.html``), for a reader who is not a statistician.

Order: the verdict in one sentence, the reason, then the numbers (p-values raw and adjusted,
effect size, n_P / n_U, procedure, level), the controls, the plots, the images that could not be
used, and the provenance a third party needs to re-run the audit.
"""
from __future__ import annotations

from cdi_ray.report.formatting import FDR_NAMES, VERDICT_COLOURS, as_finite, e, fmt_num, fmt_p, verdict_sentence
from cdi_ray.report.layout import html_page, json_block, kv_table
from cdi_ray.report.plots import plot_contributions, plot_feature_auc, plot_pvalue_curve, plot_scores

#: Unusable images listed on an audit page (the full list is in images.parquet).
MAX_UNUSABLE_ROWS = 200


def _decision_level(audit: dict, fdr: dict | None) -> tuple[str, float | None]:
    """(text, level) of what the p-value was compared with."""
    seq = audit.get("sequential")
    if seq:
        return (f"life-long rule of a standing audit: over all its nights, the chance of a false “used” is at most "
                f"α = {e(seq.get('alpha'))} (the batch's FDR adjustment is shown, but does not decide)",
                as_finite(audit.get("alpha")))
    fdr = fdr or {}
    method = fdr.get("method")
    if method == "holm":  # a bulk request: the owner's family is the models of their request
        a = as_finite(fdr.get("q"))
        return (f"Holm-adjusted p-value ≤ α = {e(a)} (family-wise, across the {e(fdr.get('n_tested'))} model(s) "
                f"audited for this request; no other request enters it)"), a
    if method and method != "none":
        q = as_finite(fdr.get("q"))
        return (f"FDR-adjusted p-value ≤ q = {e(q)} ({e(FDR_NAMES.get(method, method))} over "
                f"{e(fdr.get('n_tested'))} tested audits)"), q
    a = as_finite(audit.get("alpha"))
    return f"raw p-value ≤ α = {e(a)} (no multiple-testing adjustment)", a


def _standing_section(seq: dict) -> str:
    """Which night a standing audit is on, its looks and the α it has spent (docs/VERDICTS.md §5)."""
    rows = [("night", f'<span id="night">{e(seq.get("night"))}</span> ({e(seq.get("date"))}; first night '
                      f'{e(seq.get("first_night"))})'),
            ("looks taken", f'<span id="look">{e(seq.get("look"))}</span>'
             + (f" (first on {e(seq.get('first_look_on'))})" if seq.get("first_look_on") else "")
             + ("; tonight took a look" if seq.get("took_look") else "; no look tonight")),
            ("α spent", f'<span id="alpha-spent">{fmt_p(seq.get("alpha_spent"))}</span> of α = '
                        f'{e(seq.get("alpha"))} (remaining <span id="alpha-remaining">'
                        f'{fmt_p(seq.get("alpha_remaining"))}</span>)'),
            ("accumulated evidence", f"nominal p = {fmt_p(seq.get('nominal_pvalue'))}, latest look's level "
                                     f"{fmt_p(seq.get('level'))}"),
            ("crossed the boundary", f"on look {e(seq.get('used_on_look'))} ({e(seq.get('used_on'))})"
             if seq.get("used_on_look") else "no")]
    return ('<h2>Standing audit: its nightly looks</h2><section id="standing">'
            f'<p class="note">{e(seq.get("reason"))}</p>' + kv_table(rows) +
            '<p class="note">This audit is re-tested every night as its collections grow. Its verdict comes from a '
            'life-long rule: the chance that an audit of a model that never saw these images says “used” on ANY '
            'night is at most α, however many nights it runs; each look spends part of α, a night without new '
            'images spends nothing. The raw p-value below is tonight\'s test of the whole collection, shown as a '
            'figure; it does not decide.</p></section>')


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
    adjustment = "Holm" if fdr.get("method") == "holm" else "FDR"  # Holm: a bulk request's own models
    b = [f"<h1>Audit “{e(a.get('audit_id'))}”</h1>",
         f'<p class="sub">Model <b>{e(a.get("model"))}</b> · cdi-ray copyrighted-data identification · '
         f'<a href="../index.html">all audits of this {"request" if adjustment == "Holm" else "batch"}</a></p>']

    # 1. verdict first, in plain language
    b.append(f'<section id="verdict" class="verdict" style="--c:{colour}"><span class="label">{e(label.replace("_", " "))}'
             f'</span><p class="sentence">{verdict_sentence(a)}</p><p class="reason">{e(a.get("verdict_reason"))}</p></section>')
    if a.get("status") == "failed":
        b.append(f'<p class="alert" id="failure"><b>The audit failed:</b> {e(a.get("error"))}</p>')
    elif label == "used" and a.get("sequential"):
        b.append('<p class="note">“Strong” means: the accumulated evidence of the audit\'s nightly looks crossed its '
                 'life-long boundary, in the direction the training hypothesis predicts, with every distribution-shift '
                 'control passed (docs/VERDICTS.md §5). The probability that a model that never saw these images gets '
                 'such a result on any night is at most the audit\'s α.</p>')
    elif label == "used":
        b.append('<p class="note">“Strong” means: the test is significant after the batch\'s multiple-testing control, '
                 'in the direction the training hypothesis predicts, with every distribution-shift control passed '
                 '(docs/VERDICTS.md). The probability of such a result for a model that never saw these images is at '
                 'most the level below.</p>')

    if a.get("sequential"):
        b.append(_standing_section(a["sequential"]))

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
        (f"p-value, {adjustment}-adjusted", f'<span id="p-adj">{fmt_p(a.get("p_adjusted"))}</span>'
         + ("" if adjusted else ' <span class="note">(no adjustment: fdr.method is none)</span>')),
        ("decision rule", level_text),
        (f"{adjustment} decision", "—" if not (adjusted and tested) else "reject (significant)" if a.get("fdr_reject")
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
    b.append('<h2>The numbers</h2>' + kv_table(rows, "kv numbers"))

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
    b.append(kv_table(pr))
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
            b.append(f"<h3>{e(title)}</h3>{json_block(value)}")
    b.append(f'<p class="note">Made from <code>audits/{e(a.get("audit_id"))}.json</code> '
             f'(schema {e(audit_json.get("schema"))}); re-render with <code>cdi-ray report</code>.</p>')
    return html_page(f"cdi-ray audit {a.get('audit_id')}: {label}", b)

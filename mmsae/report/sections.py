"""Report sections for steering (before/after per clamp value) and attribution (top features per
modality, heatmaps per image view, per-token text attribution, validation against ablation)."""

from __future__ import annotations

import html
from pathlib import Path

import polars as pl


def _e(x) -> str:
    return html.escape(str(x))


def steering_html(steering: pl.DataFrame) -> str:
    """One table per (feature, prompt): the unclamped text, then the text at each clamp value."""
    if steering.is_empty():
        return "<h2 id=steering>Steering</h2><p class=muted>no features to steer</p>"
    parts = ["<h2 id=steering>Steering</h2><p class=muted>Greedy generation with one feature clamped at the hooked layer "
             f"({_e(steering['mode'][0])} mode, positions: {_e(steering['positions'][0])}; the SAE's error term is kept "
             "unless mode is 'reference', so the unclamped text equals the model's own).</p>"]
    for (f, prompt, image), g in steering.group_by(["feature", "prompt", "image"], maintain_order=True):
        img = f" · image {_e(Path(image).name)}" if image else ""
        parts.append(f"<div class=card><h3>Feature {f} <a href='#f{f}'>↗</a></h3><div class=muted>prompt: {_e(prompt)}{img}</div>"
                     f"<table class=steer><tr><th>clamp</th><th>generated text</th></tr>"
                     f"<tr><td>none</td><td>{_e(g['text_before'][0])}</td></tr>")
        for r in g.sort("value").iter_rows(named=True):
            label = f"{r['value']:g}× max = {r['clamp_value']:.3g}" if r["scale"] == "max_multiple" else f"{r['clamp_value']:.3g}"
            mark = "" if r["changed"] else " <span class=muted>(unchanged)</span>"
            text = _e(r["text_after"]) if r["text_after"].strip() else "<span class=muted>(empty: only special tokens)</span>"
            parts.append(f"<tr><td>{_e(label)}</td><td>{text}{mark}</td></tr>")
        parts.append("</table></div>")
    return "".join(parts)


def _signed_tokens(tokens: list[str], values: list[float]) -> str:
    vmax = max((abs(v) for v in values), default=0.0) or 1.0
    out = []
    for t, v in zip(tokens, values):
        a = min(1.0, abs(v) / vmax)
        color = f"rgba(0,120,255,{a:.2f})" if v >= 0 else f"rgba(230,40,40,{a:.2f})"
        out.append(f'<span class=tok style="background:{color}" title="{v:.3g}">{_e(t)}</span>')
    return f'<div class=ctx>{"".join(out)}</div>'


def attribution_html(summary: dict, attr_dir: Path, data_url) -> str:
    """The attribution section; ``data_url(path)`` inlines an image file."""
    parts = ["<h2 id=attribution>Attribution</h2><p class=muted>m = logit(answer) − logit(baseline) at the last position; "
             "A[t,f] = z·∂m/∂z from one forward and one backward with the SAE spliced in (error term held constant). "
             "Blue supports the answer, red the baseline. Validation: the true effect of zero-ablating each of the "
             "features with the largest |total attribution|.</p>"]
    for c in summary.get("cases", []):
        v = c["validation"]
        r = f"{v['pearson']:.2f}" if v["pearson"] is not None else "–"
        img = f" · image {_e(Path(c['image']).name)}" if c.get("image") else ""
        parts.append(
            f"<div class=card><h3>{_e(c['case'])}: {_e(repr(c['answer']))} vs {_e(repr(c['baseline']))}</h3>"
            f"<div class=muted>prompt: {_e(c['prompt'])}{img} · m = {c['metric']:.3f} · features {c['feature_attribution']:.3f} "
            f"+ error node {c['error_attribution']:.3f} · attribution vs ablation: Pearson r = {r} over {len(v['features'])} "
            f"features · {c['seconds']['attribution']:.2f} s for all features vs {c['seconds']['ablation_per_feature']:.2f} s "
            f"per ablated feature</div>")
        for mod in ("image", "text"):
            top = c[f"top_{mod}"]
            if top:
                cells = " · ".join(f"<a href='#f{t['feature']}'>{t['feature']}</a> ({t['attribution']:+.3g})" for t in top)
                parts.append(f"<p><b>Top features on {mod} tokens</b> ({_e(c['pool'])}): {cells}</p>")
        if c.get("maps"):
            figs = "".join(f"<figure><img src='{data_url(attr_dir / m['png'])}'><figcaption>feature {m['feature']} · "
                           f"view {m['view']} · Σ {m['sum']:+.3g}</figcaption></figure>" for m in c["maps"] if m["view"] <= 1)
            parts.append(f"<h4>Heatmaps (positive attribution; view 0 = base view on the image, 1 = first tile)</h4><div class=imgs>{figs}</div>")
        parts.append("<h4>Text tokens (total attribution over features)</h4>")
        parts.append(_signed_tokens(c["text_tokens"], c["text_attribution"]))
        parts.append("</div>")
    return "".join(parts)


def neurons_html(props: dict, captions: pl.DataFrame, neurons: pl.DataFrame, tokens: pl.DataFrame,
                 edits: pl.DataFrame, neuron_dir: Path, data_url, per_case: int = 5) -> str:
    """Multimodal neurons: properties, captions with their top neurons and tokens, heatmaps, edits."""
    def f(x):
        return "–" if x is None else f"{x:.3g}"

    parts = ["<h2 id=neurons>Multimodal neurons</h2><p class=muted>Score s = a·(W_out W_U)[i, t] at the position "
             "predicting each caption noun's first token, all layers ranked together (arXiv 2311.07470).</p><table class=kv>"]
    for k, label in [("n_cases", "noun cases"), ("semantic_sensitivity", "semantic sensitivity (top tokens match the noun)"),
                     ("specificity_overlap", "top-neuron overlap across nouns (lower = more specific)"),
                     ("invariance_overlap", "top-neuron overlap for a noun across images"),
                     ("noun_removed_rate_top", "noun removed by noise on the top-k neurons"),
                     ("noun_removed_rate_random", "noun removed by noise on k random neurons")]:
        parts.append(f"<tr><td>{_e(label)}</td><td>{f(props.get(k))}</td></tr>")
    parts.append("</table>")
    toks = {(r["layer"], r["neuron"]): [] for r in tokens.iter_rows(named=True)} if tokens.height else {}
    for r in tokens.iter_rows(named=True) if tokens.height else []:
        toks[(r["layer"], r["neuron"])].append(r["token"])
    maps_by = {}
    for m in props.get("maps", []):
        maps_by.setdefault(m["case"], []).append(m)
    for c in captions.iter_rows(named=True):
        parts.append(f"<div class=card><b>{_e(c['sample'])}</b>: “{_e(c['caption'])}” <span class=muted>nouns: "
                     f"{_e(', '.join(c['nouns']) or 'none')}</span>")
        if neurons.height:
            for (case, noun), g in neurons.filter(pl.col("sample") == c["sample"]).group_by(["case", "noun"], maintain_order=True):
                rows = " · ".join(f"L{r['layer']}.{r['neuron']} ({r['score']:.3g}; {_e(' '.join(toks.get((r['layer'], r['neuron']), [])[:5]))})"
                                  for r in g.sort("rank").head(per_case).iter_rows(named=True))
                parts.append(f"<p><b>{_e(noun)}</b>: {rows}</p>")
                figs = "".join(f"<figure><img src='{data_url(neuron_dir / m[k])}'><figcaption>L{m['layer']}.{m['neuron']} "
                               f"{'top 5%' if k == 'mask_png' else 'heatmap'}</figcaption></figure>"
                               for m in maps_by.get(case, []) for k in ("png", "mask_png"))
                if figs:
                    parts.append(f"<div class=imgs>{figs}</div>")
        parts.append("</div>")
    if edits.height and "method" in edits.columns:
        parts.append("<h3>Editing</h3><table class=steer><tr><th>edit</th><th>caption after</th><th>success · generality · locality</th></tr>")
        for r in edits.iter_rows(named=True):
            if r.get("status") != "ok":
                parts.append(f"<tr><td>{_e(r['name'])}</td><td colspan=2>{_e(r['status'])}</td></tr>")
                continue
            parts.append(f"<tr><td>{_e(r['source'])} → {_e(r['target'])} ({_e(r['method'])})</td><td>{_e(r['caption_after'])}</td>"
                         f"<td>{r['success']} · {f(r['generality'])} (n={r['n_generality']}) · {f(r['locality'])}</td></tr>")
        parts.append("</table>")
    return "".join(parts)


def evaluation_html(summary: dict) -> str:
    """The paper's Table 1 for this run, with the metrics that could not be computed and why."""
    un = summary.get("unavailable", {})

    def cell(row, metric):
        if metric in un:
            return "<i>unavailable</i>", "<i>unavailable</i>"
        e, ci, r, s = row[f"{metric}_explained"], row[f"{metric}_ci"], row[f"{metric}_random"], row[f"{metric}_random_std"]
        exp = "–" if e is None else f"{e:.3f}" + (f" <span class=muted>[{ci[0]:.3f}, {ci[1]:.3f}]</span>" if ci and ci[0] is not None else "")
        return exp, ("–" if r is None else f"{r:.3f} ± {s:.3f}")

    parts = ["<h2 id=evaluation>Explanation evaluation</h2><p class=muted>IoU of the refined phrase's grounded mask "
             "with the feature's activated region, and CLIP score of the phrase with the image, on the feature's top images "
             f"versus random images. {summary.get('n_with_phrase', 0)} of {summary.get('n_refined', 0)} refined explanations "
             "have a phrase; the others are excluded.</p>",
             "<table class=steer><tr><th>category</th><th>features</th><th>IoU explained</th><th>IoU random</th>"
             "<th>CLIP explained</th><th>CLIP random</th></tr>"]
    for row in summary.get("table", []):
        ie, ir = cell(row, "iou")
        ce, cr = cell(row, "clip_score")
        parts.append(f"<tr><td>{_e(row['category'])}</td><td>{row['n_features']}</td><td>{ie}</td><td>{ir}</td><td>{ce}</td><td>{cr}</td></tr>")
    parts.append("</table>")
    if un:
        parts.append("<ul>" + "".join(f"<li>{_e(m)} unavailable: {_e(w)}</li>" for m, w in un.items()) + "</ul>")
    return "".join(parts)

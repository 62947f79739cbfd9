"""The run's report: one self-contained static HTML page (images inlined as data URLs).

Sections: the run (model, hook point, corpus and token counts, skipped images), the SAE (held-out
FVU / L0 / dead fraction, training curve as inline SVG), and one card per selected feature with its
statistics, its top images with the activated regions highlighted (and heatmaps), and the top text
contexts with the activating tokens marked.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import polars as pl
from PIL import Image

from mmsae.report.sections import _e, attribution_html, evaluation_html, neurons_html, steering_html

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} .muted{color:#666} table.kv td{padding:2px 12px 2px 0}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:.6em 1em;margin:1em 0}
.card{border:1px solid #ddd;border-radius:8px;padding:1em;margin:1em 0}
.imgs{display:flex;flex-wrap:wrap;gap:8px} .imgs figure{margin:0;text-align:center;font-size:12px}
.imgs img{height:150px;border-radius:4px} .ctx{font-family:monospace;font-size:13px;margin:4px 0;white-space:pre-wrap}
.tok{border-radius:3px} .expl{font-size:15px} pre{white-space:pre-wrap;font-size:12px} .focus{outline:2px solid #c00}
svg text{font-size:11px;fill:#444}
table.steer td{padding:3px 10px;vertical-align:top;border-top:1px solid #eee} table.steer{border-collapse:collapse;table-layout:fixed;width:100%} table.steer td{overflow-wrap:anywhere} table.steer td:first-child{width:130px}
"""


def _fmt(x, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}g}" if isinstance(x, float) else str(x)


def _data_url(path: Path, max_side: int = 224) -> str:
    """Inline an image file as a JPEG data URL (small enough for a page with many images)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def curve_svg(log: pl.DataFrame, ys=("fvu", "fvu_image", "fvu_text"), width: int = 640, height: int = 220) -> str:
    """An inline SVG line chart of training metrics against step (log scale not needed: FVU in [0, ~1])."""
    if log.is_empty():
        return "<p class=muted>no training log</p>"
    colors = {"fvu": "#1f77b4", "fvu_image": "#d62728", "fvu_text": "#2ca02c", "dead_fraction": "#9467bd"}
    steps = log["step"].to_list()
    x0, x1 = min(steps), max(max(steps), 1)
    vals = [v for y in ys for v in log[y].to_list() if v is not None and not math.isnan(v)]
    ymax = max(1.0, max(vals, default=1.0))
    pad = 35

    def pt(s, v):
        return f"{pad + (s - x0) / max(x1 - x0, 1) * (width - 2 * pad):.1f},{height - pad - v / ymax * (height - 2 * pad):.1f}"

    lines = []
    for i, y in enumerate(ys):
        pts = " ".join(pt(s, v) for s, v in zip(steps, log[y].to_list()) if v is not None and not math.isnan(v))
        lines.append(f'<polyline fill="none" stroke="{colors.get(y, "#333")}" stroke-width="1.5" points="{pts}"/>')
        lines.append(f'<text x="{width - pad - 80}" y="{pad + 14 * i}" style="fill:{colors.get(y, "#333")}">{_e(y)}</text>')
    axes = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>'
        f'<text x="{pad}" y="{height - pad + 15}">{x0}</text><text x="{width - pad - 20}" y="{height - pad + 15}">{x1}</text>'
        f'<text x="2" y="{pad + 4}">{ymax:.2g}</text><text x="2" y="{height - pad}">0</text>'
        f'<text x="{width / 2 - 20}" y="{height - 5}">step</text>'
    )
    return f'<svg width="{width}" height="{height}" role="img" aria-label="training curve">{axes}{"".join(lines)}</svg>'


def _context_html(tokens: list[str], acts: list[float], focus: int) -> str:
    vmax = max(acts) if acts and max(acts) > 0 else 1.0
    out = []
    run = 0  # collapse runs of inactive image placeholders into one marker
    for i, (t, a) in enumerate(zip(tokens, acts)):
        if t == "<image>" and a <= 0 and i != focus:
            run += 1
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt == "<image>" and (acts[i + 1] <= 0 and i + 1 != focus):
                continue
            out.append(f'<span class="muted">[{run} image tokens]</span>')
            run = 0
            continue
        alpha = min(1.0, a / vmax)
        cls = "tok focus" if i == focus else "tok"
        title = f' title="{a:.3g}"' if a > 0 else ""
        out.append(f'<span class="{cls}" style="background:rgba(255,90,0,{alpha:.2f})"{title}>{_e(t)}</span>')
    return f'<div class="ctx">{"".join(out)}</div>'


def feature_card(f: int, stat: dict, maps: pl.DataFrame, ctx: pl.DataFrame, maps_dir: Path, extra_html: str = "") -> str:
    """HTML for one feature: statistics, top images (highlight + heatmap), top text contexts."""
    kv = (
        f"frequency {_fmt(stat.get('frequency'), 3)} · image {_fmt(stat.get('frequency_image'), 3)} · "
        f"text {_fmt(stat.get('frequency_text'), 3)} · max act {_fmt(stat.get('max_activation'), 3)} · "
        f"mean act {_fmt(stat.get('mean_activation'), 3)} · samples {stat.get('n_samples')}"
    )
    parts = [f'<div class="card" id="f{f}"><h3>Feature {f}</h3><div class=muted>{kv}</div>{extra_html}']
    fm = maps.filter(pl.col("feature") == f).sort("rank")
    if fm.height:
        figs = []
        for r in fm.iter_rows(named=True):
            for kind in ("highlight", "heatmap"):
                figs.append(
                    f'<figure><img src="{_data_url(maps_dir / r[kind])}" alt="feature {f} {kind} {_e(r["sample_id"])}">'
                    f'<figcaption>#{r["rank"] + 1} {_e(r["sample_id"])} · {r["score"]:.3g}</figcaption></figure>'
                )
        parts.append(f'<h4>Top images (activated regions kept bright; heatmap)</h4><div class="imgs">{"".join(figs)}</div>')
    fc = ctx.filter(pl.col("feature") == f).sort("rank")
    if fc.height:
        parts.append("<h4>Top text contexts</h4>")
        for r in fc.iter_rows(named=True):
            parts.append(_context_html(r["tokens"], r["activations"], r["focus"]))
    parts.append("</div>")
    return "".join(parts)


def explanation_html(row: dict | None) -> str:
    """The explanation line of a feature card (or why there is none)."""
    if row is None:
        return ""
    src = f"<span class=muted> — {_e(Path(row['explainer_model']).name)}, prompt {_e(row['prompt_version'])}</span>"
    if row["status"] == "ok":
        return f"<p class=expl><b>Explanation:</b> {_e(row['explanation'])}{src}</p>"
    if row["status"] == "untagged":
        return (f"<p class=expl><b>Explanation</b> (the answer's last line; no [EXPLANATION] tag): "
                f"{_e(row['explanation'])}{src}</p>")
    detail = {"no_explanation": "the explainer found nothing in common",
              "unparsed": "no [EXPLANATION] line in the answer",
              "failed": f"request failed: {row.get('error')}"}.get(row["status"], row["status"])
    raw = f"<details><summary>raw answer</summary><pre>{_e(row['raw_response'])}</pre></details>" if row.get("raw_response") else ""
    return f"<p class=expl><b>Explanation:</b> <i>none</i> ({_e(detail)}){src}</p>{raw}"


def build_report(*, manifest: dict, metrics: dict, log: pl.DataFrame, stats: pl.DataFrame, selected: dict,
                 maps: pl.DataFrame, contexts: pl.DataFrame, maps_dir: Path, run: dict,
                 explanations: pl.DataFrame | None = None, steering: pl.DataFrame | None = None,
                 attribution: dict | None = None, attribution_dir: Path | None = None, neurons: dict | None = None,
                 evaluation: dict | None = None) -> str:
    """The whole page as an HTML string.

    Args:
        manifest: the activation manifest; metrics: the SAE's ``metrics.json``; log: per-step log;
        stats: feature statistics; selected: ``selected.json`` (features and selection info);
        maps, contexts: from :func:`mmsae.maps.render_feature_maps`; maps_dir: where PNGs are;
        run: ``{"model", "demo": bool, "provenance": dict|None, "config_hash"}``.
    """
    ho = metrics.get("heldout", {})
    head = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mmsae report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>mmsae report</h1>",
        f"<div class=muted>model <b>{_e(run['model'])}</b> · hook point <b>{_e(manifest.get('hook_point'))}</b>"
        f" (layer {_e(manifest.get('layer'))}, d_model {manifest.get('d_model')})</div>",
    ]
    if run.get("demo"):
        head.append(
            "<div class=note><b>Embedded demo model.</b> The language model is SmolLM2-135M-Instruct with its real "
            "weights, but the vision tower and projector are small, <b>randomly initialised and untrained</b>: image "
            "features found here are low-level by construction (colour, position, texture of patches), not "
            "semantic. Name a real LMM (e.g. <code>llava-hf/llama3-llava-next-8b-hf</code>) in config for "
            "meaningful image features.</div>"
        )
    skipped = manifest.get("skipped", [])
    head.append("<h2>Run</h2><table class=kv>")
    for k, v in [
        ("samples", manifest.get("n_samples")),
        ("tokens", f"{manifest.get('n_tokens')} ({manifest.get('n_image_tokens')} image, {manifest.get('n_text_tokens')} text)"),
        ("shards", manifest.get("n_shards")),
        ("images converted / skipped", f"{manifest.get('n_images_converted', 0)} / {len(skipped)}"),
        ("SAE", f"d_sae {metrics.get('d_sae')}, k {metrics.get('k')}, {metrics.get('steps')} steps × {metrics.get('batch_size')} tokens"),
    ]:
        head.append(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>")
    head.append("</table>")
    if skipped:
        head.append("<details><summary>skipped images</summary><ul>")
        head += [f"<li>{_e(s['image'])}: {_e(s['reason'])}</li>" for s in skipped]
        head.append("</ul></details>")
    head.append("<h2>Sparse autoencoder</h2><table class=kv>")
    for k in ("fvu", "fvu_image", "fvu_text", "l0", "l0_image", "l0_text", "never_active_fraction",
              "never_active_fraction_image", "never_active_fraction_text"):
        head.append(f"<tr><td>held-out {_e(k)}</td><td>{_fmt(ho.get(k))}</td></tr>")
    for k in ("dead_fraction", "dead_fraction_image", "dead_fraction_text"):
        head.append(f"<tr><td>{_e(k)} (training window)</td><td>{_fmt(metrics.get(k))}</td></tr>")
    head.append(f"<tr><td>held-out tokens</td><td>{ho.get('n_tokens')}</td></tr></table>")
    head.append(curve_svg(log))
    info = selected.get("info", {})
    head.append(
        f"<h2>Features</h2><p class=muted>{len(selected.get('features', []))} selected ({_e(info.get('mode'))}); "
        f"{info.get('n_alive')} latents ever active; {info.get('n_too_few_samples')} skipped for fewer than "
        f"{info.get('min_samples')} activating samples; {info.get('n_too_dense')} too dense.</p>"
    )
    stat_by = {r["feature"]: r for r in stats.iter_rows(named=True)}
    expl = {r["feature"]: r for r in explanations.iter_rows(named=True)} if explanations is not None else {}
    if explanations is not None:
        st = explanations["status"].to_list()
        head.append(f"<p class=muted>Explanations: {st.count('ok')} ok, {st.count('untagged')} untagged, "
                    f"{st.count('no_explanation')} none found, {st.count('unparsed')} empty, {st.count('failed')} failed.</p>")
    cards = [feature_card(f, stat_by.get(f, {}), maps, contexts, maps_dir, explanation_html(expl.get(f)))
             for f in selected.get("features", [])]
    tail = []
    if evaluation is not None:
        tail.append(evaluation_html(evaluation))
    if steering is not None:
        tail.append(steering_html(steering))
    if attribution is not None:
        tail.append(attribution_html(attribution, attribution_dir, _data_url))
    if neurons is not None:
        tail.append(neurons_html(**neurons, data_url=_data_url))
    return "".join(head + cards + tail + ["</body></html>"])

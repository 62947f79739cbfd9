"""What each report section shows, as plain data for its template: grouping, derived numbers
(ratios, verdicts) and tolerance of outputs that lack newer keys. Every function here takes one
stage's outputs and returns a dict; the HTML is in ``templates/``."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mmsae.report.views import context_tokens, missing, signed_tokens

SAE_HELDOUT_KEYS = ("fvu", "fvu_image", "fvu_text", "l0", "l0_image", "l0_text", "never_active_fraction",
                    "never_active_fraction_image", "never_active_fraction_text")
SAE_TRAINING_KEYS = ("dead_fraction", "dead_fraction_image", "dead_fraction_text")
NEURON_PROPERTIES = [
    ("n_cases", "noun cases"),
    ("semantic_sensitivity", "semantic sensitivity (top tokens match the noun)"),
    ("specificity_overlap", "top-neuron overlap across nouns (lower = more specific)"),
    ("invariance_overlap", "top-neuron overlap for a noun across images"),
    ("noun_removed_rate_top", "noun removed by noise on the top-k neurons"),
    ("noun_removed_rate_random", "noun removed by noise on k random neurons"),
]
CAUSAL_COLUMNS = ("noun_prob_drop_top", "noun_prob_drop_random", "fluency_change_top", "fluency_change_random")
VALIDATION_COLUMNS = ("pearson_r", "sign_agreement", "n_features")


def sae_view(metrics: dict, heldout_ids: list | None) -> dict:
    """Held-out and training-window metrics, token norms by modality, excluded tokens, and the
    held-out split (``heldout.json``: sample ids held out, whole images at a time)."""
    ho = metrics.get("heldout") or {}

    def pick(k):  # newer keys may sit at the top level or under "heldout"
        return metrics.get(k, ho.get(k))

    norms = metrics.get("token_norms") or ho.get("token_norms") or {}
    return {
        "heldout": [(k, ho.get(k)) for k in SAE_HELDOUT_KEYS],
        "training": [(k, metrics.get(k)) for k in SAE_TRAINING_KEYS],
        "training_notes": {k: metrics.get(f"{k}_null_reason") for k in SAE_TRAINING_KEYS if metrics.get(f"{k}_null_reason")},
        "dead_tokens_seen": metrics.get("dead_tokens_seen"),
        "n_heldout_tokens": ho.get("n_tokens"),
        "fvu_including_excluded": pick("fvu_including_excluded"),
        "n_excluded_tokens": pick("n_excluded_tokens"),
        "token_norms": [(m, norms[m]) for m in ("all", "image", "text") if isinstance(norms.get(m), dict)],
        "n_heldout_samples": None if heldout_ids is None else len(heldout_ids),
    }


LOSS_RECOVERED_ROWS = (("ce_clean", "CE clean"), ("ce_sae", "CE with the SAE spliced in"), ("ce_zero", "CE zero-ablated"),
                       ("ce_mean", "CE mean-ablated"), ("ce_loss_recovered", "loss recovered (zero ablation)"),
                       ("ce_loss_recovered_mean", "loss recovered (mean ablation)"), ("kl_div", "KL(clean ‖ SAE spliced)"),
                       ("n_tokens", "tokens"))


LOSS_RECOVERED_LABELS = {"text": "ours (trained positions; text/answer tokens)",
                         "answer": "ours (trained positions; text/answer tokens)",
                         "all_positions": "SAELens-style (all positions, all tokens)"}


def loss_recovered_view(result: dict) -> dict:
    """The table "Loss recovered (held-out, spliced SAE)" from ``loss_recovered.json``: one row per
    metric, one column per token set (text, answer: ours; all_positions: SAELens-style, when the
    result has it), each with its ``label``; a set that is null shows its reason."""
    names = ("text", "answer", "all_positions") if "all_positions" in result else ("text", "answer")
    parts = [(name, result.get(name), result.get(f"{name}_null_reason")) for name in names]
    return {
        "columns": [{"name": name, "label": LOSS_RECOVERED_LABELS[name],
                     "reason": None if r is not None else (reason or "not computed")} for name, r, reason in parts],
        "rows": [(label, [None if r is None else r.get(key) for _, r, _ in parts]) for key, label in LOSS_RECOVERED_ROWS],
        "n_samples": len(result.get("samples") or []),
        "n_heldout_samples": result.get("n_heldout_samples"),
        "spliced_positions": result.get("spliced_positions"),
    }


def explanation_view(row: dict | None) -> dict | None:
    """The explanation line of a feature card: ``status``, ``text``, a ``detail`` for why there is
    none, the explainer's name and prompt version, and the raw answer when useful."""
    if row is None:
        return None
    detail = {"no_explanation": "the explainer found nothing in common",
              "unparsed": "no [EXPLANATION] line in the answer",
              "failed": f"request failed: {row.get('error')}"}.get(row.get("status"), row.get("status"))
    return {"status": row.get("status"), "text": row.get("explanation"), "detail": detail,
            "model": Path(row.get("explainer_model") or "").name, "prompt_version": row.get("prompt_version"),
            "raw": row.get("raw_response")}


def feature_cards(features: list[int], stats: pl.DataFrame, maps: pl.DataFrame, contexts: pl.DataFrame,
                  maps_dir: Path, explanations: pl.DataFrame | None) -> list[dict]:
    """One card per selected feature: statistics, top images (highlight + heatmap paths), top text
    contexts (as :func:`~mmsae.report.views.context_tokens`) and the explanation."""
    stat_by = {r["feature"]: r for r in stats.iter_rows(named=True)}
    expl = {r["feature"]: r for r in explanations.iter_rows(named=True)} if explanations is not None else {}
    cards = []
    for f in features:
        images = [{**r, "highlight": maps_dir / r["highlight"], "heatmap": maps_dir / r["heatmap"]}
                  for r in maps.filter(pl.col("feature") == f).sort("rank").iter_rows(named=True)]
        ctx = [context_tokens(r["tokens"], r["activations"], r["focus"])
               for r in contexts.filter(pl.col("feature") == f).sort("rank").iter_rows(named=True)]
        cards.append({"feature": f, "stat": stat_by.get(f, {}), "images": images, "contexts": ctx,
                      "explanation": explanation_view(expl.get(f))})
    return cards


def steering_verdict(r: dict) -> dict:
    """``mark``: ``success`` (only when the row's ``success`` is true), ``not_toward`` / ``not_fluent``
    (changed, but not toward the feature / not fluent), ``unchanged``, or ``changed`` (older
    outputs without a verdict); ``ppl_ratio``: perplexity after / before, when both are known."""
    before, after = r.get("ppl_before"), r.get("ppl_after")
    ratio = after / before if not missing(before) and not missing(after) and before > 0 else None
    if r.get("success") is True:
        mark = "success"
    elif not r.get("changed"):
        mark = "unchanged"
    elif r.get("toward_feature") is False:
        mark = "not_toward"
    elif r.get("toward_feature") is True and r.get("success") is False:
        mark = "not_fluent"
    else:
        mark = "changed"
    return {"mark": mark, "ppl_ratio": ratio}


def steering_tally(steering: pl.DataFrame) -> dict | None:
    """The steered generations' successes beside their control's
    (:func:`mmsae.interventions.verdict.control_features`: each text judged by every other feature's words):
    ``n`` generations, ``success`` and ``toward`` over all of them; over the ``n_control`` that have
    controls, their own ``success_c`` and ``toward_c`` counts and the control's expected counts
    ``control_success`` and ``control_toward`` (sums of the per-generation fractions); ``n_controls``,
    the most control features any generation had. None for outputs without the control columns."""
    if "control_success" not in steering.columns:
        return None
    c = steering.filter(pl.col("control_success").is_not_null())
    return {"n": steering.height, "success": int(steering["success"].sum()),
            "toward": int(steering["toward_feature"].fill_null(False).sum()),
            "n_control": c.height, "success_c": int(c["success"].sum()), "toward_c": int(c["toward_feature"].fill_null(False).sum()),
            "control_success": float(c["control_success"].sum()), "control_toward": float(c["control_toward"].sum()),
            "n_controls": int(c["control_features"].list.len().max() or 0) if c.height else 0}


def steering_view(steering: pl.DataFrame) -> dict:
    """One group per (feature, prompt, image): the unclamped text, then each clamp value's text
    with its verdict; and the tally beside its control (:func:`steering_tally`)."""
    if steering.is_empty():
        return {"groups": []}
    groups = []
    for (f, prompt, image), g in steering.group_by(["feature", "prompt", "image"], maintain_order=True):
        rows = []
        for r in g.sort("value").iter_rows(named=True):
            label = f"{r['value']:g}× max = {r['clamp_value']:.3g}" if r["scale"] == "max_multiple" else f"{r['clamp_value']:.3g}"
            rows.append({"label": label, "text": r["text_after"], "empty": not r["text_after"].strip(), **steering_verdict(r)})
        groups.append({"feature": f, "prompt": prompt, "image": Path(image).name if image else None,
                       "before": g["text_before"][0], "rows": rows})
    return {"groups": groups, "mode": steering["mode"][0], "positions": steering["positions"][0], "tally": steering_tally(steering),
            "has_verdict": "success" in steering.columns,
            "special_unsteered": "special_tokens_steered" in steering.columns and not steering["special_tokens_steered"][0]}


def attribution_view(summary: dict, attr_dir: Path) -> dict:
    """Cases with their validation: the newer ``{"ours", "reference"}`` table when present, else the
    older Pearson r over ablated features."""
    cases = []
    for c in summary.get("cases", []):
        v = c.get("validation") or {}
        table = [(name, v[name]) for name in ("ours", "reference") if isinstance(v.get(name), dict)]
        maps = [{**m, "png": attr_dir / m["png"]} for m in c.get("maps", []) if m.get("view", 0) <= 1]
        cases.append({**c, "validation_table": table, "pearson": v.get("pearson"), "n_validated": len(v.get("features", [])),
                      "image_name": Path(c["image"]).name if c.get("image") else None, "map_items": maps,
                      "tokens": signed_tokens(c.get("text_tokens", []), c.get("text_attribution", []))})
    return {"cases": cases, "columns": VALIDATION_COLUMNS}


def neurons_view(props: dict, captions: pl.DataFrame, neurons: pl.DataFrame, tokens: pl.DataFrame,
                 edits: pl.DataFrame, neuron_dir: Path, per_case: int = 5) -> dict:
    """Properties present in ``properties.json``, the causal sweep over noise scales, captions with
    each noun's top neurons (with their top tokens and heatmaps), and the edits."""
    toks: dict = {}
    for r in tokens.iter_rows(named=True) if tokens.height else []:
        toks.setdefault((r["layer"], r["neuron"]), []).append(r["token"])
    maps_by: dict = {}
    for m in props.get("maps", []):
        maps_by.setdefault(m["case"], []).append(m)
    caps = []
    for c in captions.iter_rows(named=True):
        nouns = []
        if neurons.height:
            for (case, noun), g in neurons.filter(pl.col("sample") == c["sample"]).group_by(["case", "noun"], maintain_order=True):
                top = [{**r, "tokens": " ".join(toks.get((r["layer"], r["neuron"]), [])[:5])}
                       for r in g.sort("rank").head(per_case).iter_rows(named=True)]
                figs = [{"src": neuron_dir / m[k], "label": f"L{m['layer']}.{m['neuron']} {'top 5%' if k == 'mask_png' else 'heatmap'}"}
                        for m in maps_by.get(case, []) for k in ("png", "mask_png") if m.get(k)]
                nouns.append({"noun": noun, "neurons": top, "figures": figs})
        caps.append({"sample": c["sample"], "caption": c["caption"], "nouns_listed": ", ".join(c["nouns"]) or "none", "nouns": nouns})
    sweep = [s for s in props.get("causal_sweep") or [] if isinstance(s, dict)]
    at = props.get("causal_at_scale")
    return {
        "properties": [(label, props[k]) for k, label in NEURON_PROPERTIES if k in props],
        "sweep": sweep, "sweep_columns": CAUSAL_COLUMNS, "causal_scale": props.get("causal_scale"),
        "causal_at_scale": sorted(at.items()) if isinstance(at, dict) else ([("value", at)] if at is not None else []),
        "captions": caps,
        "edits": list(edits.iter_rows(named=True)) if edits.height and "method" in edits.columns else [],
    }


def evaluation_view(summary: dict) -> dict:
    """Table 1 rows with each metric's explained value, its CI, and the random baseline (mean ± std);
    metrics in ``unavailable`` are marked so."""
    un = summary.get("unavailable") or {}
    rows = []
    for row in summary.get("table", []):
        cells = {}
        for metric in ("iou", "clip_score"):
            if metric in un:
                cells[metric] = None
                continue
            ci = row.get(f"{metric}_ci")
            cells[metric] = {"explained": row.get(f"{metric}_explained"),
                             "ci": ci if ci and not missing(ci[0]) else None,
                             "random": row.get(f"{metric}_random"), "random_std": row.get(f"{metric}_random_std")}
        rows.append({"category": row.get("category"), "n_features": row.get("n_features"), **cells})
    return {"rows": rows, "unavailable": list(un.items()), "n_with_phrase": summary.get("n_with_phrase", 0),
            "n_refined": summary.get("n_refined", 0)}


__all__ = ["attribution_view", "evaluation_view", "feature_cards", "neurons_view", "sae_view", "steering_view",
           "steering_verdict", "explanation_view"]

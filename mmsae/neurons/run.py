"""The two neuron stages of the workflow: :func:`find_all` (caption, find nouns, score every FFN
neuron, map the top ones, measure their properties) and :func:`edit_all` (edit a source noun into a
target noun through the top neurons and measure the edit). arXiv 2311.07470; editing is our design
(docs/methods.md, 'Multimodal neurons')."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmsae.core.progress import track
from mmsae.models import image_token_coordinates, token_layout
from mmsae.neurons.edit import apply_delta, closed_form_edit, optimised_edit, revert
from mmsae.neurons.find import (
    CoefficientCapture, caption, mlp_modules, neuron_top_tokens, noun_targets, projection_columns, score_neurons,
)
from mmsae.neurons.properties import properties
from mmsae.neurons.samples import has_word, load_sample_image


def find_all(subject, samples: list[dict], cfg: dict) -> dict:
    """Caption every sample, find its nouns, score all neurons, map the top ones, measure properties.

    Args:
        samples: ``{"name", "prompt", "image" (path or None)}`` each.
        cfg: ``prompt_prefix``, ``max_new_tokens``, ``coefficient``, ``top_k``, ``heatmap_neurons``,
            ``top_tokens``, ``causal_k``, ``noise_scales``, ``fluency_tolerance``, ``causal_cases``, ``seed``.

    Returns:
        ``{"captions": [...], "neurons": [...rows], "tokens": [...rows], "grids": {(case, layer, i): grid},
        "properties": {...}}``.
    """

    model, tok = subject.model, subject.tokenizer
    mlps = mlp_modules(model)
    captions, rows, grids, cases = [], [], {}, []
    for s in track(samples, "find_neurons", unit="samples"):
        image = load_sample_image(s)
        captioned = caption(subject, image, s["prompt"], cfg["prompt_prefix"], cfg["max_new_tokens"], s["name"])
        full = captioned.inputs
        targets = noun_targets(tok, captioned.ids, captioned.start)
        captions.append({"sample": s["name"], "image": s["image"], "caption": captioned.text, "nouns": [t.noun for t in targets]})
        if not targets:
            continue
        with CoefficientCapture(mlps, cfg["coefficient"]) as cap, torch.no_grad():
            model(**full, use_cache=False)
        coeffs = cap.stacked()
        columns = projection_columns(model, [t.token_id for t in targets])
        layout = None
        if image is not None:
            coords = image_token_coordinates(model, full["image_sizes"].cpu())[0]
            layout = token_layout(subject, full["input_ids"][0].cpu(), coords, s["name"])
        for j, t in enumerate(targets):
            top = score_neurons(coeffs, columns, t.position, j, cfg["top_k"])
            case = f"{s['name']}:{t.noun}:{t.position}"
            cases.append({"case": case, "sample": s, "noun": t.noun, "token_id": t.token_id, "position": t.position,
                          "top": top, "full": full, "start": captioned.start})
            for rank, (layer, i, score, a) in enumerate(top):
                rows.append({"case": case, "sample": s["name"], "noun": t.noun, "token": tok.decode([t.token_id]),
                             "position": t.position, "rank": rank, "layer": layer, "neuron": i, "score": score, "activation": a})
            if layout is not None:
                base = np.nonzero(layout["view"] == 0)[0]
                side = int(layout["patch_row"][base].max()) + 1
                for layer, i, *_ in top[: cfg["heatmap_neurons"]]:
                    grid = np.zeros((side, side), np.float32)
                    grid[layout["patch_row"][base], layout["patch_col"][base]] = coeffs[layer, base, i].float().numpy()
                    grids[(case, layer, i)] = grid
    distinct = list(dict.fromkeys((r["layer"], r["neuron"]) for r in rows if r["rank"] < cfg["top_tokens"]))
    tokens = []
    for layer, i in distinct:
        ids, vals = neuron_top_tokens(model, layer, i, 10)
        tokens += [{"layer": layer, "neuron": i, "rank": r, "token": tok.decode([t]), "value": v} for r, (t, v) in enumerate(zip(ids, vals))]
    return {"captions": captions, "neurons": rows, "tokens": tokens, "grids": grids,
            "properties": properties(subject, cases, tokens, cfg), "cases": cases}


def edit_all(subject, cases: list[dict], edits: list[dict], locality_prompts: list[str], cfg: dict, out_dir) -> list[dict]:
    """Apply each configured edit (source noun -> target noun) in both variants and measure it.

    Each edit uses the first case whose noun is the source (or, with ``source: auto``, the first
    case). Success: the regenerated caption has the target and not the source. Generality: other
    cases with the same source noun whose caption now has the target. Locality: text prompts whose
    generation is unchanged. Deltas are saved to ``out_dir/<name>-<method>.safetensors``.
    """
    model, tok = subject.model, subject.tokenizer
    results, before = [], None
    for e in track(edits, "edit_neurons", unit="edits"):
        match = [c for c in cases if e["source"] in ("auto", c["noun"])]
        if not match:
            results.append({"name": e["name"], "source": e["source"], "target": e["target"], "status": "source noun not found"})
            continue
        c = match[0]
        target_id = tok.encode(" " + e["target"], add_special_tokens=False)[0]
        neurons = [(layer, i, a) for layer, i, _, a in c["top"][: cfg["edit_k"]]]
        if before is None:  # the unedited model's generations: the same for every edit
            before = {p: _generate(subject, None, p, "", cfg) for p in locality_prompts}
        for method in ("closed_form", "optimised"):
            if method == "closed_form":
                delta, eta = closed_form_edit(model, c["full"], c["position"], neurons, c["token_id"], target_id, cfg.get("eta"))
            else:
                delta, eta = optimised_edit(model, c["full"], c["position"], neurons, target_id, steps=cfg["opt_steps"]), None
            path = Path(out_dir) / f"{e['name']}-{method}.safetensors"
            delta.save(path, {"source": c["noun"], "target": e["target"], "method": method})
            saved = apply_delta(model, delta)
            try:
                edited = caption(subject, load_sample_image(c["sample"]), c["sample"]["prompt"], cfg["prompt_prefix"], cfg["max_new_tokens"]).text
                others = [o for o in cases if o["noun"] == c["noun"] and o["sample"]["name"] != c["sample"]["name"]]
                gen = [has_word(caption(subject, load_sample_image(o["sample"]), o["sample"]["prompt"], cfg["prompt_prefix"],
                                         cfg["max_new_tokens"]).text, e["target"]) for o in others]
                after = {p: _generate(subject, None, p, "", cfg) for p in locality_prompts}
            finally:
                revert(model, saved)
            results.append({
                "name": e["name"], "method": method, "source": c["noun"], "target": e["target"], "case": c["case"],
                "status": "ok", "eta": eta, "n_neurons": len(neurons), "delta_path": path.name,
                "caption_after": edited, "success": has_word(edited, e["target"]) and not has_word(edited, c["noun"]),
                "target_in_caption": has_word(edited, e["target"]),
                "generality": float(np.mean(gen)) if gen else None, "n_generality": len(gen),
                "locality": float(np.mean([before[p] == after[p] for p in locality_prompts])) if locality_prompts else None,
            })
    return results


def _generate(subject, image, prompt: str, prefix: str, cfg: dict) -> str:
    return caption(subject, image, prompt, prefix, cfg["max_new_tokens"]).text

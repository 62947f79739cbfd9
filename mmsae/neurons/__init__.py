"""Multimodal neurons (arXiv 2311.07470): find them without gradients, map them, test their
properties, and edit them. :func:`find_all` and :func:`edit_all` are the two workflow stages."""

from __future__ import annotations

import re

import numpy as np
import torch

from mmsae.data.corpus import load_image
from mmsae.models import image_token_coordinates, token_layout
from mmsae.neurons.edit import (
    Delta, apply_delta, closed_form_edit, mean_pairwise_overlap, noise_delta, optimised_edit, random_neurons, revert,
)
from mmsae.neurons.find import (
    CoefficientCapture, caption, mlp_modules, neuron_top_tokens, noun_targets, projection_columns, score_neurons,
)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}s?\b", text.lower()) is not None


def _load(sample):
    if not sample["image"]:
        return None
    image, status = load_image(sample["image"])
    if image is None:
        raise ValueError(f"neurons: image {sample['image']}: {status}")
    return image


def find_all(subject, samples: list[dict], cfg: dict) -> dict:
    """Caption every sample, find its nouns, score all neurons, map the top ones, measure properties.

    Args:
        samples: ``{"name", "prompt", "image" (path or None)}`` each.
        cfg: ``prompt_prefix``, ``max_new_tokens``, ``coefficient``, ``top_k``, ``heatmap_neurons``,
            ``top_tokens``, ``causal_k``, ``noise_scale``, ``causal_cases``, ``seed``.

    Returns:
        ``{"captions": [...], "neurons": [...rows], "tokens": [...rows], "grids": {(case, layer, i): grid},
        "properties": {...}}``.
    """
    model, tok = subject.model, subject.tokenizer
    mlps = mlp_modules(model)
    captions, rows, grids, cases = [], [], {}, []
    for s in samples:
        image = _load(s)
        full, ids, start, text = caption(subject, image, s["prompt"], cfg["prompt_prefix"], cfg["max_new_tokens"], s["name"])
        targets = noun_targets(tok, ids, start)
        captions.append({"sample": s["name"], "image": s["image"], "caption": text, "nouns": [t.noun for t in targets]})
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
                          "top": top, "full": full})
            for rank, (l, i, score, a) in enumerate(top):
                rows.append({"case": case, "sample": s["name"], "noun": t.noun, "token": tok.decode([t.token_id]),
                             "position": t.position, "rank": rank, "layer": l, "neuron": i, "score": score, "activation": a})
            if layout is not None:
                base = np.nonzero(layout["view"] == 0)[0]
                side = int(layout["patch_row"][base].max()) + 1
                for l, i, *_ in top[: cfg["heatmap_neurons"]]:
                    grid = np.zeros((side, side), np.float32)
                    grid[layout["patch_row"][base], layout["patch_col"][base]] = coeffs[l, base, i].float().numpy()
                    grids[(case, l, i)] = grid
    distinct = list(dict.fromkeys((r["layer"], r["neuron"]) for r in rows if r["rank"] < cfg["top_tokens"]))
    tokens = []
    for l, i in distinct:
        ids, vals = neuron_top_tokens(model, l, i, 10)
        tokens += [{"layer": l, "neuron": i, "rank": r, "token": tok.decode([t]), "value": v} for r, (t, v) in enumerate(zip(ids, vals))]
    return {"captions": captions, "neurons": rows, "tokens": tokens, "grids": grids,
            "properties": properties(subject, cases, tokens, cfg), "cases": cases}


def properties(subject, cases: list[dict], tokens: list[dict], cfg: dict) -> dict:
    """Semantic sensitivity, specificity, cross-image invariance and the causal effect of noise."""
    top_tok: dict[tuple[int, int], list[str]] = {}
    for r in tokens:
        top_tok.setdefault((r["layer"], r["neuron"]), []).append(r["token"].strip().lower())
    n = cfg["top_tokens"]
    hits = [any(t and (c["noun"].startswith(t) or t.startswith(c["noun"])) for t in top_tok.get((l, i), []))
            for c in cases for l, i, *_ in c["top"][:n]]
    sets = {(c["sample"]["name"], c["noun"]): {(l, i) for l, i, *_ in c["top"]} for c in cases}
    effect = causal_effect(subject, cases[: cfg["causal_cases"]], cfg)
    return {"n_cases": len(cases), "semantic_sensitivity": float(np.mean(hits)) if hits else None,
            "specificity_overlap": mean_pairwise_overlap(sets, same=False),
            "invariance_overlap": mean_pairwise_overlap(sets, same=True), **effect}


@torch.no_grad()
def causal_effect(subject, cases: list[dict], cfg: dict) -> dict:
    """Noise on the top-k neurons vs k random ones; the rate at which the noun leaves the caption."""
    gone = {"top": [], "random": []}
    k = cfg["causal_k"]
    for c_i, c in enumerate(cases):
        image = _load(c["sample"])
        for kind in ("top", "random"):
            neurons = [(l, i) for l, i, *_ in c["top"][:k]] if kind == "top" else random_neurons(subject.model, k, cfg["seed"] + c_i)
            saved = apply_delta(subject.model, noise_delta(subject.model, neurons, cfg["noise_scale"], cfg["seed"] + c_i))
            try:
                _, _, _, text = caption(subject, image, c["sample"]["prompt"], cfg["prompt_prefix"], cfg["max_new_tokens"])
            finally:
                revert(subject.model, saved)
            gone[kind].append(not _has_word(text, c["noun"]))
    rate = {k_: float(np.mean(v)) if v else None for k_, v in gone.items()}
    return {"causal_cases": len(cases), "noun_removed_rate_top": rate["top"], "noun_removed_rate_random": rate["random"]}


def edit_all(subject, cases: list[dict], edits: list[dict], locality_prompts: list[str], cfg: dict, out_dir) -> list[dict]:
    """Apply each configured edit (source noun -> target noun) in both variants and measure it.

    Each edit uses the first case whose noun is the source (or, with ``source: auto``, the first
    case). Success: the regenerated caption has the target and not the source. Generality: other
    cases with the same source noun whose caption now has the target. Locality: text prompts whose
    generation is unchanged. Deltas are saved to ``out_dir/<name>-<method>.safetensors``.
    """
    from pathlib import Path

    model, tok = subject.model, subject.tokenizer
    results = []
    for e in edits:
        match = [c for c in cases if e["source"] in ("auto", c["noun"])]
        if not match:
            results.append({"name": e["name"], "source": e["source"], "target": e["target"], "status": "source noun not found"})
            continue
        c = match[0]
        target_id = tok.encode(" " + e["target"], add_special_tokens=False)[0]
        neurons = [(l, i, a) for l, i, _, a in c["top"][: cfg["edit_k"]]]
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
                edited = caption(subject, _load(c["sample"]), c["sample"]["prompt"], cfg["prompt_prefix"], cfg["max_new_tokens"])[3]
                others = [o for o in cases if o["noun"] == c["noun"] and o["sample"]["name"] != c["sample"]["name"]]
                gen = [_has_word(caption(subject, _load(o["sample"]), o["sample"]["prompt"], cfg["prompt_prefix"],
                                         cfg["max_new_tokens"])[3], e["target"]) for o in others]
                after = {p: _generate(subject, None, p, "", cfg) for p in locality_prompts}
            finally:
                revert(model, saved)
            results.append({
                "name": e["name"], "method": method, "source": c["noun"], "target": e["target"], "case": c["case"],
                "status": "ok", "eta": eta, "n_neurons": len(neurons), "delta_path": path.name,
                "caption_after": edited, "success": _has_word(edited, e["target"]) and not _has_word(edited, c["noun"]),
                "target_in_caption": _has_word(edited, e["target"]),
                "generality": float(np.mean(gen)) if gen else None, "n_generality": len(gen),
                "locality": float(np.mean([before[p] == after[p] for p in locality_prompts])) if locality_prompts else None,
            })
    return results


def _generate(subject, image, prompt: str, prefix: str, cfg: dict) -> str:
    return caption(subject, image, prompt, prefix, cfg["max_new_tokens"])[3]

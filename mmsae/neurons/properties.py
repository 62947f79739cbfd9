"""Properties of multimodal neurons (arXiv 2311.07470 §4): semantic sensitivity, specificity,
cross-image invariance, and the causal effect of noise on their output weights."""

from __future__ import annotations

import numpy as np
import torch

from mmsae.neurons.edit import apply_delta, mean_pairwise_overlap, noise_delta, random_neurons, revert
from mmsae.neurons.find import caption
from mmsae.neurons.samples import has_word, load_sample_image


def properties(subject, cases: list[dict], tokens: list[dict], cfg: dict) -> dict:
    """Semantic sensitivity, specificity, cross-image invariance and the causal effect of noise."""
    top_tok: dict[tuple[int, int], list[str]] = {}
    for r in tokens:
        top_tok.setdefault((r["layer"], r["neuron"]), []).append(r["token"].strip().lower())
    n = cfg["top_tokens"]
    hits = [any(t and (c["noun"].startswith(t) or t.startswith(c["noun"])) for t in top_tok.get((layer, i), []))
            for c in cases for layer, i, *_ in c["top"][:n]]
    sets = {(c["sample"]["name"], c["noun"]): {(layer, i) for layer, i, *_ in c["top"]} for c in cases}
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
        image = load_sample_image(c["sample"])
        for kind in ("top", "random"):
            neurons = ([(layer, i) for layer, i, *_ in c["top"][:k]] if kind == "top"
                       else random_neurons(subject.model, k, cfg["seed"] + c_i))
            saved = apply_delta(subject.model, noise_delta(subject.model, neurons, cfg["noise_scale"], cfg["seed"] + c_i))
            try:
                text = caption(subject, image, c["sample"]["prompt"], cfg["prompt_prefix"], cfg["max_new_tokens"]).text
            finally:
                revert(subject.model, saved)
            gone[kind].append(not has_word(text, c["noun"]))
    rate = {k_: float(np.mean(v)) if v else None for k_, v in gone.items()}
    return {"causal_cases": len(cases), "noun_removed_rate_top": rate["top"], "noun_removed_rate_random": rate["random"]}

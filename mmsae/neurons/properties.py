"""Properties of multimodal neurons (arXiv 2311.07470 §4): semantic sensitivity, specificity,
cross-image invariance, and the causal effect of noise on their output weights.

Semantic sensitivity (:func:`semantic_hit`): a (case, neuron) pair is a hit when one of the
neuron's top tokens, stripped and lower-cased, or that token's lemma ("dogs" -> "dog"), *is* the
noun - the noun itself, its lemma, or, when the noun spans several tokens, the noun's first
sub-token (the token its score was computed for). The released code (opanhw/MM_Neurons ``src/preparation.py`` lines 63-77 and
``src/trainer.py`` lines 479-485) only lists each neuron's top 10 decoded tokens next to the noun and
computes no hit rate; our earlier rule counted any prefix ("s" for "scarf") and is gone.

Causal effect (:func:`causal_sweep`), teacher-forced on the original caption. The released code
(``src/trainer.py`` lines 210-226 and 259-271) adds ``randn * sigma`` to the W_out rows of the
top-k neurons, or of k neurons drawn from all layers, and regenerates the caption; at a large sigma
the captions are gibberish and "the noun disappeared" measures the collapse, not the neurons' role.
We instead, per noise scale s (noise std = s x the layer's W_out std), compare the top-k neurons with
k random neurons *of the same layers* (as many per layer as the top-k have there), on the caption the
unperturbed model wrote:

* noun_prob_drop = P(noun token | prefix) before - after, at the position that predicts the noun;
* fluency_change = (LL' - LL) / |LL| with LL the log-likelihood of the caption's other generated
  tokens (summed over cases before the ratio); negative = less fluent.

The chosen scale (``causal_scale``) is the largest whose random-neuron fluency change is within
``fluency_tolerance`` (10 % by default): noise that leaves the caption's fluency alone when it hits
random neurons, so that what it does to the noun through the top neurons is their role.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from lemminflect import getLemma

from mmsae.neurons.edit import apply_delta, mean_pairwise_overlap, noise_delta, revert
from mmsae.neurons.find import mlp_modules

SWEEP_KEYS = ("scale", "noun_prob_drop_top", "noun_prob_drop_random", "fluency_change_top", "fluency_change_random")


def noun_forms(noun: str, noun_token: str) -> set[str]:
    """The strings a top token may equal to count for ``noun``: the noun, its NOUN lemmas, and the
    decoded first sub-token ``noun_token`` when it is not the whole noun (all stripped, lower-cased)."""
    noun = noun.strip().lower()
    forms = {noun, *(lemma.lower() for lemma in getLemma(noun, upos="NOUN"))}
    first = noun_token.strip().lower()
    if first and first != noun:
        forms.add(first)
    return forms


def _token_forms(token: str) -> set[str]:
    """A top token stripped and lower-cased, with its NOUN lemmas (lemminflect, as for the noun)."""
    t = token.strip().lower()
    return {t, *(lemma.lower() for lemma in getLemma(t, upos="NOUN"))} if t else {t}


def semantic_hit(noun: str, noun_token: str, top_tokens: list[str]) -> bool:
    """True when a top token (stripped, lower-cased) or its NOUN lemma equals one of
    :func:`noun_forms`: "dogs" hits "dog" and "dog" hits "dogs"."""
    forms = noun_forms(noun, noun_token)
    return any(_token_forms(t) & forms for t in top_tokens)


def semantic_sensitivity(cases: list[dict], tokens: list[dict], tokenizer, n_neurons: int) -> float | None:
    """Fraction of (case, neuron) pairs, over each case's first ``n_neurons`` top neurons, that are
    :func:`semantic_hit` s. ``tokens``: rows {layer, neuron, token} (a neuron's top tokens); None
    without pairs."""
    top_tok: dict[tuple[int, int], list[str]] = {}
    for r in tokens:
        top_tok.setdefault((r["layer"], r["neuron"]), []).append(r["token"])
    hits = [semantic_hit(c["noun"], tokenizer.decode([c["token_id"]]), top_tok.get((layer, i), []))
            for c in cases for layer, i, *_ in c["top"][:n_neurons]]
    return float(np.mean(hits)) if hits else None


def properties(subject, cases: list[dict], tokens: list[dict], cfg: dict) -> dict:
    """Semantic sensitivity, specificity, cross-image invariance and the causal sweep.

    ``cfg``: ``top_tokens``, ``causal_cases``, ``causal_k``, ``noise_scales``, ``fluency_tolerance``,
    ``seed``. Cases need ``full`` (the caption's inputs), ``position``, ``token_id``, ``top``, ``noun``.
    """
    sets = {(c["sample"]["name"], c["noun"]): {(layer, i) for layer, i, *_ in c["top"]} for c in cases}
    causal = cases[: cfg["causal_cases"]]
    sweep = causal_sweep(subject.model, causal, cfg["causal_k"], cfg["noise_scales"], cfg["seed"])
    return {"n_cases": len(cases),
            "semantic_sensitivity": semantic_sensitivity(cases, tokens, subject.tokenizer, cfg["top_tokens"]),
            "specificity_overlap": mean_pairwise_overlap(sets, same=False),
            "invariance_overlap": mean_pairwise_overlap(sets, same=True),
            "causal_cases": len(causal), **choose_scale(sweep, cfg["fluency_tolerance"])}


def layer_matched_random(model, neurons: list[tuple[int, int]], seed: int) -> list[tuple[int, int]]:
    """As many random neurons in each layer as ``neurons`` has there, none of ``neurons`` themselves."""
    d_ff = mlp_modules(model)[0].down_proj.weight.shape[1]
    rng, taken = random.Random(seed), set(neurons)
    out = []
    for layer in sorted({layer for layer, _ in neurons}):
        n = sum(1 for lay, _ in neurons if lay == layer)
        pool = [i for i in range(d_ff) if (layer, i) not in taken]
        out += [(layer, i) for i in sorted(rng.sample(pool, n))]
    return out


@torch.no_grad()
def _caption_scores(model, case: dict) -> tuple[float, float]:
    """(P(noun token) at its predicting position, log-likelihood of the caption's other generated tokens)."""
    ids = case["full"]["input_ids"][0]
    logp = F.log_softmax(model(**case["full"], use_cache=False).logits[0].float(), -1)
    p, noun_at = case["position"], case["position"] + 1
    rest = [q for q in range(case["start"], len(ids)) if q != noun_at]
    ll = float(sum(logp[q - 1, ids[q]] for q in rest)) if rest else 0.0
    return float(logp[p, case["token_id"]].exp()), ll


@torch.no_grad()
def causal_sweep(model, cases: list[dict], k: int, scales: list[float], seed: int) -> list[dict]:
    """Per noise scale, the noun-probability drop and the fluency change for the top-k neurons and
    k layer-matched random neurons (module docstring), averaged over ``cases``.

    Each case needs ``full`` (processor inputs of prompt + caption, batch 1), ``start`` (index of the
    first generated token), ``position`` (predicting the noun), ``token_id`` and ``top``. The same
    noise seed is used for top and random neurons. Returns rows with :data:`SWEEP_KEYS`; empty
    without cases.
    """
    if not cases:
        return []
    base = [_caption_scores(model, c) for c in cases]
    rows = []
    for scale in scales:
        row = {"scale": float(scale)}
        for kind in ("top", "random"):
            drops, ll_before, ll_after = [], 0.0, 0.0
            for c_i, (c, (p0, ll0)) in enumerate(zip(cases, base)):
                top = [(layer, i) for layer, i, *_ in c["top"][:k]]
                neurons = top if kind == "top" else layer_matched_random(model, top, seed + c_i)
                saved = apply_delta(model, noise_delta(model, neurons, scale, seed + c_i))
                try:
                    p1, ll1 = _caption_scores(model, c)
                finally:
                    revert(model, saved)
                drops.append(p0 - p1)
                ll_before, ll_after = ll_before + ll0, ll_after + ll1
            row[f"noun_prob_drop_{kind}"] = float(np.mean(drops))
            row[f"fluency_change_{kind}"] = (ll_after - ll_before) / abs(ll_before) if ll_before else 0.0
        rows.append({key: row[key] for key in SWEEP_KEYS})
    return rows


def choose_scale(sweep: list[dict], tolerance: float) -> dict:
    """``{"causal_sweep", "causal_scale", "causal_scale_reason", "causal_at_scale"}``: the largest scale
    whose |fluency_change_random| <= ``tolerance`` and its row; when none qualifies, scale and row are
    None and the reason says why (the reason is None otherwise)."""
    ok = [r for r in sweep if abs(r["fluency_change_random"]) <= tolerance]
    if not ok:
        why = ("no cases to measure" if not sweep else
               f"at every scale of {[r['scale'] for r in sweep]} noise on random neurons changes fluency by more than "
               f"{tolerance:.0%}")
        return {"causal_sweep": sweep, "causal_scale": None, "causal_scale_reason": why, "causal_at_scale": None}
    best = max(ok, key=lambda r: r["scale"])
    return {"causal_sweep": sweep, "causal_scale": best["scale"], "causal_scale_reason": None, "causal_at_scale": best}

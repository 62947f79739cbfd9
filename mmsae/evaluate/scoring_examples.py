"""The held-out examples that detection and fuzzing show the scorer, after EleutherAI delphi's
method (arXiv 2410.13928 §3: test examples drawn across activation quantiles, plus random
non-activating ones), built from our code table.

Activating examples (:func:`held_out_activating`): for each feature, every sample where it fires on
a token of its modality (text features: text tokens; image features: image tokens) gets its
per-sample maximum activation; the samples the explainer was shown (``shown_examples`` of
``explanations.parquet``) are removed - the whole sample, so no test example overlaps what the
explainer read; the rest are split into ``n_quantiles`` equal-count bins by that maximum
(:func:`quantile_bins`) and ``per_quantile`` samples are drawn from each bin.

* text: the example is the window of tokens (``before``, the focus, ``after``: the shape of the top
  contexts) around the sample's max-activating token, with the feature's activation on each token
  from the codes; fuzzing marks the tokens at or above ``threshold`` x the window's largest
  activation (delphi: 0.3);
* image: the image itself (detection) or the image with the feature's base-view activated region
  highlighted (fuzzing, :func:`mmsae.codes.maps.highlight`).

Non-activating examples, as many as activating ones: text windows of the same shape around random
text tokens of random samples where the feature is 0 on every token (fuzzing marks ``ceil(mean
active tokens per activating window)`` random tokens in them); random corpus images on whose tokens
the feature never fires (fuzzing highlights a random region of ``ceil(mean active patches)``
base-view patches: a wrong region).

Every example is an :class:`Example` carrying its ``sample_id`` and ``token_index`` (the focus
token; -1 for an image: the whole image), which ``scoring.parquet`` records per request. Every
random choice comes from ``numpy.random.default_rng([seed, feature, ...])``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import polars as pl

from mmsae.codes.maps import feature_grids, highlight, png_bytes
from mmsae.data.corpus import load_image
from mmsae.evaluate.scoring_prompts import highlight_tokens, plain_text

IMAGE_TOKEN = "<image>"
METHODS = ("detection", "fuzzing")


class Example(NamedTuple):
    """One example: ``payload`` (text or PNG bytes), ``label`` (1 activating, 0 not), where it comes
    from (``sample_id``, ``token_index``: the focus token, -1 for a whole image) and the activation
    ``quantile`` bin it was drawn from (-1 for a non-activating one)."""

    payload: str | bytes
    label: int
    sample_id: str
    token_index: int
    quantile: int = -1


def sample_maxima(codes: pl.LazyFrame, features: list[int], modality: str) -> pl.DataFrame:
    """Per (feature, sample): the largest activation over the sample's tokens of ``modality`` and the
    token where it is (``feature, sample_id, token_index, activation``; ties: lowest token index)."""
    rows = (codes.filter((pl.col("modality") == modality) & pl.col("feature").is_in(features))
            .select("feature", "sample_id", "token_index", "activation").collect(engine="streaming"))
    return (rows.sort(["feature", "sample_id", "activation", "token_index"], descending=[False, False, True, False])
            .unique(subset=["feature", "sample_id"], keep="first", maintain_order=True))


def quantile_bins(activations: np.ndarray, n_quantiles: int) -> np.ndarray:
    """Equal-count activation bins: bin ``floor(rank * q / n)`` of each value, rank 0 the smallest
    (ties by position), ``q = min(n_quantiles, n)``; 0 is the lowest quantile."""
    n = len(activations)
    if n == 0:
        return np.zeros(0, np.int64)
    q = min(n_quantiles, n)
    rank = np.empty(n, np.int64)
    rank[np.argsort(activations, kind="stable")] = np.arange(n)
    return rank * q // n


def held_out_activating(maxima: pl.DataFrame, shown: set[str], n_quantiles: int, per_quantile: int,
                        rng: np.random.Generator) -> pl.DataFrame:
    """One feature's test samples: ``maxima`` rows (:func:`sample_maxima`) of samples not in
    ``shown``, ``per_quantile`` drawn (without replacement) from each of ``n_quantiles`` bins, with a
    ``quantile`` column; sorted by sample_id."""
    cand = maxima.filter(~pl.col("sample_id").is_in(sorted(shown))).sort("sample_id")
    if cand.is_empty():
        return cand.with_columns(pl.lit(0, pl.Int64).alias("quantile"))
    cand = cand.with_columns(pl.Series("quantile", quantile_bins(cand["activation"].to_numpy(), n_quantiles)))
    keep = []
    for b in range(int(cand["quantile"].max()) + 1):
        idx = np.flatnonzero(cand["quantile"].to_numpy() == b)
        keep += sorted(rng.choice(idx, size=min(per_quantile, len(idx)), replace=False).tolist())
    return cand[sorted(keep)]


def active_text_positions(codes: pl.LazyFrame, features: list[int]) -> dict[int, dict[str, dict[int, float]]]:
    """``{feature: {sample_id: {token index: activation}}}`` on text tokens, from the codes."""
    rows = (codes.filter((pl.col("modality") == "text") & pl.col("feature").is_in(features))
            .select("feature", "sample_id", "token_index", "activation").collect(engine="streaming"))
    out: dict[int, dict[str, dict[int, float]]] = {f: {} for f in features}
    for (f, sid), g in rows.group_by(["feature", "sample_id"]):
        out[f][sid] = dict(zip(g["token_index"].to_list(), g["activation"].to_list()))
    return out


def non_activating_windows(samples: pl.DataFrame, active: dict, n: int, before: int, after: int,
                           rng: np.random.Generator, max_draws: int = 200) -> list[tuple[list[str], str, int]]:
    """Up to ``n`` distinct ``(window, sample_id, focus index)`` (``before`` + 1 + ``after`` tokens, cut
    at the sample's ends) around random text tokens, in which the feature is active on no token.

    Args:
        samples: ``sample_id``, ``tokens`` (list of token strings), sorted by sample_id.
        active: ``{sample_id: active token indices}`` of this feature.
        max_draws: random draws tried at most (fewer windows come back when the corpus is small).
    """
    ids, toks = samples["sample_id"].to_list(), samples["tokens"].to_list()
    texty = [i for i, t in enumerate(toks) if t and any(x != IMAGE_TOKEN for x in t)]
    out, seen = [], set()
    for _ in range(max_draws):
        if len(out) >= n or not texty:
            break
        s = texty[int(rng.integers(len(texty)))]
        tokens = toks[s]
        focus = int(rng.integers(len(tokens)))
        if tokens[focus] == IMAGE_TOKEN:
            continue
        lo, hi = max(0, focus - before), min(len(tokens), focus + after + 1)
        if set(active.get(ids[s], ())) & set(range(lo, hi)):
            continue
        window = list(tokens[lo:hi])
        key = plain_text(window)
        if key.strip() and key not in seen:
            seen.add(key)
            out.append((window, ids[s], focus))
    return out


def fuzz_marks(tokens: list[str], k: int, rng: np.random.Generator) -> set[int]:
    """``k`` random positions (not ``<image>`` placeholders) to mark in a non-activating context."""
    allowed = [i for i, t in enumerate(tokens) if t != IMAGE_TOKEN]
    return set(rng.choice(allowed, size=min(k, len(allowed)), replace=False).tolist()) if allowed else set()


def window_shape(contexts: pl.DataFrame, default: tuple[int, int] = (12, 4)) -> tuple[int, int]:
    """``(before, after)``: the largest number of tokens before and after the focus in the top
    contexts, so the test windows match what the explainer saw (``default`` without contexts)."""
    if contexts.is_empty():
        return default
    n = contexts["tokens"].list.len()
    return int(contexts["focus"].max()), int((n - contexts["focus"] - 1).max())


def text_feature_examples(picked: pl.DataFrame, acts: dict[str, dict[int, float]], tokens_of: dict[str, list[str]],
                          negatives: list[tuple[list[str], str, int]], before: int, after: int, threshold: float,
                          rng: np.random.Generator) -> dict[str, list[Example]]:
    """``{method: [Example]}`` for one text feature from its held-out samples ``picked``
    (:func:`held_out_activating`) and non-activating windows."""
    pos = []
    for sid, focus, q in zip(picked["sample_id"].to_list(), picked["token_index"].to_list(), picked["quantile"].to_list()):
        tokens = tokens_of.get(sid)
        if not tokens:
            continue
        lo, hi = max(0, focus - before), min(len(tokens), focus + after + 1)
        a = [acts.get(sid, {}).get(i, 0.0) for i in range(lo, hi)]
        pos.append((list(tokens[lo:hi]), a, sid, int(focus), int(q)))
    n_marks = math.ceil(np.mean([sum(x > 0 for x in a) for _, a, *_ in pos])) if pos else 1
    detection = ([Example(plain_text(t), 1, s, i, q) for t, _, s, i, q in pos]
                 + [Example(plain_text(t), 0, s, i) for t, s, i in negatives])
    fuzzing = ([Example(highlight_tokens(t, [x >= threshold * max(a) for x in a]), 1, s, i, q) for t, a, s, i, q in pos]
               + [Example(highlight_tokens(t, fuzz_marks(t, n_marks, rng)), 0, s, i) for t, s, i in negatives])
    return {"detection": detection, "fuzzing": fuzzing}


def image_feature_examples(picked: pl.DataFrame, grids: dict, image_of: dict[str, str], negatives: list[tuple[str, str]],
                           side: int, rng: np.random.Generator) -> dict[str, list[Example]]:
    """``{method: [Example]}`` for one image feature: its held-out images ``picked`` (plain, and with
    the activated region of ``grids[(feature, sample_id)]`` highlighted) and ``negatives``
    (``(sample_id, image path)`` where it never fires: plain, and with a random region highlighted)."""
    pos = []
    for f, sid, q in zip(picked["feature"].to_list(), picked["sample_id"].to_list(), picked["quantile"].to_list()):
        image, _ = load_image(image_of[sid]) if sid in image_of else (None, None)
        if image is not None:
            grid = grids[(f, sid)]
            pos.append((png_bytes(image), png_bytes(highlight(image, grid)), sid, int(q), int((grid > 0).sum())))
    n_patches = max(1, math.ceil(np.mean([k for *_, k in pos]))) if pos else 1
    neg = []
    for sid, path in negatives:
        if len(neg) >= len(pos):
            break
        image, _ = load_image(path)
        if image is None:
            continue
        grid = np.zeros((side, side), np.float32)
        grid.flat[rng.choice(side * side, size=min(n_patches, side * side), replace=False)] = 1.0
        neg.append((png_bytes(image), png_bytes(highlight(image, grid)), sid))
    return {"detection": [Example(p, 1, s, -1, q) for p, _, s, q, _ in pos] + [Example(p, 0, s, -1) for p, _, s in neg],
            "fuzzing": [Example(h, 1, s, -1, q) for _, h, s, q, _ in pos] + [Example(h, 0, s, -1) for _, h, s in neg]}


def collect_examples(explained: list[tuple[int, str, str]], *, shown: dict[int, set[str]], contexts: pl.DataFrame,
                     codes: pl.LazyFrame, samples: pl.DataFrame, seed: int, side: int, n_quantiles: int = 10,
                     per_quantile: int = 1, threshold: float = 0.3) -> dict[tuple[int, str], list[Example]]:
    """``{(feature, method): [Example]}`` for every explained feature (see the module doc).

    Args:
        explained: ``(feature, modality, explanation)``; modality says which examples it gets.
        shown: ``{feature: sample ids the explainer was shown}`` (never used as test examples).
        contexts: ``render_maps``' top contexts (their shape sets the test windows' shape).
        codes: lazy frame over the code shards; samples: the samples table (sample_id, image_path,
            tokens) of the same corpus.
        n_quantiles, per_quantile: activating examples drawn per activation-quantile bin.
        side: the base view's patch grid side; threshold: fuzzing's marking threshold.
    """
    text_feats = [f for f, m, _ in explained if m == "text"]
    image_feats = [f for f, m, _ in explained if m == "image"]
    samples = samples.sort("sample_id")
    out: dict[tuple[int, str], list[Example]] = {}
    if text_feats:
        before, after = window_shape(contexts.filter(pl.col("feature").is_in(text_feats)) if contexts.height else contexts)
        acts = active_text_positions(codes, text_feats)
        maxima = sample_maxima(codes, text_feats, "text")
        text_samples = samples.select("sample_id", "tokens")
        tokens_of = dict(zip(text_samples["sample_id"].to_list(), text_samples["tokens"].to_list()))
        for f in text_feats:
            rng = np.random.default_rng([seed, f, 1])
            picked = held_out_activating(maxima.filter(pl.col("feature") == f), shown.get(f, set()), n_quantiles, per_quantile, rng)
            neg = non_activating_windows(text_samples, acts[f], picked.height, before, after, rng)
            ex = text_feature_examples(picked, acts[f], tokens_of, neg, before, after, threshold, rng)
            out.update({(f, m): ex[m] for m in METHODS})
    if image_feats:
        with_image = samples.filter(pl.col("image_path").is_not_null())
        image_of = dict(zip(with_image["sample_id"].to_list(), with_image["image_path"].to_list()))
        maxima = sample_maxima(codes, image_feats, "image")
        active_paths = {f: set() for f in image_feats}
        for f, sid in zip(maxima["feature"].to_list(), maxima["sample_id"].to_list()):
            if sid in image_of:
                active_paths[f].add(image_of[sid])
        first_of_path: dict[str, str] = {}
        for sid, p in image_of.items():
            first_of_path.setdefault(p, sid)
        corpus = sorted(first_of_path.items())  # (path, sample_id), one per image
        picks = {}
        for f in image_feats:
            rng = np.random.default_rng([seed, f, 2])
            picks[f] = (held_out_activating(maxima.filter(pl.col("feature") == f), shown.get(f, set()), n_quantiles,
                                            per_quantile, rng), rng)
        grids = feature_grids(codes, [(f, s) for f, (p, _) in picks.items() for s in p["sample_id"].to_list()], side)
        for f in image_feats:
            picked, rng = picks[f]
            cands = [(sid, p) for p, sid in corpus if p not in active_paths[f]]
            negatives = [cands[i] for i in rng.permutation(len(cands)).tolist()]
            ex = image_feature_examples(picked, grids, image_of, negatives, side, rng)
            out.update({(f, m): ex[m] for m in METHODS})
    return out

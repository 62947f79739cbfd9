"""The examples that detection and fuzzing show the scorer (EleutherAI delphi, arXiv 2410.13928 §3;
``delphi/scorers/classifier/{detection,fuzz}.py`` and ``sample.py``), built from our tables.

Text features (explained from their top text contexts):

* activating: the feature's top contexts (``contexts.parquet`` of ``render_maps``: a window of
  tokens around the sample's most activating token);
* non-activating: windows of the same shape (``before`` tokens, the focus, ``after`` tokens) around
  random text tokens of random samples, in which the feature is 0 on every token (from the codes);
* detection shows both unmarked; fuzzing (delphi's default ``fuzz_type``) marks, in each activating
  context, the tokens at or above ``threshold`` x its largest activation (delphi: 0.3), and, in each
  non-activating one, ``ceil(mean number of active tokens per activating context)`` random tokens.

Image features (explained from their top images):

* activating: the feature's top images (``maps.parquet``); non-activating: random corpus images on
  whose tokens the feature is never active;
* detection shows every image unhighlighted: the highlight (the rest darkened) would give the
  activating ones away;
* fuzzing shows each activating image with its activated region highlighted (the map's own PNG) and
  each non-activating image with a random region of ``ceil(mean active patches of the top images)``
  base-view patches highlighted the same way (:func:`mmsae.codes.maps.highlight`): a wrong region, since
  the feature fires nowhere on it.

Every random choice comes from ``numpy.random.default_rng([seed, feature, ...])``, so the same
inputs give the same requests (and cache hits).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from mmsae.data.corpus import load_image
from mmsae.evaluate.scoring_prompts import highlight_tokens, plain_text
from mmsae.codes.maps import highlight, png_bytes

IMAGE_TOKEN = "<image>"
METHODS = ("detection", "fuzzing")


def active_text_positions(codes: pl.LazyFrame, features: list[int]) -> dict[int, dict[str, set[int]]]:
    """``{feature: {sample_id: token indices where it is active on a text token}}`` from the codes."""
    rows = (codes.filter((pl.col("modality") == "text") & pl.col("feature").is_in(features))
            .select("feature", "sample_id", "token_index").collect(engine="streaming"))
    out: dict[int, dict[str, set[int]]] = {f: {} for f in features}
    for (f, sid), g in rows.group_by(["feature", "sample_id"]):
        out[f][sid] = set(g["token_index"].to_list())
    return out


def non_activating_windows(samples: pl.DataFrame, active: dict[str, set[int]], n: int, before: int, after: int,
                           rng: np.random.Generator, max_draws: int = 200) -> list[list[str]]:
    """Up to ``n`` distinct token windows (``before`` + 1 + ``after`` tokens, cut at the sample's
    ends) around random text tokens, in which the feature is active on no token.

    Args:
        samples: ``sample_id``, ``tokens`` (list of token strings), sorted by sample_id.
        active: ``{sample_id: active token indices}`` of this feature.
        rng: the draws' generator.
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
        if active.get(ids[s], set()) & set(range(lo, hi)):
            continue
        window = list(tokens[lo:hi])
        key = plain_text(window)
        if key.strip() and key not in seen:
            seen.add(key)
            out.append(window)
    return out


def fuzz_marks(tokens: list[str], k: int, rng: np.random.Generator) -> set[int]:
    """``k`` random positions (not ``<image>`` placeholders) to mark in a non-activating context."""
    allowed = [i for i, t in enumerate(tokens) if t != IMAGE_TOKEN]
    return set(rng.choice(allowed, size=min(k, len(allowed)), replace=False).tolist()) if allowed else set()


def text_examples(contexts: pl.DataFrame, negatives: list[list[str]], n_examples: int, threshold: float,
                  rng: np.random.Generator) -> dict[str, list[tuple[str, int]]]:
    """``{method: [(text, label)]}`` for one text feature: label 1 for its top contexts, 0 for the
    non-activating windows; half of ``n_examples`` each (fewer when there are fewer).

    Args:
        contexts: the feature's rows of ``contexts.parquet`` (tokens, activations, rank).
        negatives: non-activating windows (:func:`non_activating_windows`).
        threshold: fuzzing marks activating tokens at or above this fraction of the context's max
            (delphi's ``FuzzingScorer`` threshold, 0.3).
    """
    n_neg = n_examples // 2
    pos = [(t, a) for t, a in zip(*contexts.sort("rank").select("tokens", "activations").get_columns())][:n_examples - n_neg]
    pos = [(list(t), list(a)) for t, a in pos if a is not None and max(a, default=0) > 0]
    neg = negatives[:n_neg]
    n_incorrect = math.ceil(np.mean([sum(x > 0 for x in a) for _, a in pos])) if pos else 1
    detection = [(plain_text(t), 1) for t, _ in pos] + [(plain_text(t), 0) for t in neg]
    fuzzing = ([(highlight_tokens(t, [x >= threshold * max(a) for x in a]), 1) for t, a in pos]
               + [(highlight_tokens(t, fuzz_marks(t, n_incorrect, rng)), 0) for t in neg])
    return {"detection": detection, "fuzzing": fuzzing}


def image_sets(codes: pl.LazyFrame, samples: pl.DataFrame, features: list[int]) -> tuple[list[str], dict[int, set[str]]]:
    """(every corpus image path, sorted; ``{feature: image paths with an active image token}``)."""
    paths = samples.filter(pl.col("image_path").is_not_null()).select("sample_id", "image_path")
    hit = (codes.filter((pl.col("modality") == "image") & pl.col("feature").is_in(features))
           .select("feature", "sample_id").unique().collect(engine="streaming").join(paths, on="sample_id"))
    active = {f: set() for f in features}
    for f, p in zip(hit["feature"].to_list(), hit["image_path"].to_list()):
        active[f].add(p)
    return sorted(set(paths["image_path"].to_list())), active


def _load_png(path: str) -> bytes | None:
    image, _ = load_image(path)
    return None if image is None else png_bytes(image)


def image_examples(maps: pl.DataFrame, maps_dir: Path, image_of: dict[str, str], corpus_images: list[str],
                   active_images: set[str], n_examples: int, side: int, rng: np.random.Generator) -> dict[str, list[tuple[bytes, int]]]:
    """``{method: [(png, label)]}`` for one image feature (see the module doc).

    Args:
        maps: the feature's rows of ``maps.parquet`` (rank, sample_id, highlight, n_active_patches).
        maps_dir: the directory the ``highlight`` paths are relative to.
        image_of: ``{sample_id: image path}``.
        corpus_images: every corpus image path; active_images: those where the feature fires.
        side: the base view's patch grid side (``grid_side`` of the activation manifest).
    """
    n_neg = n_examples // 2
    top = maps.sort("rank").unique(subset=["sample_id"], keep="first", maintain_order=True).head(n_examples - n_neg)
    pos = []
    for sid, rel, k in zip(top["sample_id"].to_list(), top["highlight"].to_list(), top["n_active_patches"].to_list()):
        plain = _load_png(image_of[sid]) if sid in image_of else None
        if plain is not None:
            pos.append((plain, (Path(maps_dir) / rel).read_bytes(), int(k)))
    candidates = [p for p in corpus_images if p not in active_images]
    order = rng.permutation(len(candidates)).tolist()
    neg = []
    n_patches = max(1, math.ceil(np.mean([k for *_, k in pos]))) if pos else 1
    for i in order:
        if len(neg) >= n_neg:
            break
        image, _ = load_image(candidates[i])
        if image is None:
            continue
        grid = np.zeros((side, side), np.float32)
        grid.flat[rng.choice(side * side, size=min(n_patches, side * side), replace=False)] = 1.0
        neg.append((png_bytes(image), png_bytes(highlight(image, grid))))
    return {"detection": [(p, 1) for p, _, _ in pos] + [(p, 0) for p, _ in neg],
            "fuzzing": [(h, 1) for _, h, _ in pos] + [(h, 0) for _, h in neg]}


def window_shape(contexts: pl.DataFrame, default: tuple[int, int] = (12, 4)) -> tuple[int, int]:
    """``(before, after)``: the largest number of tokens before and after the focus in the top
    contexts, so the non-activating windows match their shape (``default`` without contexts)."""
    if contexts.is_empty():
        return default
    n = contexts["tokens"].list.len()
    return int(contexts["focus"].max()), int((n - contexts["focus"] - 1).max())


def collect_examples(explained: list[tuple[int, str, str]], *, contexts: pl.DataFrame, maps: pl.DataFrame,
                     maps_dir: Path, codes: pl.LazyFrame, samples: pl.DataFrame, n_examples: int, seed: int,
                     side: int, threshold: float = 0.3) -> dict[tuple[int, str], list[tuple]]:
    """``{(feature, method): [(text or png, label)]}`` for every explained feature.

    Args:
        explained: ``(feature, modality, explanation)``; modality says which examples it gets.
        contexts, maps: ``render_maps``' outputs; maps_dir: where the map PNGs are.
        codes: lazy frame over the code shards; samples: the samples table (sample_id, image_path,
            tokens) of the same corpus.
        n_examples: examples per request (half activating, half not, when there are enough).
        side: the base view's patch grid side; threshold: fuzzing's marking threshold.
    """
    text_feats = [f for f, m, _ in explained if m == "text"]
    image_feats = [f for f, m, _ in explained if m == "image"]
    samples = samples.sort("sample_id")
    out: dict[tuple[int, str], list[tuple]] = {}
    if text_feats:
        before, after = window_shape(contexts.filter(pl.col("feature").is_in(text_feats)))
        active = active_text_positions(codes, text_feats)
        text_samples = samples.select("sample_id", "tokens")
        for f in text_feats:
            rng = np.random.default_rng([seed, f, 1])
            neg = non_activating_windows(text_samples, active[f], n_examples // 2, before, after, rng)
            ex = text_examples(contexts.filter(pl.col("feature") == f), neg, n_examples, threshold, rng)
            out.update({(f, m): ex[m] for m in METHODS})
    if image_feats:
        corpus_images, active_images = image_sets(codes, samples, image_feats)
        image_of = {s: p for s, p in zip(samples["sample_id"].to_list(), samples["image_path"].to_list()) if p is not None}
        for f in image_feats:
            rng = np.random.default_rng([seed, f, 2])
            ex = image_examples(maps.filter(pl.col("feature") == f), maps_dir, image_of, corpus_images,
                                active_images[f], n_examples, side, rng)
            out.update({(f, m): ex[m] for m in METHODS})
    return out

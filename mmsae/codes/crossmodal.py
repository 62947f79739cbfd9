"""Cross-modal features: features that fire on the same concept in an image and in its own text.

The write-up of arXiv 2411.14982 shows features that fire both on a picture of eating and on the
word "hungry". Here that is a rate over *paired* data, with its own chance level beside it:

* a **pair** is one sample of the interpretation corpus that has both coded image tokens and coded
  text tokens (an image with its own prompt/answer);
* for feature f, ``I[i, f]`` = f is active on some image token of pair i, ``T[i, f]`` = on some
  text token of pair i;
* **matched rate** = mean_i I[i, f] * T[i, f] (both modalities of the same pair);
* **shuffled rate** = mean_i I[i, f] * T[pi(i), f], with pi a seeded derangement of the pairs (an
  image with another pair's text): what co-activation reaches by chance given how often f fires in
  each modality;
* **excess** = matched - shuffled, with a percentile bootstrap interval over pairs (the pairs and
  their shuffled partners resampled together), and **ratio** = matched / shuffled (null when the
  shuffled rate is 0).

A feature that fires on an image and on that image's caption word has matched >> shuffled; one that
fires on either modality alone has matched = 0; one that fires on a template word every pair shares
has matched = shuffled. Text tokens follow the image under causal attention, so a text-side
activation may carry the image's information: that is what a cross-modal feature is, not a flaw.
docs/methods.md compares this definition with SAE-V's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

CROSSMODAL_SCHEMA = {"feature": pl.Int32, "n_pairs": pl.Int32, "n_image": pl.Int32, "n_text": pl.Int32,
                     "n_matched": pl.Int32, "matched_rate": pl.Float64, "shuffled_rate": pl.Float64,
                     "ratio": pl.Float64, "excess": pl.Float64, "excess_ci_low": pl.Float64, "excess_ci_high": pl.Float64}


@dataclass(frozen=True)
class CrossmodalConfig:
    """The ``features.crossmodal`` config section.

    Attributes:
        threshold: an activation above this counts as active (post-TopK codes are > 0 already).
        min_pairs: features active on both modalities of fewer pairs than this get no interval
            (their rows still carry the counts).
        n_boot: bootstrap resamples; alpha: 1 - the interval's coverage; seed: the derangement's and
            the bootstrap's seed.
    """

    threshold: float = 0.0
    min_pairs: int = 2
    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0


def cyclic_derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` without a fixed point: a uniformly random n-cycle
    (Sattolo's algorithm), so no pair is ever matched with itself.

    Raises:
        ValueError: n < 2.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 pairs, got {n}")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: Sattolo, not Fisher-Yates
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def modality_sets(codes: pl.LazyFrame, threshold: float = 0.0) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The pairs and, per pair, the features active on its image tokens and on its text tokens.

    Args:
        codes: the code rows (:data:`mmsae.codes.schema.CODE_SCHEMA`).

    Returns:
        ``(pair_ids, features, image, text)``: the sorted sample ids that have active codes on both
        modalities' tokens; the sorted feature ids active anywhere in them; ``image`` and ``text``
        bool arrays (n_pairs, n_features).
    """
    act = (codes.filter(pl.col("activation") > threshold).select("sample_id", "modality", "feature").unique()
           .collect(engine="streaming"))
    by_mod = act.group_by("sample_id").agg(pl.col("modality").n_unique().alias("n_mod"))
    pair_ids = sorted(by_mod.filter(pl.col("n_mod") == 2)["sample_id"].to_list())
    act = act.filter(pl.col("sample_id").is_in(pair_ids))
    features = np.array(sorted(set(act["feature"].to_list())), dtype=np.int64)
    row = {s: i for i, s in enumerate(pair_ids)}
    col = {int(f): j for j, f in enumerate(features)}
    image = np.zeros((len(pair_ids), len(features)), bool)
    text = np.zeros_like(image)
    for sid, mod, f in act.iter_rows():
        (image if mod == "image" else text)[row[sid], col[f]] = True
    return pair_ids, features, image, text


def crossmodal_scores(codes: pl.LazyFrame, cfg: CrossmodalConfig) -> pl.DataFrame:
    """One row per feature active on some pair's image and some pair's text (see the module doc).

    Returns:
        A frame with :data:`CROSSMODAL_SCHEMA`, sorted by excess (desc): n_pairs, n_image / n_text
        (pairs where f is active on that modality), n_matched, matched_rate, shuffled_rate, ratio,
        excess and its interval (null below ``cfg.min_pairs`` matched pairs). Empty with fewer than
        2 pairs.
    """
    pair_ids, features, image, text = modality_sets(codes, cfg.threshold)
    n = len(pair_ids)
    if n < 2:
        return pl.DataFrame(schema=CROSSMODAL_SCHEMA)
    keep = image.any(0) & text.any(0)
    features, image, text = features[keep], image[:, keep], text[:, keep]
    perm = cyclic_derangement(n, cfg.seed)
    matched = image & text  # (n, F)
    shuffled = image & text[perm]
    m_rate, s_rate = matched.mean(0), shuffled.mean(0)
    rng = np.random.default_rng([cfg.seed, 1])
    lo = np.full(len(features), np.nan)
    hi = np.full(len(features), np.nan)
    if len(features):
        diffs = matched.astype(np.float32) - shuffled.astype(np.float32)  # (n, F): resampled by pair
        boot = np.stack([diffs[rng.integers(0, n, n)].mean(0) for _ in range(cfg.n_boot)])  # (B, F)
        lo, hi = np.quantile(boot, cfg.alpha / 2, axis=0), np.quantile(boot, 1 - cfg.alpha / 2, axis=0)
    enough = matched.sum(0) >= cfg.min_pairs
    out = pl.DataFrame({
        "feature": features, "n_pairs": np.full(len(features), n), "n_image": image.sum(0), "n_text": text.sum(0),
        "n_matched": matched.sum(0), "matched_rate": m_rate, "shuffled_rate": s_rate,
        "ratio": np.where(s_rate > 0, m_rate / np.where(s_rate > 0, s_rate, 1), np.nan), "excess": m_rate - s_rate,
        "excess_ci_low": np.where(enough, lo, np.nan), "excess_ci_high": np.where(enough, hi, np.nan),
    }).cast(CROSSMODAL_SCHEMA).fill_nan(None)
    return out.sort(["excess", "feature"], descending=[True, False])


def best_pair(codes: pl.LazyFrame, feature: int, pair_ids: list[str]) -> tuple[str, float, float] | None:
    """The pair where ``feature`` is strongest on both sides: the sample maximising
    min(max image activation, max text activation), as ``(sample_id, image max, text max)``; None
    when no pair has it on both modalities."""
    per = (codes.filter((pl.col("feature") == feature) & pl.col("sample_id").is_in(pair_ids))
           .group_by("sample_id", "modality").agg(pl.col("activation").max()).collect()
           .pivot(on="modality", index="sample_id", values="activation"))
    if "image" not in per.columns or "text" not in per.columns:
        return None
    per = per.drop_nulls(["image", "text"]).with_columns(pl.min_horizontal("image", "text").alias("both"))
    if per.height == 0:
        return None
    r = per.sort(["both", "sample_id"], descending=[True, False]).row(0, named=True)
    return r["sample_id"], float(r["image"]), float(r["text"])


EXAMPLE_SCHEMA = {"feature": pl.Int32, "sample_id": pl.String, "image_max": pl.Float32, "text_max": pl.Float32,
                  "highlight": pl.Binary, "tokens": pl.List(pl.String), "activations": pl.List(pl.Float32), "focus": pl.Int32}


def pair_examples(codes: pl.LazyFrame, samples: pl.DataFrame, table: pl.DataFrame, n: int, side: int,
                  threshold: float = 0.0, before: int = 12, after: int = 4) -> pl.DataFrame:
    """For the first ``n`` features of ``table`` (:func:`crossmodal_scores`, best first) with a
    matched pair: the pair's image with the feature's active patches highlighted (PNG bytes) and its
    text around the strongest text token, side by side on the report.

    Args:
        samples: the codes' samples table (sample_id, image_path, tokens).
        side: the base view's patch grid side; threshold: a patch is highlighted above it.
        before, after: text tokens kept before / after the strongest one.

    Returns:
        A frame with :data:`EXAMPLE_SCHEMA`; features whose pair image cannot be read are skipped.
    """
    from mmsae.codes.maps import feature_grids, highlight, png_bytes
    from mmsae.data.corpus import load_image

    info = {r["sample_id"]: r for r in samples.select("sample_id", "image_path", "tokens").iter_rows(named=True)}
    pair_ids = [s for s, r in info.items() if r["image_path"] is not None]
    rows = []
    for f in table.filter(pl.col("n_matched") > 0)["feature"].to_list():
        if len(rows) == n:
            break
        best = best_pair(codes, f, pair_ids)
        if best is None:
            continue
        sid, img_max, txt_max = best
        image, _status = load_image(info[sid]["image_path"])
        if image is None:
            continue
        grid = feature_grids(codes, [(f, sid)], side)[(f, sid)]
        text = (codes.filter((pl.col("feature") == f) & (pl.col("sample_id") == sid) & (pl.col("modality") == "text"))
                .select("token_index", "activation").collect())
        tokens = info[sid]["tokens"]
        acts = np.zeros(len(tokens), np.float32)
        acts[text["token_index"].to_numpy()] = text["activation"].to_numpy()
        focus = int(acts.argmax())
        lo, hi = max(0, focus - before), min(len(tokens), focus + after + 1)
        rows.append({"feature": f, "sample_id": sid, "image_max": img_max, "text_max": txt_max,
                     "highlight": png_bytes(highlight(image, grid, threshold), max_side=256),
                     "tokens": list(tokens[lo:hi]), "activations": acts[lo:hi].tolist(), "focus": focus - lo})
    return pl.DataFrame(rows, schema=EXAMPLE_SCHEMA)


__all__ = ["CROSSMODAL_SCHEMA", "EXAMPLE_SCHEMA", "pair_examples", "CrossmodalConfig", "best_pair", "crossmodal_scores", "cyclic_derangement", "modality_sets"]

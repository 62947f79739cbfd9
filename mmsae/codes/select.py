"""Paper step 3: sparse codes per token, per-feature statistics, each feature's top samples.

* The code shards' schema and reader live in :mod:`mmsae.codes.schema`; they are written by
  :func:`mmsae.codes.encode.encode_corpus` (and :func:`mmsae.codes.rows.encode_shards`).
* :func:`feature_stats` and :func:`top_samples` (together: :func:`stats_and_top_samples`) stream
  the code rows once in batches and aggregate them in dense (sample, feature) blocks, so memory does
  not grow with the number of rows or shards.
* :func:`select_features` picks the features that go forward to maps, explanations and the report.
"""

from __future__ import annotations

import logging

import polars as pl

from mmsae.codes.stats import CodeAggregate
from mmsae.codes.schema import TEXT_DOMINANT

log = logging.getLogger(__name__)


def feature_stats(codes: pl.LazyFrame, n_tokens: int, n_image_tokens: int, n_text_tokens: int) -> pl.DataFrame:
    """Per-feature statistics (schema ``feature stats`` in docs/development.md, 'Table schemas'), in one streaming pass.

    frequency = active tokens / all tokens; frequency_image/text likewise per modality;
    mean_activation is over the tokens where the feature is active; n_samples counts the samples
    with at least one active token. Only features active somewhere have a row.

    Raises:
        ValueError: a sample's rows are not contiguous in ``codes``, or an activation is negative,
            infinite or NaN.
    """
    return CodeAggregate(None, 0, "max").run(codes).stats(n_tokens, n_image_tokens, n_text_tokens)


def top_samples(codes: pl.LazyFrame, base_view_tokens: pl.DataFrame, n: int = 5, rank_by: str = "max") -> pl.DataFrame:
    """Each feature's top-``n`` samples, for image and for text tokens separately.

    Image ranking uses base-view image tokens (view 0): ``max`` ranks by the largest activation,
    ``mean`` by the activation summed over the base view divided by the sample's number of
    base-view tokens (the reference code's mean, inactive tokens counting 0). Text ranking uses the
    largest activation on a text token of the sample. Scores compare as stored (float32); ties
    rank by sample id.

    Image samples that share an image file count once (their image tokens are identical under
    causal attention when the image precedes the prompt): the best-scoring sample stands for it.
    Text samples whose best token has the same score at the same position count once too (the same
    prefix up to that token, e.g. a shared chat template): the smallest sample id stands for them.

    Args:
        codes: the code rows (:func:`mmsae.codes.schema.scan_codes`); each sample's rows contiguous, as written.
        base_view_tokens: ``(sample_id, n_base, image_path)``: base-view image tokens per image
            sample and its image file (see :func:`base_view_counts`).

    Returns:
        ``feature, modality, rank (0-based), sample_id, score, max_activation, token_index`` where
        token_index is the sample's most activating token of that modality (base view for images;
        the lowest index on ties).

    Raises:
        ValueError: ``rank_by`` is not ``max`` or ``mean``; rows as in :func:`feature_stats`; a
            sample has base-view image rows but no row (with ``n_base`` > 0) in ``base_view_tokens``.
    """
    return CodeAggregate(base_view_tokens, n, rank_by).run(codes).top()


def stats_and_top_samples(codes: pl.LazyFrame, n_tokens: int, n_image_tokens: int, n_text_tokens: int,
                          base_view_tokens: pl.DataFrame, n: int, rank_by: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`feature_stats` and :func:`top_samples` from one streaming pass over the code rows
    (memory: one batch of rows, a dense (sample, feature) block and the running top lists, flat in
    the number of rows; see :class:`_Aggregate`)."""
    agg = CodeAggregate(base_view_tokens, n, rank_by).run(codes)
    return agg.stats(n_tokens, n_image_tokens, n_text_tokens), agg.top()


def select_features(stats: pl.DataFrame, tops: pl.DataFrame, mode: str = "most_frequent", n: int = 16,
                    ids: list[int] | None = None, min_samples: int = 3, max_frequency: float = 1.0,
                    per_modality: bool = False) -> tuple[list[int], dict]:
    """Choose the features that go forward.

    Args:
        mode: ``most_frequent`` (the ``n`` most frequent that qualify) or ``list`` (``ids``).
        min_samples: skip features with fewer distinct activating samples than this.
        max_frequency: skip features active on more than this share of tokens (dense features).
        per_modality: with ``most_frequent``, take half of ``n`` from image-dominant features
            (frequency_image >= frequency_text, ranked by frequency_image) and the rest from
            text-dominant ones (ranked by frequency_text).

    Returns:
        (features, info): the chosen ids and why others were skipped (counts), for the report.

    Raises:
        ValueError: unknown mode, or an id outside the SAE.
    """
    qualifies = stats.filter((pl.col("n_samples") >= min_samples) & (pl.col("frequency") <= max_frequency))
    info = {
        "mode": mode,
        "min_samples": min_samples,
        "max_frequency": max_frequency,
        "n_alive": stats.height,
        "n_too_few_samples": stats.filter(pl.col("n_samples") < min_samples).height,
        "n_too_dense": stats.filter(pl.col("frequency") > max_frequency).height,
    }
    if mode == "most_frequent" and per_modality:
        img = qualifies.filter(~TEXT_DOMINANT).sort(["frequency_image", "feature"], descending=[True, False])
        txt = qualifies.filter(TEXT_DOMINANT).sort(["frequency_text", "feature"], descending=[True, False])
        n_txt = min(n // 2, txt.height)
        chosen = img.head(n - n_txt)["feature"].to_list() + txt.head(n_txt)["feature"].to_list()
    elif mode == "most_frequent":
        chosen = qualifies.sort(["frequency", "feature"], descending=[True, False]).head(n)["feature"].to_list()
    elif mode == "list":
        ids = list(ids or [])
        ok = set(qualifies["feature"].to_list())
        chosen = [f for f in ids if f in ok]
        info["skipped_ids"] = [f for f in ids if f not in ok]
    else:
        raise ValueError(f"features.select.mode: {mode!r} is not one of most_frequent, list")
    info["n_selected"] = len(chosen)
    return chosen, info


def base_view_counts(samples: pl.DataFrame) -> pl.DataFrame:
    """``(sample_id, n_base, image_path)``: base-view image tokens per image sample and its image file.

    Read from the codes' samples table (its ``n_base_tokens`` column, counted from each sample's token
    layout when it was encoded), so no dense activation is needed and a base-view token whose latents
    are all zero still counts (``rank_by: mean`` divides by every base-view token).

    Args:
        samples: the codes' ``samples.parquet`` (sample_id, image_path, n_base_tokens, ...).

    Raises:
        ValueError: ``samples`` has no ``n_base_tokens`` column (e.g. extraction's samples table).
    """
    if "n_base_tokens" not in samples.columns:
        raise ValueError("samples table has no n_base_tokens column: pass the codes' samples.parquet "
                         "(results/runs/<run>/codes/samples.parquet), not the activations'")
    return (
        samples.select("sample_id", pl.col("n_base_tokens").cast(pl.UInt32).alias("n_base"), "image_path")
        .filter(pl.col("n_base") > 0)
    )

"""Paper step 3: sparse codes per token, per-feature statistics, each feature's top samples.

* :data:`CODE_SCHEMA` is the schema of the code shards (``codes`` in ``shared/DESIGN.md``) that
  :func:`mmsae.encode_model.encode_corpus` (and :func:`mmsae.sae.encode.encode_shards`) write.
* :func:`feature_stats` and :func:`top_samples` are lazy polars queries over the code shards,
  collected with the streaming engine, so memory does not grow with the number of shards.
* :func:`select_features` picks the features that go forward to maps, explanations and the report.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import polars as pl
import pyarrow as pa

from mmsae.io import write_parquet

log = logging.getLogger(__name__)

CODE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("token_index", pa.int32()),
        ("modality", pa.string()),
        ("view", pa.int16()),
        ("patch_row", pa.int16()),
        ("patch_col", pa.int16()),
        ("feature", pa.int32()),
        ("activation", pa.float32()),
    ]
)
# A feature is text-dominant when it is active on a larger share of text tokens than of image tokens.
TEXT_DOMINANT = pl.col("frequency_text") > pl.col("frequency_image")

META_COLS = ["sample_id", "token_index", "modality", "view", "patch_row", "patch_col"]


def scan_codes(paths: list[Path]) -> pl.LazyFrame:
    """A lazy frame over code shards."""
    return pl.scan_parquet([str(p) for p in paths])


def _pairs(codes: pl.LazyFrame) -> pl.LazyFrame:
    """One row per active (feature, sample): token counts by modality, the max and sum of the
    activation over all its tokens, over its base-view (view 0) image tokens (``*_base``) and over
    its text tokens (``max_text``); null where the sample has no such token.

    Everything :func:`feature_stats` and :func:`top_samples` need comes from this one hash
    aggregation over the code rows (the per-feature ``n_unique`` of sample ids, the slow part
    before, is the number of pairs).
    """
    image = pl.col("modality") == "image"
    text = pl.col("modality") == "text"
    act = pl.col("activation")
    return (
        codes.select(
            "feature", "sample_id", "activation", image.alias("is_image"), text.alias("is_text"),
            pl.when(image & (pl.col("view") == 0)).then(act).alias("act_base"),
            pl.when(text).then(act).alias("act_text"),
        )
        .group_by("feature", "sample_id")
        .agg(
            pl.len().alias("n"),
            pl.col("is_image").sum().alias("n_image"),
            pl.col("is_text").sum().alias("n_text"),
            act.max().alias("max"),
            act.cast(pl.Float64).sum().alias("sum"),
            pl.col("act_base").max().alias("max_base"),
            pl.col("act_base").cast(pl.Float64).sum().alias("sum_base"),
            pl.col("act_text").max().alias("max_text"),
        )
    )


def _stats_from_pairs(pairs: pl.LazyFrame, n_tokens: int, n_image_tokens: int, n_text_tokens: int) -> pl.LazyFrame:
    return (
        pairs.group_by("feature")
        .agg(
            pl.col("n").sum().alias("n_tokens_active"),
            pl.col("max").max().alias("max_activation"),
            (pl.col("sum").sum() / pl.col("n").sum()).cast(pl.Float32).alias("mean_activation"),
            pl.col("n_image").sum().alias("n_image_active"),
            pl.col("n_text").sum().alias("n_text_active"),
            pl.len().alias("n_samples"),
        )
        .with_columns(
            (pl.col("n_tokens_active") / max(n_tokens, 1)).alias("frequency"),
            (pl.col("n_image_active") / max(n_image_tokens, 1)).alias("frequency_image"),
            (pl.col("n_text_active") / max(n_text_tokens, 1)).alias("frequency_text"),
        )
        .select(
            pl.col("feature").cast(pl.Int32),
            pl.col("n_tokens_active").cast(pl.Int64),
            "frequency",
            "max_activation",
            "mean_activation",
            "frequency_image",
            "frequency_text",
            pl.col("n_samples").cast(pl.Int64),
        )
        .sort("feature")
    )


def _candidates(df: pl.LazyFrame, keep: int) -> pl.LazyFrame:
    """Rows whose ``score`` is among the ``keep`` largest of their feature (ties at the cut kept):
    a cheap exact pre-filter before the sorts and de-duplication below."""
    cut = df.group_by("feature").agg(pl.col("score").top_k(keep).min().alias("cut"))
    return df.join(cut, on="feature").filter(pl.col("score") >= pl.col("cut")).drop("cut")


def _ranked_from_pairs(pairs: pl.LazyFrame, base_view_tokens: pl.DataFrame, n: int, rank_by: str) -> pl.LazyFrame:
    """Top-``n`` (feature, modality, sample) with scores, without the token index.

    A feature's top ``n`` distinct images lie within its ``n * m`` best image samples, where ``m``
    is the most samples any one image file has (the rest are beaten by n images already), so only
    those are sorted and de-duplicated.
    """
    if rank_by not in ("max", "mean"):
        raise ValueError(f"features.rank_by: {rank_by!r} is not one of max, mean")
    per_file = base_view_tokens.group_by("image_path").len()["len"].max() or 1
    cols = ["feature", "modality", "sample_id", pl.col("score").cast(pl.Float64), "max_activation"]
    images = (
        pairs.filter(pl.col("max_base").is_not_null())
        .join(base_view_tokens.lazy(), on="sample_id", how="left")
        .with_columns(
            (pl.col("max_base") if rank_by == "max" else pl.col("sum_base") / pl.col("n_base")).alias("score"),
            pl.col("max_base").alias("max_activation"),
            pl.lit("image").alias("modality"),
        )
    )
    per_image = (
        _candidates(images, n * per_file)
        .sort(["score", "sample_id"], descending=[True, False])
        .unique(subset=["feature", "image_path"], keep="first", maintain_order=True)
        .select(cols)
    )
    per_text = _candidates(
        pairs.filter(pl.col("max_text").is_not_null())
        .with_columns(pl.col("max_text").alias("score"), pl.col("max_text").alias("max_activation"), pl.lit("text").alias("modality")),
        n,
    ).select(cols)
    return (
        pl.concat([per_image, per_text])
        .sort(["score", "sample_id"], descending=[True, False])
        .with_columns((pl.col("score").rank("ordinal", descending=True).over("feature", "modality") - 1).alias("rank"))
        .filter(pl.col("rank") < n)
    )


def _with_tokens(codes: pl.LazyFrame, ranked: pl.DataFrame) -> pl.DataFrame:
    """Add each ranked row's ``token_index``: its sample's most activating token of that modality
    (base view for images; the lowest index on ties), from a second pass over the codes that
    keeps only the ranked (feature, sample) pairs."""
    want = ranked.select("feature", "sample_id", "modality", "max_activation").lazy()
    tokens = (
        codes.filter((pl.col("modality") == "text") | (pl.col("view") == 0))
        .select("feature", "sample_id", "modality", "token_index", "activation")
        .join(want, on=["feature", "sample_id", "modality"], how="inner")
        .filter(pl.col("activation") == pl.col("max_activation"))
        .group_by("feature", "sample_id", "modality")
        .agg(pl.col("token_index").min())
        .collect(engine="streaming")
    )
    return (
        ranked.join(tokens, on=["feature", "sample_id", "modality"], how="left")
        .select(
            pl.col("feature").cast(pl.Int32),
            "modality",
            pl.col("rank").cast(pl.Int16),
            "sample_id",
            pl.col("score").cast(pl.Float32),
            pl.col("max_activation").cast(pl.Float32),
            pl.col("token_index").cast(pl.Int32),
        )
        .sort("feature", "modality", "rank")
    )


def feature_stats(codes: pl.LazyFrame, n_tokens: int, n_image_tokens: int, n_text_tokens: int) -> pl.DataFrame:
    """Per-feature statistics (schema ``feature stats`` in DESIGN.md), streaming.

    frequency = active tokens / all tokens; frequency_image/text likewise per modality;
    mean_activation is over the tokens where the feature is active; n_samples counts the samples
    with at least one active token.
    """
    return _stats_from_pairs(_pairs(codes), n_tokens, n_image_tokens, n_text_tokens).collect(engine="streaming")


def top_samples(codes: pl.LazyFrame, base_view_tokens: pl.DataFrame, n: int = 5, rank_by: str = "max") -> pl.DataFrame:
    """Each feature's top-``n`` samples, for image and for text tokens separately.

    Image ranking uses base-view image tokens (view 0): ``max`` ranks by the largest activation,
    ``mean`` by the activation summed over the base view divided by the sample's number of
    base-view tokens (the reference code's mean, inactive tokens counting 0). Text ranking uses the
    largest activation on a text token of the sample. Ties rank by sample id.

    Image samples that share an image file count once (their image tokens are identical under
    causal attention when the image precedes the prompt): the best-scoring sample stands for it.

    Args:
        base_view_tokens: ``(sample_id, n_base, image_path)``: base-view image tokens per image
            sample and its image file (see :func:`base_view_counts`).

    Returns:
        ``feature, modality, rank (0-based), sample_id, score, max_activation, token_index`` where
        token_index is the sample's most activating token of that modality.

    Raises:
        ValueError: ``rank_by`` is not ``max`` or ``mean``.
    """
    ranked = _ranked_from_pairs(_pairs(codes), base_view_tokens, n, rank_by).collect(engine="streaming")
    return _with_tokens(codes, ranked)


def stats_and_top_samples(codes: pl.LazyFrame, n_tokens: int, n_image_tokens: int, n_text_tokens: int,
                          base_view_tokens: pl.DataFrame, n: int, rank_by: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`feature_stats` and :func:`top_samples` together, aggregating the code rows once:
    the (feature, sample) pairs are collected once (memory: one row per active pair, not per code
    row) and both results derive from them; one more pass finds the top samples' tokens."""
    pairs = _pairs(codes).collect(engine="streaming").lazy()
    stats, ranked = pl.collect_all([_stats_from_pairs(pairs, n_tokens, n_image_tokens, n_text_tokens),
                                    _ranked_from_pairs(pairs, base_view_tokens, n, rank_by)])
    return stats, _with_tokens(codes, ranked)


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
                         "(results/codes/samples.parquet), not the activations'")
    return (
        samples.select("sample_id", pl.col("n_base_tokens").cast(pl.UInt32).alias("n_base"), "image_path")
        .filter(pl.col("n_base") > 0)
    )


def write_table(path: str | os.PathLike, df: pl.DataFrame) -> None:
    """Write a polars frame to Parquet atomically."""
    write_parquet(path, df.to_arrow())

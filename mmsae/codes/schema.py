"""The code table between rules: the schema of the code shards (``codes`` in docs/development.md, 'Table schemas'),
how a rule reads them, and the feature-stats predicate the selection, explain and steer rules share.

Its own module so that the rules which only read or write codes (encode, maps, evaluation,
scoring, explanations, steering) do not import the selection's aggregation
(:mod:`mmsae.codes.stats`, :mod:`mmsae.codes.top_lists`): each rule's code hash
(:func:`mmsae.workflow.script_hash.script_hash`) covers the modules its script reaches, so a change to the
selection reruns select_top and what reads its tables, not the encoding.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa

from mmsae.core.io import write_parquet
from mmsae.core.shards import check_shard

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
"""One row per (token, active latent): the token's place (sample, index, modality, image view and
patch) and the latent's id and post-TopK activation (float32, > 0)."""

META_COLS = ["sample_id", "token_index", "modality", "view", "patch_row", "patch_col"]
"""The token columns of :data:`CODE_SCHEMA` (everything but feature and activation)."""

TEXT_DOMINANT = pl.col("frequency_text") > pl.col("frequency_image")
"""Over the feature-stats table: a feature is text-dominant when it is active on a larger share of
text tokens than of image tokens (the selection's split, and the explain and steer rules')."""


def scan_codes(paths: list[Path]) -> pl.LazyFrame:
    """A lazy frame over code shards (schema :data:`CODE_SCHEMA`), in the order of ``paths``.

    Each file's footer is read first, so a damaged shard fails here, named, rather than in the
    middle of a query with an error that does not say which file (pass paths from
    :func:`mmsae.core.shards.shard_paths` to check sizes and row counts too).

    Raises:
        mmsae.core.shards.ShardError: a shard is missing or unreadable.
    """
    for p in paths:
        check_shard(p)
    return pl.scan_parquet([str(p) for p in paths])


def write_table(path: str | os.PathLike, df: pl.DataFrame) -> None:
    """Write a polars frame to Parquet atomically (:func:`mmsae.core.io.write_parquet`)."""
    write_parquet(path, df.to_arrow())

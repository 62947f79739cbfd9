"""The report's cross-modal section: the features that fire on an image and on its own text more often
than on shuffled pairs (:mod:`mmsae.codes.crossmodal`), each with its best pair side by side."""

from __future__ import annotations

import base64

import polars as pl

from mmsae.report.views import context_tokens


def crossmodal_view(table: pl.DataFrame, examples: pl.DataFrame) -> dict:
    """Template data: the counts, the top rows (with their example pair when rendered) and the
    shuffled baseline beside every rate.

    Args:
        table: ``crossmodal.parquet``; examples: ``crossmodal_examples.parquet``.
    """
    n_pairs = int(table["n_pairs"][0]) if table.height else 0
    above = table.filter(pl.col("excess_ci_low") > 0)
    ex = {r["feature"]: r for r in examples.iter_rows(named=True)}
    rows = []
    for r in table.head(max(examples.height, 10)).iter_rows(named=True):
        e = ex.get(r["feature"])
        rows.append({**r, "image": None if e is None else "data:image/png;base64," + base64.b64encode(e["highlight"]).decode(),
                     "sample_id": None if e is None else e["sample_id"],
                     "context": None if e is None else context_tokens(e["tokens"], e["activations"], e["focus"])})
    return {"n_pairs": n_pairs, "n_features": table.height, "n_above": above.height, "rows": rows}


__all__ = ["crossmodal_view"]

"""Activation histograms of features, as SAEDashboard builds them, without torch: read by the export
(Neuronpedia's ``freq_hist_data_*`` fields) and by the report's feature cards, which must not pull torch
into their environment."""

from __future__ import annotations

import numpy as np
import polars as pl


def histogram(values, n_bins: int = 50) -> tuple[list[float], list[int]]:
    """Equal-width histogram from the minimum to the maximum, as SAEDashboard's histograms are built
    (``bar_values`` = bin midpoints, ``bar_heights`` = counts; 50 bins is its default). A value equal
    to the maximum falls in the last bin (``torch.histc``'s rule).

    Args:
        values: any array-like of numbers (flattened; computed in float64).
        n_bins: number of bins (>= 1).

    Returns:
        ``(bar_values, bar_heights)``, each ``n_bins`` long; both empty for an empty input, one bar
        when every value is the same.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return [], []
    lo, hi = float(v.min()), float(v.max())
    if hi == lo:
        return [lo], [int(v.size)]
    idx = np.minimum(((v - lo) / (hi - lo) * n_bins).astype(np.int64), n_bins - 1)
    heights = np.bincount(idx, minlength=n_bins)
    width = (hi - lo) / n_bins
    return [round(lo + width * (i + 0.5), 5) for i in range(n_bins)], [int(h) for h in heights]


def feature_histograms(codes: pl.LazyFrame, features: list[int], n_bins: int = 50) -> dict[int, tuple[list, list]]:
    """Histogram (:func:`histogram`) of each feature's nonzero activations over the code rows
    (:data:`mmsae.codes.schema.CODE_SCHEMA`: one row per active (token, feature)), i.e. SAEDashboard's
    activation histogram. A feature without rows gets ``([], [])``."""
    acts = codes.filter(pl.col("feature").is_in(features)).select("feature", "activation").collect()
    by = {int(k[0]): g["activation"].to_numpy() for k, g in acts.group_by("feature")}
    return {f: histogram(by.get(f, np.zeros(0)), n_bins) for f in features}

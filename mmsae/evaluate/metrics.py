"""Metrics of the paper's Table 1 (arXiv 2411.14982 §4.2; ``shared/METHODS.md`` §4).

* Activated region: the feature's base-view patch activations, binarised (active where above
  ``threshold``; the paper's code uses > 0), upsampled bilinearly to the image and kept where the
  upsampled mask is >= 0.5.
* IoU between a predicted mask and the activated region; an empty prediction scores 0.
* CLIP score = 100 * max(cos(image, text), 0), as torchmetrics' ``CLIPScore`` defines it.
* Bootstrap confidence intervals of a mean.
"""

from __future__ import annotations

import numpy as np

from mmsae.maps import activation_mask


def activated_region(grid: np.ndarray, size: tuple[int, int], threshold: float = 0.0) -> np.ndarray:
    """Bool (height, width) mask: patches with activation > ``threshold``, upsampled to ``size`` = (width, height)."""
    return activation_mask(grid, size, threshold) >= 0.5


def iou(pred: np.ndarray | None, target: np.ndarray) -> float:
    """|pred ∩ target| / |pred ∪ target| for bool masks of one shape; 0 when pred is None or the union is empty.

    Raises:
        ValueError: the shapes differ.
    """
    if pred is None:
        return 0.0
    if pred.shape != target.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {target.shape}")
    union = np.logical_or(pred, target).sum()
    return float(np.logical_and(pred, target).sum() / union) if union else 0.0


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """100 * max(cos, 0) row by row. image_embeds, text_embeds: (n, d) (text broadcast if (1, d))."""
    a = image_embeds / np.linalg.norm(image_embeds, axis=-1, keepdims=True)
    b = text_embeds / np.linalg.norm(text_embeds, axis=-1, keepdims=True)
    return 100.0 * np.clip((a * b).sum(-1), 0.0, None)


def bootstrap_ci(values, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile bootstrap (1 - alpha) interval of the mean; (None, None) for fewer than 2 values."""
    v = np.asarray([x for x in values if x is not None and not np.isnan(x)], dtype=np.float64)
    if len(v) < 2:
        return None, None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))

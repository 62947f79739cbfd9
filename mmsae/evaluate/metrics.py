"""Metrics of the paper's Table 1 (arXiv 2411.14982 §4.2; docs/methods.md, 'Evaluating explanations').

* Activated region (:func:`activated_region`): the feature's base-view patch activations, binarised
  (a patch is active above ``threshold``), upsampled bilinearly to the image, and then

  - ``region="reference"`` (default; the released code): every pixel the upsampled active patches
    reach at all. EvolvingLMMs-Lab/multimodal-sae ``sae_auto_interp/features/features.py`` lines
    130-136 (``upsample_mask``) encodes inactive patches as 224 and active ones as 0 in an 8-bit image
    and resizes it with PIL's BILINEAR filter; ``sae_auto_interp/agents/scorers/segment/segment_scorer.py``
    lines 177-181 keep the pixels below 224. We do exactly that, so one active patch of a 24 x 24
    grid at 336 px covers 780 px (a 28 x 28 square less its 4 corners).
  - ``region="majority"`` (our earlier rule): pixels where the upsampled 0/1 mask is >= 0.5, about
    the patch itself (120 px for the same patch: the bilinear ramp's half-way points).
* IoU between a predicted mask and the activated region; an empty prediction scores 0.
* CLIP score = 100 * max(cos(image, text), 0), as torchmetrics' ``CLIPScore`` defines it.
* Bootstrap confidence intervals of a mean.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mmsae.codes.maps import activation_mask


REGIONS = ("reference", "majority")
_INACTIVE = 224  # the released code's 8-bit value of an inactive patch (features.py line 131)


def activated_region(grid: np.ndarray, size: tuple[int, int], threshold: float, region: str) -> np.ndarray:
    """Bool (height, width) activated region of a feature on an image (see the module docstring).

    Args:
        grid: (side, side) activations of the base-view patches.
        size: the image's (width, height) in pixels.
        threshold: a patch is active when its activation is > threshold (``evaluate.threshold``).
        region: ``"reference"`` (released code: any pixel the upsampled activity reaches) or
            ``"majority"`` (upsampled 0/1 mask >= 0.5) (``evaluate.region``).

    Raises:
        ValueError: ``region`` is not one of :data:`REGIONS`.
    """
    if region == "reference":
        encoded = np.where(grid > threshold, 0, _INACTIVE).astype(np.uint8)
        up = np.asarray(Image.fromarray(encoded, mode="L").resize(size, Image.Resampling.BILINEAR))
        return up < _INACTIVE
    if region == "majority":
        return activation_mask(grid, size, threshold) >= 0.5
    raise ValueError(f"evaluate.region: {region!r} is not one of {', '.join(REGIONS)}")


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

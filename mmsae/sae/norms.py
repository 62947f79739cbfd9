"""Token-norm statistics, SAELens's activation normalisation, and the outlier-token rule.

A few image tokens of LLaVA-NeXT's residual stream have norms two orders of magnitude above the
median ("massive activations"); FVU, a ratio of summed squares, is then mostly about those tokens.
This module reports the norm distribution per modality, offers SAELens's
``normalize_activations: expected_average_only_in`` (``sae.normalize_activations``) and an outlier
rule (``sae.exclude_norm_above``, a multiple of the median norm).

Normalisation follows SAELens (``ActivationScaler.estimate_scaling_factor``,
``SAE.fold_activation_norm_scaling_factor``): training inputs are multiplied by
``scaling_factor = sqrt(d_model) / mean ||x||`` (so their mean L2 norm is sqrt(d_model)), and after
training the factor is folded into the weights - ``W_enc *= s``, ``W_dec /= s``, ``b_dec /= s`` - so
the saved SAE takes raw activations and its ``cfg.json`` says ``normalize_activations: none``, which is
what SAELens writes and reads for a finished SAE. The factor itself is kept for provenance under
``cfg.json``'s ``mmsae.normalize_activations``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mmsae.sae.model import TopKSAE

NORMALIZE = ("none", "expected_average_only_in")


def row_norms(x: np.ndarray) -> np.ndarray:
    """(n, d_model) activations -> (n,) L2 norms, accumulated in float64."""
    return np.sqrt(np.einsum("nd,nd->n", x, x, dtype=np.float64))


def norm_stats(norms: np.ndarray, is_image: np.ndarray) -> dict:
    """Median, 99th percentile (linear interpolation) and max of token norms, per modality.

    Args:
        norms: (n,) token L2 norms; is_image: (n,) bool.

    Returns:
        ``{"all"|"image"|"text": {"median", "p99", "max"}}``, values None where a modality has no tokens.
    """
    out = {}
    for name, mask in (("all", np.ones(len(norms), bool)), ("image", is_image), ("text", ~is_image)):
        v = norms[mask]
        out[name] = ({"median": float(np.median(v)), "p99": float(np.percentile(v, 99)), "max": float(v.max())}
                     if len(v) else {"median": None, "p99": None, "max": None})
    return out


def scaling_factor(norms: np.ndarray, d_model: int) -> float:
    """SAELens's ``expected_average_only_in`` factor ``sqrt(d_model) / mean(norms)``.

    Raises:
        ValueError: no tokens, or their mean norm is 0.
    """
    mean = float(np.mean(norms)) if len(norms) else 0.0
    if mean <= 0:
        raise ValueError("sae.normalize_activations: no training tokens with a nonzero norm to scale by")
    return math.sqrt(d_model) / mean


@torch.no_grad()
def fold_scaling_factor(sae: TopKSAE, factor: float) -> None:
    """Fold an input scaling ``x -> factor * x`` into ``sae`` in place (SAELens's
    ``fold_activation_norm_scaling_factor``): afterwards ``sae(x).x_hat == sae_before(factor * x).x_hat
    / factor`` and the latents are unchanged."""
    sae.W_enc.mul_(factor)
    sae.W_dec.div_(factor)
    sae.b_dec.div_(factor)

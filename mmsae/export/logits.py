"""A feature's direct effect on the output vocabulary (the "logit lens" of its decoder direction).

SAEDashboard (jbloomAus/SAEDashboard, ``sae_vis_runner.py``) computes each feature's logits as its
decoder row times the unembedding, ``W_dec[f] @ W_U`` with ``W_U`` of shape ``(d_model, vocab)``,
and no normalisation in between. Its Neuronpedia runner loads the model with TransformerLens's
``from_pretrained_no_processing`` (no folding of the final norm into ``W_U``), and its Hugging Face
path takes ``lm_head.weight.T`` as is. :func:`feature_logits` does the same by default; with
``norm_weight`` it first scales the direction by the final RMSNorm/LayerNorm weight (what a
TransformerLens model loaded with ``fold_ln=True`` would give).
"""

from __future__ import annotations

import torch
from torch import nn

from mmsae.export import histograms as hg


def feature_logits(W_dec: torch.Tensor, W_U: torch.Tensor, norm_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of decoder directions: ``(W_dec * norm_weight) @ W_U``.

    Args:
        W_dec: ``(n_features, d_model)`` decoder rows (any dtype; computed in float32).
        W_U: ``(d_model, vocab)`` unembedding (the transpose of ``lm_head.weight``).
        norm_weight: ``(d_model,)`` final-norm weight, or None to leave the directions as they are.

    Returns:
        ``(n_features, vocab)`` float32 logits.

    Raises:
        ValueError: the shapes do not match.
    """
    if W_dec.ndim != 2 or W_U.ndim != 2 or W_dec.shape[1] != W_U.shape[0]:
        raise ValueError(f"feature_logits: W_dec {tuple(W_dec.shape)} and W_U {tuple(W_U.shape)} do not multiply")
    d = W_dec.float()
    if norm_weight is not None:
        if norm_weight.shape != (W_dec.shape[1],):
            raise ValueError(f"feature_logits: norm weight {tuple(norm_weight.shape)} is not ({W_dec.shape[1]},)")
        d = d * norm_weight.float()
    return d @ W_U.float()


def top_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` largest and ``k`` smallest logits of each row.

    Returns:
        ``(pos_ids, pos_values, neg_ids, neg_values)``, each ``(n_features, k)``: positive ones in
        descending order, negative ones in ascending order (most negative first), as SAEDashboard lists them.
    """
    k = min(k, logits.shape[1])
    pos = torch.topk(logits, k, dim=1)
    neg = torch.topk(logits, k, dim=1, largest=False)
    return pos.indices, pos.values, neg.indices, neg.values


def histogram(values: torch.Tensor, n_bins: int = 50) -> tuple[list[float], list[int]]:
    """:func:`mmsae.export.histograms.histogram` of a tensor (detached, on the CPU): SAEDashboard's
    equal-width histogram, ``(bar_values, bar_heights)``."""
    return hg.histogram(values.detach().float().cpu().numpy(), n_bins)


def unembedding(model: nn.Module) -> torch.Tensor:
    """``(d_model, vocab)``: the transpose of ``model.get_output_embeddings().weight``.

    Raises:
        ValueError: the model has no output embeddings.
    """
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    return out.weight.detach().T


def final_norm(model: nn.Module) -> nn.Module | None:
    """The language model's final norm (applied before the unembedding), or None when none is found.

    Looks where transformers keeps it: ``model.language_model.norm`` (LLaVA-NeXT, transformers >= 4.52),
    ``language_model.model.norm`` (older LLaVA), ``model.norm`` (Llama-style causal LMs),
    ``transformer.ln_f`` (GPT-2 style).
    """
    for path in ("model.language_model.norm", "language_model.model.norm", "language_model.norm", "model.norm",
                 "transformer.ln_f"):
        m = model
        for part in path.split("."):
            m = getattr(m, part, None)
            if m is None:
                break
        if isinstance(m, nn.Module) and getattr(m, "weight", None) is not None:
            return m
    return None

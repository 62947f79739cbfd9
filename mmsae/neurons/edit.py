"""Properties of multimodal neurons and editing them (arXiv 2311.07470 §4-5; editing is our design,
docs/methods.md, 'Multimodal neurons').

Neurons are addressed as (layer, i); a neuron's output direction is column i of that layer's
``down_proj.weight`` (d_model, d_ff) - "its W_out row" in the paper's notation.

* Causal effect (:func:`noise_delta`, measured by :func:`mmsae.neurons.properties.causal_sweep`):
  Gaussian noise (``scale`` x the layer's W_out std) on the top-k neurons' columns versus k
  layer-matched random neurons', teacher-forced on the unperturbed model's caption: noun_prob_drop
  (P(noun token) before - after at its predicting position) and fluency_change (relative change of
  the log-likelihood of the caption's other tokens).
* Editing source noun -> target noun: closed form, column_i += eta * sign(a_i) * (u_t - u_s) /
  ||u_t - u_s||^2 (u = W_U rows), which raises logit_t - logit_s by eta * |a_i| before the final
  norm, eta doubled until the target wins at the predicting position; or optimised column deltas
  (target NLL + KL to the original distribution at the other positions + an L2 penalty).
* An edit is a :class:`Delta` saved to safetensors; applying returns the original columns so that
  reverting restores them bit for bit. The model file is never written.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmsae.core.io import atomic_path
from mmsae.neurons.find import mlp_modules, unembedding


@dataclass
class Delta:
    """Column updates: ``{layer: (neuron ids (n,), delta (d_model, n))}``."""

    cols: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def save(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        tensors = {}
        for layer, (idx, d) in self.cols.items():
            tensors[f"layer{layer}.neurons"] = idx.to(torch.int64).contiguous()
            tensors[f"layer{layer}.delta"] = d.detach().float().contiguous()
        with atomic_path(path, ".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Delta":
        t = load_file(str(path))
        layers = sorted({int(k.split(".")[0][5:]) for k in t})
        return cls({layer: (t[f"layer{layer}.neurons"], t[f"layer{layer}.delta"]) for layer in layers})


@torch.no_grad()
def apply_delta(model, delta: Delta, scale: float = 1.0) -> dict:
    """Add ``scale`` x delta to the columns in place; returns the original columns for :func:`revert`."""
    mlps, saved = mlp_modules(model), {}
    for layer, (idx, d) in delta.cols.items():
        w = mlps[layer].down_proj.weight
        saved[layer] = (idx, w[:, idx].clone())
        w[:, idx] += scale * d.to(w.dtype, copy=False).to(w.device)
    return saved


@torch.no_grad()
def revert(model, saved: dict) -> None:
    """Restore columns saved by :func:`apply_delta` exactly."""
    mlps = mlp_modules(model)
    for layer, (idx, cols) in saved.items():
        mlps[layer].down_proj.weight[:, idx] = cols


def _group(neurons: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    by: dict[int, list[int]] = {}
    for layer, i in neurons:
        by.setdefault(layer, []).append(i)
    return {layer: torch.tensor(sorted(set(v))) for layer, v in by.items()}


def noise_delta(model, neurons: list[tuple[int, int]], scale: float, seed: int) -> Delta:
    """Gaussian noise on the given neurons' columns, std = ``scale`` x the layer's W_out std."""
    gen = torch.Generator().manual_seed(seed)
    mlps, cols = mlp_modules(model), {}
    for layer, idx in _group(neurons).items():
        w = mlps[layer].down_proj.weight
        cols[layer] = (idx, torch.randn(w.shape[0], len(idx), generator=gen) * scale * w.float().std().item())
    return Delta(cols)


def random_neurons(model, k: int, seed: int) -> list[tuple[int, int]]:
    """k distinct (layer, neuron) pairs drawn uniformly."""
    mlps = mlp_modules(model)
    d_ff = mlps[0].down_proj.weight.shape[1]
    rng = random.Random(seed)
    picks = rng.sample(range(len(mlps) * d_ff), k)
    return [(p // d_ff, p % d_ff) for p in picks]


def closed_form_delta(model, neurons: list[tuple[int, int, float]], source_id: int, target_id: int, eta: float) -> Delta:
    """column_i += eta * sign(a_i) * (u_t - u_s) / ||u_t - u_s||^2 for (layer, i, a_i) in ``neurons``."""
    w_u = unembedding(model).float()
    direction = w_u[target_id] - w_u[source_id]
    direction = direction / direction.pow(2).sum()
    by: dict[int, list[tuple[int, float]]] = {}
    for layer, i, a in neurons:
        by.setdefault(layer, []).append((i, a))
    cols = {}
    for layer, items in by.items():
        idx = torch.tensor([i for i, _ in items])
        signs = torch.tensor([1.0 if a >= 0 else -1.0 for _, a in items])
        cols[layer] = (idx, eta * direction[:, None] * signs[None, :])
    return Delta(cols)


@torch.no_grad()
def _gap(model, inputs: dict, position: int, source_id: int, target_id: int) -> float:
    logits = model(**inputs, use_cache=False).logits[0, position]
    return float(logits[target_id] - logits[source_id])


def closed_form_edit(model, inputs: dict, position: int, neurons: list[tuple[int, int, float]], source_id: int,
                     target_id: int, eta: float | None = None, max_doublings: int = 10) -> tuple[Delta, float]:
    """The closed-form edit; with ``eta=None`` it starts at (gap + 1) / sum|a_i| and doubles until the
    target's logit exceeds the source's at ``position``. Returns (delta, eta used)."""
    if eta is not None:
        return closed_form_delta(model, neurons, source_id, target_id, eta), eta
    gap = -_gap(model, inputs, position, source_id, target_id)
    eta = max(gap + 1.0, 1.0) / max(sum(abs(a) for *_, a in neurons), 1e-6)
    for _ in range(max_doublings):
        delta = closed_form_delta(model, neurons, source_id, target_id, eta)
        saved = apply_delta(model, delta)
        won = _gap(model, inputs, position, source_id, target_id) > 0
        revert(model, saved)
        if won:
            break
        eta *= 2
    return delta, eta


def optimised_edit(model, inputs: dict, position: int, neurons: list[tuple[int, int, float]], target_id: int,
                   steps: int = 30, lr: float = 1e-2, kl_weight: float = 1.0, l2_weight: float = 1e-3) -> Delta:
    """Column deltas trained on: NLL of the target at ``position`` + kl_weight x KL(original || edited)
    over the other positions + l2_weight x ||delta||^2. The model's weights are not changed."""
    mlps = mlp_modules(model)
    groups = _group([(layer, i) for layer, i, _ in neurons])
    d_model = mlps[0].down_proj.weight.shape[0]
    params = {layer: torch.zeros(d_model, len(idx), requires_grad=True) for layer, idx in groups.items()}
    with torch.no_grad():
        ref = F.log_softmax(model(**inputs, use_cache=False).logits[0].float(), -1)
    keep = torch.ones(ref.shape[0], dtype=torch.bool)
    keep[position] = False

    def hook(layer):
        def fn(mod, inp, out):
            return out + inp[0][..., groups[layer]] @ params[layer].T.to(out.dtype)
        return fn

    handles = [mlps[layer].down_proj.register_forward_hook(hook(layer)) for layer in groups]
    opt = torch.optim.Adam(params.values(), lr=lr)
    try:
        for _ in range(steps):
            logp = F.log_softmax(model(**inputs, use_cache=False).logits[0].float(), -1)
            nll = -logp[position, target_id]
            kl = F.kl_div(logp[keep], ref[keep], log_target=True, reduction="batchmean")
            l2 = sum(p.pow(2).sum() for p in params.values())
            loss = nll + kl_weight * kl + l2_weight * l2
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
    return Delta({layer: (groups[layer], params[layer].detach().clone()) for layer in groups})


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (0 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 0.0


def mean_pairwise_overlap(sets: dict, same: bool) -> float | None:
    """Mean Jaccard overlap of top-neuron sets keyed by (image, noun): between different nouns
    (``same=False``: specificity, lower is more specific) or the same noun on different images
    (``same=True``: cross-image invariance). None when no pair qualifies."""
    keys, vals = list(sets), []
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if (same and a[1] == b[1] and a[0] != b[0]) or (not same and a[1] != b[1]):
                vals.append(jaccard(sets[a], sets[b]))
    return float(sum(vals) / len(vals)) if vals else None

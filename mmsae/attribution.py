"""Attribute an answer to SAE features on image and text tokens (attribution patching).

Metric m = logit(answer) - logit(baseline) at the last position. The SAE is spliced into the hooked
layer with its error term held constant, x' = x_hat(z) + eps with eps = (x - x_hat(x)).detach(), so
the forward pass is unchanged. One backward pass gives dm/dz for every active latent at every
position; the attribution (zero baseline, Nanda 2023) is

    A[t, f] = z[t, f] * dm/dz[t, f]          (positive supports the answer)

and the error node's share is <eps_t, dm/dx'_t>. Only the k latents active at a position can have
A != 0, so the leaves are the (seq, k) TopK values rather than a dense (seq, d_sae) tensor. The
paper's released code instead loops over features with two forwards and a backward each.

:func:`ablation_effects` validates: the true effect of zero-ablating a feature at every position
(keeping the error term) against its summed attribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmsae.data.corpus import Sample, load_image
from mmsae.models import image_token_coordinates, prepare_inputs, token_layout
from mmsae.sae.model import TopKSAE


@dataclass
class AttributionResult:
    """Everything one case yields.

    Attributes:
        metric: m on the unmodified model.
        positions, features, values: the nonzero A[t, f] as three aligned arrays (n,).
        error: (seq,) the error node's attribution per position.
        grad_norm: (seq,) ||dm/dx'_t||.
    """

    metric: float
    positions: np.ndarray
    features: np.ndarray
    values: np.ndarray
    error: np.ndarray
    grad_norm: np.ndarray


class _Splice:
    """Forward hook: x -> x_hat(z) + eps, with z's TopK values as grad leaves; optional ablation."""

    def __init__(self, sae: TopKSAE, ablate: int | None = None, track: bool = True):
        self.sae, self.ablate, self.track = sae, ablate, track
        self.vals = self.idx = self.x_out = self.eps = None

    def __call__(self, _module, _inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        flat = x.reshape(-1, x.shape[-1]).to(self.sae.W_enc.dtype)
        with torch.no_grad():
            vals, idx = self.sae.encode(flat)
            x_hat = self.sae.decode(vals, idx)
            eps = flat - x_hat
            if self.ablate is not None:
                vals = vals.masked_fill(idx == self.ablate, 0.0)
        vals = vals.detach().requires_grad_(self.track)
        new = (self.sae.decode(vals, idx) + eps).to(x.dtype).reshape(x.shape)
        if self.track:
            new.retain_grad()
        self.vals, self.idx, self.x_out, self.eps = vals, idx, new, eps
        return (new, *output[1:]) if isinstance(output, tuple) else new


def _metric(model: nn.Module, inputs: dict, answer_id: int, baseline_id: int) -> torch.Tensor:
    logits = model(**inputs, use_cache=False).logits[0, -1]
    return logits[answer_id].float() - logits[baseline_id].float()


def attribute(model: nn.Module, module: nn.Module, sae: TopKSAE, inputs: dict, answer_id: int, baseline_id: int) -> AttributionResult:
    """Attribution of m to every active feature at every position, in one forward and one backward.

    Args:
        model: the subject model; module: its hooked layer; sae: the SAE of that layer.
        inputs: processor outputs for one sample (batch 1).
        answer_id, baseline_id: token ids of the answer and the baseline.
    """
    splice = _Splice(sae)
    handle = module.register_forward_hook(splice)
    try:
        with torch.enable_grad():
            m = _metric(model, inputs, answer_id, baseline_id)
            m.backward()
    finally:
        handle.remove()
    a = (splice.vals * splice.vals.grad).detach()
    g = splice.x_out.grad.reshape(-1, splice.x_out.shape[-1]).float()
    err = (splice.eps.float() * g).sum(-1)
    nz = a != 0
    pos = torch.arange(a.shape[0])[:, None].expand_as(a)[nz]
    return AttributionResult(
        metric=m.item(),
        positions=pos.numpy(),
        features=splice.idx[nz].cpu().numpy(),
        values=a[nz].cpu().numpy(),
        error=err.detach().cpu().numpy(),
        grad_norm=g.norm(dim=-1).detach().cpu().numpy(),
    )


@torch.no_grad()
def ablation_effects(model: nn.Module, module: nn.Module, sae: TopKSAE, inputs: dict, answer_id: int, baseline_id: int,
                     features: list[int]) -> tuple[float, dict[int, float]]:
    """The true effect m(spliced) - m(feature zeroed everywhere) for each feature, one re-run each.

    Returns (m with the SAE spliced, {feature: effect}). The splice keeps the error term, so the
    first value equals the unmodified model's metric.
    """
    def run(ablate):
        splice = _Splice(sae, ablate=ablate, track=False)
        handle = module.register_forward_hook(splice)
        try:
            return _metric(model, inputs, answer_id, baseline_id).item()
        finally:
            handle.remove()

    base = run(None)
    return base, {f: base - run(f) for f in features}


def per_feature_loop_cost(model: nn.Module, module: nn.Module, sae: TopKSAE, inputs: dict, answer_id: int,
                          baseline_id: int, features: list[int]) -> None:
    """The released code's approach for comparison: per feature, two forwards and one backward."""
    for f in features:
        for ablate in (None, f):
            splice = _Splice(sae, ablate=ablate, track=ablate is None)
            handle = module.register_forward_hook(splice)
            try:
                with torch.enable_grad():
                    m = _metric(model, inputs, answer_id, baseline_id)
                    if ablate is None:
                        m.backward()
            finally:
                handle.remove()


def pool(result: AttributionResult, modality: np.ndarray, how: str = "sum") -> dict[str, dict[int, float]]:
    """Pool A[t, f] per feature over image positions and over text positions separately.

    Args:
        modality: (seq,) array of ``"image"`` / ``"text"`` per position.
        how: ``sum`` (total contribution), ``mean`` (over that modality's positions) or ``max``
            (largest absolute value, signed).
    """
    out: dict[str, dict[int, float]] = {}
    for mod in ("image", "text"):
        sel = modality[result.positions] == mod
        n_pos = max(int((modality == mod).sum()), 1)
        feats, vals = result.features[sel], result.values[sel]
        agg: dict[int, float] = {}
        for f, v in zip(feats.tolist(), vals.tolist()):
            if how == "max":
                agg[f] = v if abs(v) > abs(agg.get(f, 0.0)) else agg.get(f, 0.0)
            else:
                agg[f] = agg.get(f, 0.0) + v
        if how == "mean":
            agg = {f: v / n_pos for f, v in agg.items()}
        out[mod] = agg
    return out


def run_case(subject, module: nn.Module, sae: TopKSAE, case: dict, top_k: int = 8, validate_top: int = 15,
             how: str = "sum") -> tuple[list[dict], dict, dict]:
    """Attribution for one configured case, with validation by zero-ablation.

    Args:
        case: ``{"name", "prompt", "image" (path or None), "answer_prefix", "answer", "baseline"}``;
            answer and baseline must each be one token.
        top_k: features kept per modality for maps and the report.
        validate_top: the features with the largest |total attribution| that are ablated for real.

    Returns:
        (rows, summary, grids): rows of the nonzero A[t, f] (position, token, modality, view, patch
        coordinates, feature, attribution); a JSON-able summary (metric, top features per modality,
        per-token text attribution, validation correlation, timings); and the per-view grids of
        the top image features ``{(feature, view): (side, side) array}``.

    Raises:
        ValueError: the answer or baseline is not a single token, or the image cannot be read.
    """
    import time


    tok = subject.tokenizer
    ids = {}
    for key in ("answer", "baseline"):
        enc = tok.encode(case[key], add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"attribution case {case['name']!r}: {key} {case[key]!r} is {len(enc)} tokens {enc}, not one")
        ids[key] = enc[0]
    image = None
    if case.get("image"):
        image, status = load_image(case["image"])
        if image is None:
            raise ValueError(f"attribution case {case['name']!r}: image {case['image']}: {status}")
    inputs = dict(prepare_inputs(subject, [(Sample(case["name"], case["prompt"], case.get("image")), image)],
                                 suffix=case.get("answer_prefix") or "").to(subject.device))
    input_ids = inputs["input_ids"][0].cpu()
    coords = image_token_coordinates(subject.model, inputs["image_sizes"].cpu())[0] if image is not None else None
    layout = token_layout(subject, input_ids, coords, case["name"])

    t0 = time.perf_counter()
    res = attribute(subject.model, module, sae, inputs, ids["answer"], ids["baseline"])
    t_attr = time.perf_counter() - t0
    pooled = pool(res, layout["modality"], how)
    totals: dict[int, float] = {}
    for f, v in zip(res.features.tolist(), res.values.tolist()):
        totals[f] = totals.get(f, 0.0) + v
    check = sorted(totals, key=lambda f: -abs(totals[f]))[:validate_top]
    t0 = time.perf_counter()
    m_spliced, effects = ablation_effects(subject.model, module, sae, inputs, ids["answer"], ids["baseline"], check)
    t_abl = time.perf_counter() - t0
    x, y = np.array([totals[f] for f in check]), np.array([effects[f] for f in check])
    pearson = float(np.corrcoef(x, y)[0, 1]) if len(check) > 2 and x.std() > 0 and y.std() > 0 else None

    tokens = tok.batch_decode([[i] for i in input_ids.tolist()])
    rows = [{"case": case["name"], "position": int(p), "token": tokens[p], "modality": str(layout["modality"][p]),
             "view": int(layout["view"][p]), "patch_row": int(layout["patch_row"][p]), "patch_col": int(layout["patch_col"][p]),
             "feature": int(f), "attribution": float(v)} for p, f, v in zip(res.positions, res.features, res.values)]
    top = {m: sorted(pooled[m], key=lambda f: -abs(pooled[m][f]))[:top_k] for m in ("image", "text")}
    grids = {}
    if coords is not None:
        side = int(coords[:, 1].max()) + 1
        for f in top["image"]:
            sel = (res.features == f) & (layout["modality"][res.positions] == "image") & (layout["view"][res.positions] >= 0)
            for p, v in zip(res.positions[sel], res.values[sel]):
                key = (int(f), int(layout["view"][p]))
                grids.setdefault(key, np.zeros((side, side), np.float32))[layout["patch_row"][p], layout["patch_col"][p]] += v
    text_pos = np.nonzero(layout["modality"] == "text")[0]
    per_token = np.zeros(len(tokens))
    np.add.at(per_token, res.positions, res.values)
    summary = {
        "case": case["name"], "prompt": case["prompt"], "image": case.get("image"), "answer": case["answer"],
        "baseline": case["baseline"], "metric": res.metric, "metric_spliced": m_spliced,
        "error_attribution": float(res.error.sum()), "feature_attribution": float(res.values.sum()),
        "pool": how, "top_image": [{"feature": f, "attribution": pooled["image"][f]} for f in top["image"]],
        "top_text": [{"feature": f, "attribution": pooled["text"][f]} for f in top["text"]],
        "text_tokens": [tokens[p] for p in text_pos], "text_attribution": per_token[text_pos].tolist(),
        "validation": {"features": check, "attribution": x.tolist(), "ablation_effect": y.tolist(), "pearson": pearson},
        "seconds": {"attribution": t_attr, "ablation_per_feature": t_abl / max(len(check), 1)},
        "n_active_features": len(totals),
    }
    return rows, summary, grids

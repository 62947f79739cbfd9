"""Attribute an answer to SAE features on image and text tokens (attribution patching).

Metric m = logit(answer) - logit(baseline) at the last position.

``ours`` (default; the method the paper cites: attribution patching, Nanda 2023, with the error
term held as in Marks et al. 2024): the SAE is spliced into the hooked layer with its error term held
constant, x' = x_hat(z) + eps with eps = (x - x_hat(x)).detach(), so the forward pass is unchanged.
One backward pass gives dm/dz for every active latent at every position; the attribution (zero
baseline) is

    A[t, f] = z[t, f] * dm/dz[t, f]          (positive supports the answer)

and the error node's share is <eps_t, dm/dx'_t>. Only the k latents active at a position can have
A != 0, so the leaves are the (seq, k) TopK values rather than a dense (seq, d_sae) tensor.

``reference`` (:func:`reference_attribution`): the paper's released code
(EvolvingLMMs-Lab/multimodal-sae, ``sae_auto_interp/features/patching/attribution.py``,
``Attribution.get_attribution``, with ``get_model_forward_cache_with_sae`` and
``get_logit_diff`` from ``patching/utils.py``). The layer output is replaced by the SAE
reconstruction alone (error term dropped); per feature f, a clean forward and a forward with f's
post-ReLU pre-activation masked to 0 *before* TopK (so another latent may take its slot); the
gradient is taken at the ablated point:

    A_ref[t, f] = <x_hat_clean_t - x_hat_ablated_t, dm(ablated)/dx_hat_ablated_t>

Two forwards and a backward per feature (the clean forward is the same for every feature, so it
runs once here).

:func:`ablation_effects` is the truth ours is checked against: the effect m - m(f zeroed at every
position, error term kept) of each of the top features (:func:`agreement`: Pearson r and sign
agreement). In ``reference`` mode the validation runs on the model that method explains:
:func:`reconstruction_ablation_effects`, m_recon - m_recon(f masked to 0 before TopK), error term
dropped; that mode's summary reports ``metric`` = m_recon (``metric_reconstruction``; the
reconstruction-spliced model's answer can flip: the demo's "capital" case has +5.36 clean, -0.87
spliced), keeps the unmodified model's in ``metric_clean``, and has no error node
(``error_attribution`` null). The ``ours`` column of the validation is then checked against that
ablation too.

Special tokens the SAE was trained without (``sae.exclude_special_tokens``, SAELens's
``exclude_special_tokens``) are not decomposed by either method (``skip``, :func:`mmsae.interventions.attribution_case.run_case`'s
``keep_special``): no latent is active there, so their whole activation is the error node (ours)
or stays as it is (reference; the released code splices every position, its SAE having seen them).
On those positions the SAE's latents are out of distribution: LLaVA-NeXT-style chat templates open
with ``<|im_start|>``, an attention sink whose norm is far above a word's, and in the demo run
those positions held about half of all |A| and every one of the top text features. Loss recovered
(:mod:`mmsae.interventions.loss_recovered`) and the codes (:func:`mmsae.codes.rows.encode_corpus`) leave them
out the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmsae.sae.model import TopKSAE
from mmsae.sae.splice import Clamp, SteeringHook


@dataclass
class AttributionResult:
    """Everything one case yields.

    Attributes:
        metric: m on the model the attribution explains (ours: the unmodified model; reference: the
            reconstruction-spliced one).
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


class SAESplice:
    """Forward hook that splices the SAE into a layer with its error term held constant.

    The layer output x (batch, seq, d_model) becomes x_hat(z) + eps with eps = x - x_hat(x)
    detached, so the forward is unchanged. With ``track`` the (batch*seq, k) TopK values are grad
    leaves (``vals``) and the new output keeps its grad (``x_out``); with ``ablate`` = f, feature f's
    value is set to 0 wherever it is in the top k (zero-ablation, error term kept). ``skip``
    (batch*seq,) bool: positions left undecomposed (no latent active: x_hat = b_dec, the rest is eps).

    Attributes set by each call: vals, idx (n, k); x_out (batch, seq, d_model); eps (n, d_model).
    """

    def __init__(self, sae: TopKSAE, ablate: int | None = None, track: bool = True, skip: torch.Tensor | None = None):
        self.sae, self.ablate, self.track, self.skip = sae, ablate, track, skip
        self.vals = self.idx = self.x_out = self.eps = None

    def __call__(self, _module, _inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        flat = x.reshape(-1, x.shape[-1]).to(self.sae.W_enc.dtype)
        with torch.no_grad():
            vals, idx = self.sae.encode(flat)
            if self.skip is not None:
                vals = vals.masked_fill(self.skip.reshape(-1, 1).to(vals.device), 0.0)
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


def logit_diff(model: nn.Module, inputs: dict, answer_id: int, baseline_id: int) -> torch.Tensor:
    """m = logit(answer) - logit(baseline) at the last position of batch element 0 (a 0-d float tensor)."""
    logits = model(**inputs, use_cache=False).logits[0, -1]
    return logits[answer_id].float() - logits[baseline_id].float()


def attribute(model: nn.Module, module: nn.Module, sae: TopKSAE, inputs: dict, answer_id: int, baseline_id: int,
              skip: torch.Tensor | None = None) -> AttributionResult:
    """Attribution of m to every active feature at every position, in one forward and one backward.

    Args:
        model: the subject model; module: its hooked layer; sae: the SAE of that layer.
        inputs: processor outputs for one sample (batch 1).
        answer_id, baseline_id: token ids of the answer and the baseline.
        skip: (seq,) bool positions left undecomposed (:class:`SAESplice`): no feature attribution
            there; their whole activation (less b_dec) is in the error node.
    """
    splice = SAESplice(sae, skip=skip)
    handle = module.register_forward_hook(splice)
    try:
        with torch.enable_grad():
            m = logit_diff(model, inputs, answer_id, baseline_id)
            m.backward()
    finally:
        handle.remove()
    a = (splice.vals * splice.vals.grad).detach()
    g = splice.x_out.grad.reshape(-1, splice.x_out.shape[-1]).float()
    err = (splice.eps.float() * g).sum(-1)
    nz = a != 0
    pos = torch.arange(a.shape[0], device=a.device)[:, None].expand_as(a)[nz]  # on a's device: a CUDA mask cannot index a CPU tensor
    return AttributionResult(
        metric=m.item(),
        positions=pos.cpu().numpy(),
        features=splice.idx[nz].cpu().numpy(),
        values=a[nz].cpu().numpy(),
        error=err.detach().cpu().numpy(),
        grad_norm=g.norm(dim=-1).detach().cpu().numpy(),
    )


@torch.no_grad()
def ablation_effects(model: nn.Module, module: nn.Module, sae: TopKSAE, inputs: dict, answer_id: int, baseline_id: int,
                     features: list[int], skip: torch.Tensor | None = None) -> tuple[float, dict[int, float]]:
    """The true effect m(spliced) - m(feature zeroed everywhere) for each feature, one re-run each.

    Returns (m with the SAE spliced, {feature: effect}). The splice keeps the error term, so the
    first value equals the unmodified model's metric. ``skip``: as in :func:`attribute` (a feature
    is not active there, so not ablated there).
    """
    def run(ablate):
        splice = SAESplice(sae, ablate=ablate, track=False, skip=skip)
        handle = module.register_forward_hook(splice)
        try:
            return logit_diff(model, inputs, answer_id, baseline_id).item()
        finally:
            handle.remove()

    base = run(None)
    return base, {f: base - run(f) for f in features}


class ReconstructionSplice:
    """Forward hook of the released code (``get_model_forward_cache_with_sae``): the layer output
    becomes ``decode(select_topk(ReLU(pre_acts(x)) * mask))``, error term dropped; ``off`` = f masks
    feature f to 0 before TopK. With ``track`` the new output is a grad leaf (``out``). ``skip``
    (batch*seq,) bool: positions whose output stays as it is."""

    def __init__(self, sae: TopKSAE, off: int | None = None, track: bool = False, skip: torch.Tensor | None = None):
        # the same map as steering's reference mode with f clamped to 0 (one implementation of it)
        self.recon = SteeringHook(sae, [] if off is None else [Clamp(off, 0.0)], mode="reference", positions="all")
        self.track, self.out, self.skip = track, None, skip

    def __call__(self, _module, _inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        new = self.recon.steer(x, skip=None if self.skip is None else self.skip.to(x.device).view(x.shape[:-1]))
        if self.track:
            new.requires_grad_(True)
        self.out = new
        return (new, *output[1:]) if isinstance(output, tuple) else new


def reconstruction_ablation_effects(model: nn.Module, module: nn.Module, sae: TopKSAE, inputs: dict, answer_id: int,
                                    baseline_id: int, features: list[int], skip: torch.Tensor | None = None
                                    ) -> tuple[float, dict[int, float]]:
    """The true effect of each feature inside the reconstruction-only splice (the model the reference
    method explains): m(x_hat) - m(x_hat with f masked to 0 before TopK), error term dropped in both
    (:class:`ReconstructionSplice`, ``off=f``), one re-run each.

    Returns (m with the reconstruction spliced in, {feature: effect}). ``skip``: positions left as they are.
    """
    def run(off):
        handle = module.register_forward_hook(ReconstructionSplice(sae, off=off, skip=skip))
        try:
            with torch.no_grad():
                return logit_diff(model, inputs, answer_id, baseline_id).item()
        finally:
            handle.remove()

    base = run(None)
    return base, {f: base - run(f) for f in features}


def reference_attribution(model: nn.Module, module: nn.Module, sae: TopKSAE, inputs: dict, answer_id: int, baseline_id: int,
                          features: list[int], skip: torch.Tensor | None = None) -> tuple[float, dict[int, np.ndarray]]:
    """The released code's attribution (module docstring) of m to each of ``features``.

    Args:
        skip: (seq,) bool positions left as they are (:class:`ReconstructionSplice`); they get 0.

    Returns:
        (m with the reconstruction spliced in (at the positions not skipped), {feature: (seq,)
        per-position attribution}) for batch element 0; the positions where f is not in the top k get 0.
    """
    clean = ReconstructionSplice(sae, skip=skip)
    handle = module.register_forward_hook(clean)
    try:
        with torch.no_grad():
            m_clean = logit_diff(model, inputs, answer_id, baseline_id).item()
    finally:
        handle.remove()
    out = {}
    for f in features:
        abl = ReconstructionSplice(sae, off=f, track=True, skip=skip)
        handle = module.register_forward_hook(abl)
        try:
            with torch.enable_grad():
                logit_diff(model, inputs, answer_id, baseline_id).backward()
        finally:
            handle.remove()
        a = ((clean.out.float() - abl.out.detach().float()) * abl.out.grad.float()).sum(-1)
        out[f] = a[0].cpu().numpy()
    return m_clean, out


def agreement(attribution: list[float], effect: list[float]) -> dict:
    """How well attributions predict true effects over a set of features.

    Returns:
        ``{"pearson_r": r or None (fewer than 3 features or a constant side), "sign_agreement":
        fraction of features whose attribution and effect have the same sign (np.sign; None when
        empty), "n_features": n}``.
    """
    x, y = np.asarray(attribution, float), np.asarray(effect, float)
    n = len(x)
    r = float(np.corrcoef(x, y)[0, 1]) if n > 2 and x.std() > 0 and y.std() > 0 else None
    sign = float((np.sign(x) == np.sign(y)).mean()) if n else None
    return {"pearson_r": r, "sign_agreement": sign, "n_features": n}


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

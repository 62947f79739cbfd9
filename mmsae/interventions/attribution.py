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
``exclude_special_tokens``) are not decomposed by either method (``skip``, :func:`run_case`'s
``keep_special``): no latent is active there, so their whole activation is the error node (ours)
or stays as it is (reference; the released code splices every position, its SAE having seen them).
On those positions the SAE's latents are out of distribution: LLaVA-NeXT-style chat templates open
with ``<|im_start|>``, an attention sink whose norm is far above a word's, and in the demo run
those positions held about half of all |A| and every one of the top text features. Loss recovered
(:mod:`mmsae.interventions.loss_recovered`) and the codes (:func:`mmsae.codes.rows.encode_corpus`) leave them
out the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmsae.data.corpus import Sample, load_image
from mmsae.models import image_token_coordinates, prepare_inputs, token_layout
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


def _totals(features: np.ndarray, values: np.ndarray) -> dict[int, float]:
    """Sum of the attribution of each feature over positions."""
    out: dict[int, float] = {}
    for f, v in zip(features.tolist(), values.tolist()):
        out[f] = out.get(f, 0.0) + v
    return out


def case_inputs(subject, case: dict, token_keys: tuple[str, ...], what: str = "attribution case"
                ) -> tuple[dict[str, int], dict, torch.Tensor | None, dict]:
    """The model inputs of one configured case: its prompt (and image), the chat template's generation
    prompt, then ``case["answer_prefix"]``; and the token id of each of ``token_keys``.

    Returns:
        (``{key: token id}``, processor outputs on the subject's device (batch 1), the image tokens'
        coordinates (:func:`mmsae.models.image_token_coordinates`; None without an image), the
        :func:`mmsae.models.token_layout` of the (seq,) input ids).

    Raises:
        ValueError: a ``token_keys`` string that is not one token, or an image that cannot be read
            (the message opens with ``what`` and the case's name).
    """
    tok = subject.tokenizer
    ids = {}
    for key in token_keys:
        enc = tok.encode(case[key], add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"{what} {case['name']!r}: {key} {case[key]!r} is {len(enc)} tokens {enc}, not one")
        ids[key] = enc[0]
    image = None
    if case.get("image"):
        image, status = load_image(case["image"])
        if image is None:
            raise ValueError(f"{what} {case['name']!r}: image {case['image']}: {status}")
    inputs = dict(prepare_inputs(subject, [(Sample(case["name"], case["prompt"], case.get("image")), image)],
                                 suffix=case.get("answer_prefix") or "").to(subject.device))
    coords = image_token_coordinates(subject.model, inputs["image_sizes"].cpu())[0] if image is not None else None
    return ids, inputs, coords, token_layout(subject, inputs["input_ids"][0].cpu(), coords, case["name"])


def run_case(subject, module: nn.Module, sae: TopKSAE, case: dict, top_k: int, validate_top: int, how: str,
             method: str, keep_special: bool = False) -> tuple[list[dict], dict, dict]:
    """Attribution for one configured case, with both methods validated against zero-ablation.

    Args:
        case: ``{"name", "prompt", "image" (path or None), "answer_prefix", "answer", "baseline"}``;
            answer and baseline must each be one token.
        top_k: features kept per modality for maps and the report (``attribution.top_k``).
        validate_top: the features with the largest |total attribution| under ``method`` that are
            ablated for real (``attribution.validate_top``).
        how: pooling over positions (``attribution.pool``).
        method: ``ours`` or ``reference`` (module docstring; ``attribution.method``); reference runs
            one forward and one backward per active feature.
        keep_special: leave the special-token positions undecomposed, in both methods and the
            ablations (the SAE was trained without them; :func:`mmsae.sae.trained_without_special_tokens`).

    Returns:
        (rows, summary, grids): rows of the nonzero A[t, f] of ``method`` (position, token, modality,
        view, patch coordinates, feature, attribution); a JSON-able summary (metric, top features per
        modality, per-token text attribution, validation, timings); and the per-view grids of the top
        image features ``{(feature, view): (side, side) array}``. ``summary["validation"]``:
        ``features`` and their true ``ablation_effect``; ``ours`` and ``reference``, each
        :func:`agreement` plus its ``attribution`` (totals over positions) of those features;
        ``pearson`` and ``attribution`` repeat ``ours`` for readers of the older layout;
        ``ablation_splice``: ``error_kept`` (ours) or ``reconstruction`` (reference).
        ``special_tokens_spliced`` (not ``keep_special``) and ``n_positions_unspliced``.

    Raises:
        ValueError: an unknown method, the answer or baseline is not a single token, or the image
            cannot be read.
    """
    if method not in ("ours", "reference"):
        raise ValueError(f"attribution.method: {method!r} is not one of ours, reference")
    tok = subject.tokenizer
    ids, inputs, coords, layout = case_inputs(subject, case, ("answer", "baseline"))
    input_ids = inputs["input_ids"][0].cpu()

    model, answer, baseline = subject.model, ids["answer"], ids["baseline"]
    skip = torch.from_numpy(np.isin(input_ids.numpy(), subject.special_token_ids)) if keep_special else None
    t0 = time.perf_counter()
    ours = attribute(model, module, sae, inputs, answer, baseline, skip)
    t_attr = time.perf_counter() - t0
    ours_totals = _totals(ours.features, ours.values)
    t_ref, m_recon, ref_values = 0.0, None, {}
    if method == "reference":
        t0 = time.perf_counter()
        m_recon, ref_values = reference_attribution(model, module, sae, inputs, answer, baseline, sorted(ours_totals), skip)
        t_ref = time.perf_counter() - t0
        pos = [np.nonzero(a)[0] for a in ref_values.values()] or [np.zeros(0, np.int64)]
        res = AttributionResult(metric=m_recon, positions=np.concatenate(pos).astype(np.int64),
                                features=np.concatenate([np.full(len(p), f) for f, p in zip(ref_values, pos)] or [pos[0]]).astype(np.int64),
                                values=np.concatenate([a[p] for a, p in zip(ref_values.values(), pos)] or [pos[0]]).astype(np.float32),
                                error=ours.error, grad_norm=ours.grad_norm)  # the error node is ours' (the reference has none)
    else:
        res = ours
    totals = _totals(res.features, res.values)
    modality = layout["modality"] if skip is None else np.where(skip.numpy(), "special", layout["modality"])
    pooled = pool(res, modality, how)  # "mean": over the decomposed positions of a modality
    check = sorted(totals, key=lambda f: -abs(totals[f]))[:validate_top]
    t0 = time.perf_counter()
    if method == "reference":  # the model it explains: the reconstruction alone, no error term
        m_spliced, effects = reconstruction_ablation_effects(model, module, sae, inputs, answer, baseline, check, skip)
    else:
        m_spliced, effects = ablation_effects(model, module, sae, inputs, answer, baseline, check, skip)
    t_abl = time.perf_counter() - t0
    if method == "ours":
        t0 = time.perf_counter()
        m_recon, ref_values = reference_attribution(model, module, sae, inputs, answer, baseline, check, skip)
        t_ref = time.perf_counter() - t0
    y = [effects[f] for f in check]
    x_ours = [ours_totals.get(f, 0.0) for f in check]
    x_ref = [float(ref_values[f].sum()) for f in check]
    validation = {"features": check, "ablation_effect": y,
                  "ablation_splice": "reconstruction" if method == "reference" else "error_kept",
                  "ours": {**agreement(x_ours, y), "attribution": x_ours},
                  "reference": {**agreement(x_ref, y), "attribution": x_ref}}
    validation.update(pearson=validation["ours"]["pearson_r"], attribution=x_ours)

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
        "baseline": case["baseline"], "method": method, "metric": res.metric, "metric_clean": ours.metric,
        "metric_spliced": m_spliced, "metric_reconstruction": m_recon,
        "error_attribution": float(res.error.sum()) if method == "ours" else None,  # the reference has no error node
        "feature_attribution": float(res.values.sum()),
        "pool": how, "top_image": [{"feature": f, "attribution": pooled["image"][f]} for f in top["image"]],
        "top_text": [{"feature": f, "attribution": pooled["text"][f]} for f in top["text"]],
        "text_tokens": [tokens[p] for p in text_pos], "text_attribution": per_token[text_pos].tolist(),
        "validation": validation,
        "seconds": {"attribution": t_attr, "ablation_per_feature": t_abl / max(len(check), 1),
                    "reference_per_feature": t_ref / max(len(ref_values), 1)},
        "n_active_features": len(totals),
        "special_tokens_spliced": not keep_special, "n_positions_unspliced": int(skip.sum()) if skip is not None else 0,
    }
    return rows, summary, grids

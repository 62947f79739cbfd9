"""One configured attribution case end to end (the ``attribute`` rule's unit of work): its model
inputs (:func:`case_inputs`, shared with :mod:`mmsae.interventions.repair`), both methods of
:mod:`mmsae.interventions.attribution` and their validation against zero-ablation (:func:`run_case`).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from mmsae.data.corpus import Sample, load_image
from mmsae.interventions.attribution import (AttributionResult, ablation_effects, agreement, attribute, pool,
                                             reconstruction_ablation_effects, reference_attribution)
from mmsae.models import image_token_coordinates, prepare_inputs, token_layout
from mmsae.sae.model import TopKSAE


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

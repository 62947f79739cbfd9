"""Answer repair: find the SAE features behind a wrong answer and intervene on them until it flips.

The case study of arXiv 2411.14982's write-up (LMMs-Lab, "Large Multi-modal Models Can Interpret
Features in Large Multi-modal Models"): a hallucinated answer is traced by attribution to an
over-weighted text feature and repaired by clamping image features up. Here, for each configured
case (a prompt, optionally an image, the wrong answer the model gives and the correct one):

1. **Rank** (:func:`rank_features`): attribution patching (:func:`mmsae.interventions.attribution.attribute`,
   error term held) of m = logit(wrong) - logit(correct) at the answer position, pooled per feature
   over the text positions and over the image positions (:func:`~mmsae.interventions.attribution.pool`,
   ``sum``). Text features with the largest positive total push toward the wrong answer; image
   features with the most negative total push toward the correct one.
2. **Intervene**, in order and within ``budget`` features at once: ablate the top 1..budget text
   features (clamp each to ``v`` x its largest activation on the prompt's text positions, for each
   ``v`` of ``ablate_values``; 0 is zero-ablation, a negative value pushes against the feature),
   applied at every text position of the prompt and of the generated tokens; then clamp up the top
   1..budget image features to ``v`` x their largest activation on the image positions (``clamp_values``),
   at the image positions. The clamp is :class:`mmsae.sae.splice.SteeringHook` in ``error_term``
   mode (x + sum_f (c_f - z_f) W_dec[f]; no clamp = the unmodified model), every intervention of a
   case one row of one batched greedy :func:`mmsae.interventions.steer.generate`.
3. **Judge** (:func:`is_repaired`): success = the first greedy token changed to the correct answer's
   token AND the continuation stays fluent: ppl_after <= max_ppl_ratio x ppl_before, both perplexities
   under the unmodified model (:func:`mmsae.interventions.verdict.continuation_perplexity`), the
   steering verdict's rule (:func:`mmsae.interventions.verdict.is_success`).
4. **Control** (:func:`matched_controls`): each intervention again on as many other features active
   on the same modality of the prompt, drawn (seeded) among those of the nearest mean activation to
   each top feature, ``control_draws`` times. A changed layer output can flip a close call by itself;
   the top features' successes mean something only above the control's.

Special tokens the SAE was trained without are neither decomposed nor clamped (``keep_special``), as
in attribution and steering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmsae.interventions.attribution import SAESplice, attribute, pool
from mmsae.interventions.attribution_case import case_inputs
from mmsae.interventions.steer import generate_rows
from mmsae.interventions.verdict import continuation_perplexity, is_success, prompt_state
from mmsae.sae.model import TopKSAE
from mmsae.sae.splice import Clamp, SteeringHook

MATCH_POOL = 5
"""A control feature is drawn among this many candidates of the nearest mean activation to its target."""

KINDS = {"ablate_text": "text", "clamp_image": "image"}
"""The interventions, in the order they are tried, and the modality whose features and positions each uses."""


@dataclass(frozen=True)
class RepairConfig:
    """What repair does to each case (the ``repair`` config section, config/schema.yaml).

    Attributes:
        budget: at most this many features intervened on at once (the top 1, 2, ..., budget).
        ablate_values: text features are clamped to value x their max activation on the prompt's text.
        clamp_values: image features are clamped to value x their max activation on the image tokens.
        control_draws: how many matched random feature sets each intervention is repeated on.
        seed: seeds the control draws.
        max_new_tokens: greedy tokens generated per intervention (the continuation judged for fluency).
        max_ppl_ratio: the fluency bound of :func:`is_repaired`.
        keep_special: leave special-token positions undecomposed and unclamped.
    """

    budget: int = 3
    ablate_values: tuple[float, ...] = (0.0, -1.0)
    clamp_values: tuple[float, ...] = (2.0, 5.0)
    control_draws: int = 3
    seed: int = 0
    max_new_tokens: int = 16
    max_ppl_ratio: float = 2.0
    keep_special: bool = False

    @classmethod
    def from_config(cls, section: dict, keep_special: bool) -> "RepairConfig":
        """From the validated ``repair`` section and whether the SAE was trained without special tokens."""
        return cls(budget=section["budget"], ablate_values=tuple(section["ablate_values"]),
                   clamp_values=tuple(section["clamp_values"]), control_draws=section["control_draws"],
                   seed=section["seed"], max_new_tokens=section["max_new_tokens"],
                   max_ppl_ratio=section["max_ppl_ratio"], keep_special=keep_special)


def is_repaired(answer_before: int, answer_after: int, correct: int, ppl_before: float, ppl_after: float,
                max_ppl_ratio: float) -> bool:
    """The repair success rule: the first greedy token changed, to the correct answer's token, and
    ppl_after <= max_ppl_ratio x ppl_before (the steering verdict's :func:`~mmsae.interventions.verdict.is_success`
    with "toward" = the correct token).

    Args:
        answer_before, answer_after: token ids of the first greedy token without / with the intervention.
        correct: the correct answer's token id.
        ppl_before, ppl_after: perplexities of the two continuations under the unmodified model.
    """
    return is_success(answer_after != answer_before, ppl_before, ppl_after, answer_after == correct, max_ppl_ratio)


@torch.no_grad()
def feature_profile(model: nn.Module, module: nn.Module, sae: TopKSAE, inputs: dict, modality: np.ndarray,
                    skip: torch.Tensor | None = None) -> dict[str, dict[int, tuple[float, float]]]:
    """Each active feature's mean and max activation on the prompt, per modality.

    Args:
        inputs: processor outputs of the prompt (batch 1); modality: (seq,) ``"image"`` / ``"text"``.
        skip: (seq,) bool positions left undecomposed (no feature active there).

    Returns:
        ``{"image": {feature: (mean, max)}, "text": {...}}``: the mean over all of that modality's
        positions (0 where the feature is not in the top k; skipped positions left out), and the max;
        features never active there are absent.
    """
    splice = SAESplice(sae, track=False, skip=skip)
    handle = module.register_forward_hook(splice)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    vals, idx = splice.vals.float().cpu().numpy(), splice.idx.cpu().numpy()
    kept = np.ones(len(modality), bool) if skip is None else ~skip.cpu().numpy().reshape(-1)
    out = {}
    for mod in ("image", "text"):
        rows = np.nonzero((modality == mod) & kept)[0]
        v, f = vals[rows].reshape(-1), idx[rows].reshape(-1)
        active = v > 0
        feats = np.unique(f[active])
        out[mod] = {int(g): (float(v[f == g].sum() / len(rows)), float(v[f == g].max())) for g in feats}
    return out


def rank_features(result, modality: np.ndarray, n: int) -> dict[str, list[tuple[int, float]]]:
    """The features to intervene on, from the attribution of m = logit(wrong) - logit(correct).

    Args:
        result: :class:`~mmsae.interventions.attribution.AttributionResult` of that m.
        modality: (seq,) ``"image"`` / ``"text"`` (other values: left out).
        n: how many per modality.

    Returns:
        ``{"text": [(feature, total attribution)], "image": [...]}``: the n text features with the
        largest positive total (toward the wrong answer), descending; the n image features with the
        most negative total (toward the correct one), ascending.
    """
    pooled = pool(result, modality, "sum")
    text = sorted(((f, a) for f, a in pooled["text"].items() if a > 0), key=lambda x: (-x[1], x[0]))
    image = sorted(((f, a) for f, a in pooled["image"].items() if a < 0), key=lambda x: (x[1], x[0]))
    return {"text": text[:n], "image": image[:n]}


def matched_controls(targets: list[int], mean: dict[int, float], exclude: set[int], rng: np.random.Generator,
                     pool_size: int = MATCH_POOL) -> list[int]:
    """Random features of matched mean activation, one per target, in the targets' order.

    For each target f, the candidates are the features of ``mean`` outside ``exclude`` and not yet
    drawn; the ``pool_size`` nearest to f in |log mean_g - log mean_f| (ties by id) are kept and one
    is drawn uniformly with ``rng``. Stops early when no candidate is left.

    Args:
        targets: the top features; mean: feature -> mean activation (> 0) on the same positions.
        exclude: features never drawn (e.g. every ranked feature).

    Returns:
        The drawn features (as many as the targets, fewer when candidates run out).

    Raises:
        KeyError: a target without a mean activation.
    """
    drawn: list[int] = []
    for f in targets:
        ref = np.log(mean[f])
        cands = sorted((g for g in mean if g not in exclude and g not in drawn), key=lambda g: (abs(np.log(mean[g]) - ref), g))
        if not cands:
            break
        near = cands[:pool_size]
        drawn.append(int(near[int(rng.integers(len(near)))]))
    return drawn


def _position_ids(subject, modality: str, keep_special: bool) -> dict:
    """Where an intervention on ``modality`` acts, as :class:`~mmsae.sae.splice.SteeringHook` keywords:
    image: only the image token's positions; text: every position but the image token's (and the special
    tokens' when the SAE was trained without them)."""
    image = subject.image_token_id
    if modality == "image":
        return {"only_token_ids": [image]}
    return {"skip_token_ids": sorted({*(subject.special_token_ids if keep_special else ()),
                                      *(() if image is None else (image,))})}


def repair_case(subject, module: nn.Module, sae: TopKSAE, case: dict, cfg: RepairConfig, case_index: int = 0) -> list[dict]:
    """Rank, intervene, judge and control for one case (module docstring).

    Args:
        subject: the loaded model; module: its hooked layer; sae: that layer's SAE.
        case: ``{"name", "prompt", "image" (path or None), "answer_prefix", "wrong", "correct"}``;
            wrong and correct must each be one token.
        cfg: the sweep, budget, controls and success rule.
        case_index: the case's place in the config (seeds its control draws with ``cfg.seed``).

    Returns:
        A ``baseline`` row (kind ``none``: the unmodified answer), then one row per intervention and
        arm (``top``, draw 0; ``control``, draws 1..control_draws): case, prompt, image, wrong,
        correct, kind, arm, draw, order (the intervention's place in the trial order), n_features,
        value, features, attributions (their total attribution toward the wrong answer), mean_activations,
        clamp_values, answer_before, answer_after (first greedy tokens), text_before, text_after,
        metric (m without intervention), flipped (first token = the correct one), changed, ppl_before,
        ppl_after, fluent, success (:func:`is_repaired`).

    Raises:
        ValueError: wrong or correct is not one token, or they are the same; the image cannot be read.
    """
    ids, inputs, _coords, layout = case_inputs(subject, case, ("wrong", "correct"), what="repair case")
    if ids["wrong"] == ids["correct"]:
        raise ValueError(f"repair case {case['name']!r}: wrong and correct are the same token")
    model, tok = subject.model, subject.tokenizer
    input_ids = inputs["input_ids"][0].cpu()
    skip = torch.from_numpy(np.isin(input_ids.numpy(), subject.special_token_ids)) if cfg.keep_special else None
    modality = layout["modality"] if skip is None else np.where(skip.numpy(), "special", layout["modality"])
    result = attribute(model, module, sae, inputs, ids["wrong"], ids["correct"], skip)
    ranked = rank_features(result, modality, cfg.budget)
    profile = feature_profile(model, module, sae, inputs, modality, skip)
    pooled = pool(result, modality, "sum")
    rng = np.random.default_rng([cfg.seed, case_index])

    trials = []  # (kind, arm, draw, order, n, value, features)
    order = 0
    for kind, mod in KINDS.items():
        top = [f for f, _ in ranked[mod]]
        means = {f: m for f, (m, _) in profile[mod].items()}
        controls = [matched_controls(top, means, set(top), rng) for _ in range(cfg.control_draws)]
        for n in range(1, len(top) + 1):
            for v in (cfg.ablate_values if mod == "text" else cfg.clamp_values):
                trials.append((kind, "top", 0, order, n, v, top[:n]))
                trials += [(kind, "control", d + 1, order, n, v, c[:n]) for d, c in enumerate(controls) if c[:n]]
                order += 1

    state = prompt_state(model, inputs)
    outs = _generate_all(subject, module, sae, inputs, trials, profile, cfg)
    before = outs[0]
    ppl_before = continuation_perplexity(model, inputs, before, state)
    base = {"case": case["name"], "prompt": case["prompt"], "image": case.get("image"), "wrong": case["wrong"],
            "correct": case["correct"], "metric": result.metric, "answer_before": tok.decode(before[:1]),
            "text_before": tok.decode(before, skip_special_tokens=True), "ppl_before": ppl_before}
    rows = [{**base, "kind": "none", "arm": "baseline", "draw": 0, "order": -1, "n_features": 0, "value": None,
             "features": [], "attributions": [], "mean_activations": [], "clamp_values": [],
             "answer_after": base["answer_before"], "text_after": base["text_before"],
             "flipped": int(before[0]) == ids["correct"], "changed": False, "ppl_after": ppl_before, "fluent": True,
             "success": False}]
    for (kind, arm, draw, order, n, v, feats), after in zip(trials, outs[1:]):
        mod = KINDS[kind]
        ppl_after = continuation_perplexity(model, inputs, after, state)
        first_before, first_after = int(before[0]), int(after[0])
        rows.append({**base, "kind": kind, "arm": arm, "draw": draw, "order": order, "n_features": len(feats),
                     "value": float(v), "features": [int(f) for f in feats],
                     "attributions": [float(pooled[mod].get(f, 0.0)) for f in feats],
                     "mean_activations": [profile[mod][f][0] for f in feats],
                     "clamp_values": [float(v) * profile[mod][f][1] for f in feats],
                     "answer_after": tok.decode(after[:1]), "text_after": tok.decode(after, skip_special_tokens=True),
                     "flipped": first_after == ids["correct"], "changed": first_after != first_before,
                     "ppl_after": ppl_after, "fluent": ppl_after <= cfg.max_ppl_ratio * ppl_before,
                     "success": is_repaired(first_before, first_after, ids["correct"], ppl_before, ppl_after,
                                            cfg.max_ppl_ratio)})
    return rows


def _generate_all(subject, module: nn.Module, sae: TopKSAE, inputs: dict, trials: list, profile: dict,
                  cfg: RepairConfig) -> list[torch.Tensor]:
    """Greedy ids (each up to its first EOS) of the unmodified model, then of each trial in order:
    one batched :func:`~mmsae.interventions.steer.generate_rows` per intervention kind (each kind clamps its own positions), each batch's row 0 the unmodified model
    (the first batch's is returned), so that every row shares its baseline's numerics."""
    outs: list[torch.Tensor] = []
    for kind, mod in KINDS.items():
        rows = [[Clamp(f, float(v) * profile[mod][f][1]) for f in feats] for k, _a, _d, _o, _n, v, feats in trials if k == kind]
        if outs and not rows:
            continue
        hook = SteeringHook(sae, [None] + rows, mode="error_term", positions="all",
                            **_position_ids(subject, mod, cfg.keep_special))
        out = generate_rows(subject.model, inputs, module, hook, cfg.max_new_tokens)
        outs += out if not outs else out[1:]
    return outs


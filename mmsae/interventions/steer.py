"""Paper figures 5-16: steer the model by clamping SAE features at the hooked layer, and judge it.

The clamp itself (the layer's output steered with the SAE's error term kept, or replaced by the
reconstruction as in the released code; which positions; special tokens left alone) is the forward
hook :class:`mmsae.sae.splice.SteeringHook`. Here: greedy generation under that hook
(:func:`generate`), the clamp values (:func:`resolve_clamp_value`), the features an explanation
names (:func:`features_matching`) and the sweep over features x values x prompts
(:func:`steering_sweep`), each run beside the unsteered generation.

Evaluation of a steered generation (:mod:`mmsae.interventions.verdict`): its perplexity under the
unsteered model (teacher-forced), whether it moved *toward the feature*, and ``success`` = changed
AND ppl_after / ppl_before <= max ratio AND toward the feature. Beside each verdict, its control: the same
text judged by every other feature's words in turn (:func:`mmsae.interventions.verdict.control_features`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmsae.core.progress import track
from mmsae.sae.splice import Clamp, SteeringHook
from mmsae.data.corpus import Sample, load_image
from mmsae.models import prepare_inputs
from mmsae.sae.model import TopKSAE
from mmsae.interventions.verdict import continuation_perplexity, control_features, is_success, prompt_state, toward_feature


@torch.no_grad()
def generate(model: nn.Module, inputs: dict, module: nn.Module, hook: SteeringHook | None, max_new_tokens: int) -> torch.Tensor:
    """Greedy generation with ``hook`` on ``module`` (None: no hook). Returns the new token ids (batch, n).
    A hook with ``skip_token_ids`` is told each forward's ``input_ids`` (a pre-hook on ``model``)."""
    handles = []

    def ids_of(_model, args, kwargs):
        hook.token_ids = kwargs.get("input_ids", args[0] if args else None)

    if hook is not None:
        hook.calls = 0
        handles.append(module.register_forward_hook(hook))
        if hook.skip_token_ids is not None:
            handles.append(model.register_forward_pre_hook(ids_of, with_kwargs=True))
    try:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        for h in handles:
            h.remove()
        if hook is not None:
            hook.token_ids = None  # not to be read by a later direct steer()
    return out[:, inputs["input_ids"].shape[1]:]


def resolve_clamp_value(value: float, scale: str, max_activation: float | None) -> float:
    """``absolute`` -> value; ``max_multiple`` -> value x the feature's max activation (from stats).

    Raises:
        ValueError: ``max_multiple`` without a known max activation, or an unknown scale.
    """
    if scale == "absolute":
        return float(value)
    if scale == "max_multiple":
        if max_activation is None:
            raise ValueError("steer.scale: max_multiple needs the feature's max activation (feature never active?)")
        return float(value) * float(max_activation)
    raise ValueError(f"steer.scale: {scale!r} is not one of absolute, max_multiple")


def features_matching(explanations, words: list[str]) -> list[int]:
    """Features whose explanation contains any of ``words`` (case-insensitive), in feature order."""
    if explanations is None or not words:
        return []
    out = []
    for row in explanations.iter_rows(named=True):
        text = (row.get("explanation") or "").lower()
        if any(w.lower() in text for w in words):
            out.append(row["feature"])
    return sorted(set(out))


def _until_eos(ids: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """(n,) generated ids up to and including the first end-of-sequence token (batch rows are padded after it)."""
    for i, t in enumerate(ids.tolist()):
        if t in eos:
            return ids[: i + 1]
    return ids


def generate_rows(model: nn.Module, inputs: dict, module: nn.Module, hook: SteeringHook, max_new_tokens: int) -> list[torch.Tensor]:
    """One batched greedy :func:`generate` of a batch-1 prompt repeated once per row of ``hook``'s
    per-row clamps (row 0 is usually the baseline), so that every row shares its numerics.

    Returns:
        One (n,) tensor of new token ids per row, each up to and including its first end-of-sequence token.
    """
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    n = len(hook.clamps)
    batch = {k: t.repeat(n, *[1] * (t.dim() - 1)) if torch.is_tensor(t) else t for k, t in inputs.items()}
    return [_until_eos(ids, eos) for ids in generate(model, batch, module, hook, max_new_tokens)]


@dataclass(frozen=True)
class SweepConfig:
    """What a steering sweep does to each feature (the ``steer`` config section, config/schema.yaml).

    Attributes:
        values: clamp values, in ``scale`` units.
        scale: ``max_multiple`` (values x the feature's max activation) or ``absolute``.
        positions: where the clamp applies (``all``, ``prompt``, ``generated``); None = the mode's own
            (:class:`~mmsae.sae.splice.SteeringHook`).
        mode: ``error_term`` (x + (c - z_f) W_dec[f]) or ``reference`` (the released code's hook).
        max_new_tokens: greedy tokens generated per row.
        max_ppl_ratio: ``steer.success_max_ppl_ratio`` (:func:`mmsae.interventions.verdict.is_success`).
        keep_special: never steer at special-token positions (the SAE was trained without them;
            :func:`mmsae.sae.trained_without_special_tokens`).
    """

    values: tuple[float, ...]
    scale: str = "max_multiple"
    positions: str | None = None
    mode: str = "error_term"
    max_new_tokens: int = 24
    max_ppl_ratio: float = 2.0
    keep_special: bool = False

    @classmethod
    def from_config(cls, steer: dict, keep_special: bool) -> "SweepConfig":
        """From the validated ``steer`` config section and whether the SAE was trained without special tokens."""
        return cls(values=tuple(steer["values"]), scale=steer["scale"], positions=steer["positions"], mode=steer["mode"],
                   max_new_tokens=steer["max_new_tokens"], max_ppl_ratio=steer["success_max_ppl_ratio"],
                   keep_special=keep_special)


def steering_sweep(subject, module: nn.Module, sae: TopKSAE, features: list[int], prompts: list[dict],
                   cfg: SweepConfig, max_activation: dict[int, float], words: dict[int, list[str]]) -> list[dict]:
    """Greedy text before and after clamping each feature to each value, for each prompt, judged.

    Per prompt, one batched greedy ``generate``: row 0 the baseline (the "before" text), one row per
    (feature, value) with its clamp (:class:`SteeringHook` per-row clamps), so the prompt is batched
    rather than re-run per clamp and every row shares the baseline's numerics.

    The baseline is the model the clamp acts on, with no clamp, so that ``changed``, the perplexity
    ratio and ``toward_feature`` measure the clamp alone: in ``error_term`` mode the unsteered model
    (no clamp is the identity there); in ``reference`` mode the reconstruction-spliced model (the
    reference hook with no clamp), whose own effect on the text would otherwise count as the clamp's.
    Both perplexities are judged by the same model, the unmodified one: ``ppl_before`` is that of
    the baseline's greedy text, ``ppl_after`` of the steered text.

    Args:
        subject: the loaded model; module: its hooked layer.
        prompts: ``{"prompt": str, "image": path or None}`` each.
        cfg: the sweep's values, scale, positions, mode, length, success rule and special-token skip.
        max_activation: feature -> max activation (from the feature statistics).
        words: feature -> :func:`mmsae.interventions.verdict.feature_words` (missing = none known), for the
            steered features and the other features whose words serve as controls (e.g. every
            selected feature; :func:`mmsae.interventions.verdict.control_features`).

    Returns:
        One row per (feature, prompt, value): feature, prompt, image, scale, value, clamp_value,
        positions, mode, baseline (``unsteered`` or ``reconstruction``: what text_before came from),
        text_before, text_after, changed, ppl_before, ppl_after (perplexities of the baseline's /
        steered continuation under the unmodified model), feature_words,
        toward_words (those that newly appear), toward_feature (None: no words known), success,
        control_features (the others with words; empty when this feature or every other has
        none), control_toward and control_success (the fractions of those whose words, in place
        of the feature's, make the same text toward / a success; None without controls),
        special_tokens_steered (not ``keep_special``).
    """
    rows = []
    control = {f: control_features(f, words) for f in features}
    decode = subject.tokenizer.decode
    for p in track(prompts, "steer", unit="prompts"):  # per prompt: one batched generate over every clamp
        image = None
        if p.get("image"):
            image, status = load_image(p["image"])
            if image is None:
                raise ValueError(f"steer.prompts: image {p['image']}: {status}")
        inputs = dict(prepare_inputs(subject, [(Sample("steer", p["prompt"], p.get("image")), image)]).to(subject.device))
        # one batched generate: row 0 the baseline, then every (feature, value); the rows share their numerics.
        # The baseline is the model the clamps act on with no clamp: the unsteered model (error_term, where
        # no clamp is the identity) or the reconstruction-spliced one (reference: [] = the hook, no clamp)
        runs = [(f, v, resolve_clamp_value(v, cfg.scale, max_activation.get(f))) for f in features for v in cfg.values]
        baseline = [] if cfg.mode == "reference" else None
        hook = SteeringHook(sae, [baseline] + [[Clamp(f, c)] for f, _, c in runs], mode=cfg.mode, positions=cfg.positions,
                            skip_token_ids=subject.special_token_ids if cfg.keep_special else None)
        out = generate_rows(subject.model, inputs, module, hook, cfg.max_new_tokens)
        before = decode(out[0], skip_special_tokens=True)
        state = prompt_state(subject.model, inputs)
        ppl_before = continuation_perplexity(subject.model, inputs, out[0], state)
        for (f, v, c), ids_after in zip(runs, out[1:]):
            after = decode(ids_after, skip_special_tokens=True)
            ppl_after = continuation_perplexity(subject.model, inputs, ids_after, state)
            toward, hit = toward_feature(before, after, words.get(f, []))
            changed = after != before
            c_toward = [bool(toward_feature(before, after, words[g])[0]) for g in control[f]]
            c_success = [is_success(changed, ppl_before, ppl_after, t, cfg.max_ppl_ratio) for t in c_toward]
            rows.append({"feature": f, "prompt": p["prompt"], "image": p.get("image"), "scale": cfg.scale, "value": float(v),
                         "clamp_value": c, "positions": hook.positions, "mode": cfg.mode,
                         "baseline": "reconstruction" if cfg.mode == "reference" else "unsteered", "text_before": before,
                         "text_after": after, "changed": changed, "ppl_before": ppl_before, "ppl_after": ppl_after,
                         "feature_words": list(words.get(f, [])), "toward_words": hit, "toward_feature": toward,
                         "success": is_success(changed, ppl_before, ppl_after, toward, cfg.max_ppl_ratio),
                         "control_features": control[f], "control_toward": sum(c_toward) / len(c_toward) if c_toward else None,
                         "control_success": sum(c_success) / len(c_success) if c_success else None,
                         "special_tokens_steered": not cfg.keep_special})
    return rows

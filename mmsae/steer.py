"""Paper figures 5-16: steer the model by clamping SAE features at the hooked layer.

Default (Anthropic, "Scaling Monosemanticity"): the layer's output x is replaced by the SAE
reconstruction with the chosen features clamped plus the SAE's error term,

    x' = SAE_clamped(x) + (x - SAE(x)) = x + sum_f (c_f - z_f(x)) * W_dec[f]

so with no clamp the output is exactly x (the model is unchanged). ``reference`` mode reproduces the
paper's released code: the output becomes the SAE reconstruction alone (error term dropped) with the
feature's pre-TopK value set to an absolute c, on the prompt pass only.

Positions: ``all``, ``prompt`` (the first forward of ``generate``, which covers the prompt) or
``generated`` (the later single-token forwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmsae.data.corpus import Sample, load_image
from mmsae.models import prepare_inputs
from mmsae.sae.model import TopKSAE


@dataclass(frozen=True)
class Clamp:
    """Set feature ``feature`` to ``value`` (absolute units of the SAE latent)."""

    feature: int
    value: float


class SteeringHook:
    """A forward hook on the hooked layer that applies clamps (see module docstring).

    Args:
        sae: the SAE trained on that layer.
        clamps: features and values; empty = identity.
        positions: ``all``, ``prompt`` or ``generated``.
        mode: ``error_term`` (default, Anthropic) or ``reference`` (released code: no error term).

    Raises:
        ValueError: unknown positions or mode, or a feature outside the SAE.
    """

    def __init__(self, sae: TopKSAE, clamps: list[Clamp], positions: str = "all", mode: str = "error_term"):
        if positions not in ("all", "prompt", "generated"):
            raise ValueError(f"steer.positions: {positions!r} is not one of all, prompt, generated")
        if mode not in ("error_term", "reference"):
            raise ValueError(f"steer.mode: {mode!r} is not one of error_term, reference")
        for c in clamps:
            if not 0 <= c.feature < sae.d_sae:
                raise ValueError(f"steer: feature {c.feature} is outside the SAE (d_sae={sae.d_sae})")
        self.sae, self.clamps, self.positions, self.mode = sae, list(clamps), positions, mode
        self.calls = 0

    def _active(self) -> bool:
        first = self.calls == 0
        return self.positions == "all" or (self.positions == "prompt") == first

    @torch.no_grad()
    def _steer(self, x: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        flat = x.reshape(-1, x.shape[-1]).to(sae.W_enc.dtype)
        if self.mode == "reference":
            pre = sae.pre_acts(flat)
            for c in self.clamps:
                pre[:, c.feature] = c.value
            vals, idx = sae._topk(pre)
            return sae.decode(vals, idx).to(x.dtype).reshape(x.shape)
        if not self.clamps:
            return x
        vals, idx = sae.encode(flat)
        delta = torch.zeros_like(flat)
        for c in self.clamps:
            z_f = (vals * (idx == c.feature)).sum(-1)  # current value (0 when not in the top k)
            delta += (c.value - z_f)[:, None] * sae.W_dec[c.feature]
        return x + delta.to(x.dtype).reshape(x.shape)

    def __call__(self, _module, _inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        new = self._steer(x) if self._active() else x
        self.calls += 1
        if new is x:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new


@torch.no_grad()
def generate(model: nn.Module, inputs: dict, module: nn.Module, hook: SteeringHook | None, max_new_tokens: int = 32) -> torch.Tensor:
    """Greedy generation with ``hook`` on ``module`` (None: no hook). Returns the new token ids (batch, n)."""
    handle = None
    if hook is not None:
        hook.calls = 0
        handle = module.register_forward_hook(hook)
    try:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        if handle is not None:
            handle.remove()
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


def steering_sweep(subject, module: nn.Module, sae: TopKSAE, features: list[int], prompts: list[dict],
                   values: list[float], scale: str, max_activation: dict[int, float], positions: str = "all",
                   mode: str = "error_term", max_new_tokens: int = 32) -> list[dict]:
    """Greedy text before and after clamping each feature to each value, for each prompt.

    Args:
        subject: the loaded model; module: its hooked layer.
        prompts: ``{"prompt": str, "image": path or None}`` each.
        values: clamp values, in ``scale`` units (``absolute`` or ``max_multiple``).
        max_activation: feature -> max activation (from the feature statistics).

    Returns:
        One row per (feature, prompt, value): feature, prompt, image, scale, value, clamp_value,
        positions, mode, text_before, text_after, changed.
    """
    rows = []
    decode = subject.tokenizer.decode
    for p in prompts:
        image = None
        if p.get("image"):
            image, status = load_image(p["image"])
            if image is None:
                raise ValueError(f"steer.prompts: image {p['image']}: {status}")
        inputs = dict(prepare_inputs(subject, [(Sample("steer", p["prompt"], p.get("image")), image)]).to(subject.device))
        before = decode(generate(subject.model, inputs, module, None, max_new_tokens)[0], skip_special_tokens=True)
        for f in features:
            for v in values:
                c = resolve_clamp_value(v, scale, max_activation.get(f))
                hook = SteeringHook(sae, [Clamp(f, c)], positions=positions, mode=mode)
                after = decode(generate(subject.model, inputs, module, hook, max_new_tokens)[0], skip_special_tokens=True)
                rows.append({"feature": f, "prompt": p["prompt"], "image": p.get("image"), "scale": scale, "value": float(v),
                             "clamp_value": c, "positions": positions, "mode": mode, "text_before": before,
                             "text_after": after, "changed": after != before})
    return rows

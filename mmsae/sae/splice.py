"""Clamping SAE features at the hooked layer: the forward hook that steering (paper figures 5-16,
:mod:`mmsae.interventions.steer`), attribution's reference splice (:mod:`mmsae.interventions.attribution`) and loss recovered
(:mod:`mmsae.interventions.loss_recovered`) put on the model.

Default (Anthropic, "Scaling Monosemanticity"): the layer's output x is replaced by the SAE
reconstruction with the chosen features clamped plus the SAE's error term,

    x' = SAE_clamped(x) + (x - SAE(x)) = x + sum_f (c_f - z_f(x)) * W_dec[f]

so with no clamp the output is exactly x (the model is unchanged); it is applied at ``positions``
(default ``all``).

``reference`` mode is the paper's released code (EvolvingLMMs-Lab/multimodal-sae,
``sae_auto_interp/features/steering.py``, ``SteeringController.clamp_features_max``; the same hook
in ``tools/model_steering.py``, ``clamp_features_max``): on EVERY forward of ``generate`` the
layer's output becomes the SAE reconstruction alone (error term dropped),
``decode(select_topk(ReLU(pre_acts(x))))``, and the feature's post-ReLU, pre-TopK value is set to an
absolute c only on the prompt pass (the released hook clamps when the forward has more than one
position, i.e. the first forward of a cached ``generate``, :func:`mmsae.interventions.steer.generate`).
``positions`` then picks where the clamp applies (default ``prompt``, the released code); the
reconstruction is applied everywhere. For a BatchTopK or Matryoshka SAE (``sae.architecture``) the
inference threshold takes TopK's place after the clamp (``sae.select``), as it does in ``sae.encode``.

Positions: ``all``, ``prompt`` (the first forward of ``generate``, which covers the prompt) or
``generated`` (the later single-token forwards). Special tokens the SAE was trained without
(``sae.exclude_special_tokens``; :func:`mmsae.interventions.steer.steering_sweep`'s ``keep_special``) are never
steered, in either mode: the SAE's latents there are out of distribution (``<|im_start|>`` is an attention sink
with a norm far above a word's), and a clamp ``c - z_f(x)`` would subtract whatever the latent
happens to read there. The codes, loss recovered and attribution leave them out the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmsae.sae.model import TopKSAE


def select_topk(latents: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d_sae) ReLU'd latents -> (values, indices), each (n, k): the k largest, unsorted.

    The released code's ``Sae.select_topk`` (EleutherAI ``sae``, used by
    EvolvingLMMs-Lab/multimodal-sae ``sae_auto_interp/features/steering.py``), which takes the top k
    *after* ReLU and after the clamp, so a clamped feature can enter or leave the top k.
    """
    return latents.topk(k, dim=-1, sorted=False)


@dataclass(frozen=True)
class Clamp:
    """Set feature ``feature`` to ``value`` (absolute units of the SAE latent)."""

    feature: int
    value: float


class SteeringHook:
    """A forward hook on the hooked layer that applies clamps (see the module docstring).

    Args:
        sae: the SAE trained on that layer.
        clamps: features and values for every batch row (empty = no clamp), or one entry per batch
            row: a list of clamps, or None for a row left untouched (the unsteered model, also in
            reference mode), so that one batched ``generate`` runs the baseline and many clamps.
        mode: ``error_term`` (Anthropic) or ``reference`` (released code: every forward is replaced
            by the SAE reconstruction, no error term).
        positions: where the clamp applies: ``all``, ``prompt`` or ``generated``; None = the mode's
            own (``all`` for error_term, ``prompt`` for reference, as in the released code).
        skip_token_ids: token ids whose positions are left as they are (no clamp; in reference
            mode no reconstruction either). :func:`mmsae.interventions.steer.generate` tells the hook each forward's
            ``input_ids`` (:attr:`token_ids`); :meth:`steer` also takes a mask.
        only_token_ids: the converse: only positions holding one of these ids are steered (e.g. the
            image token, to clamp image positions alone); combined with ``skip_token_ids`` when both are set.

    Raises:
        ValueError: unknown positions or mode, or a feature outside the SAE.
    """

    def __init__(self, sae: TopKSAE, clamps: list[Clamp] | list[list[Clamp] | None], mode: str, positions: str | None,
                 skip_token_ids: list[int] | None = None, only_token_ids: list[int] | None = None):
        if mode not in ("error_term", "reference"):
            raise ValueError(f"steer.mode: {mode!r} is not one of error_term, reference")
        if positions is None:
            positions = "prompt" if mode == "reference" else "all"
        if positions not in ("all", "prompt", "generated"):
            raise ValueError(f"steer.positions: {positions!r} is not one of all, prompt, generated")
        self.per_row = any(c is None or isinstance(c, (list, tuple)) for c in clamps)
        for c in (x for row in clamps for x in (row or ())) if self.per_row else clamps:
            if not 0 <= c.feature < sae.d_sae:
                raise ValueError(f"steer: feature {c.feature} is outside the SAE (d_sae={sae.d_sae})")
        self.sae, self.clamps, self.positions, self.mode = sae, list(clamps), positions, mode
        self.skip_token_ids = None if skip_token_ids is None else torch.as_tensor(list(skip_token_ids), dtype=torch.long)
        self.only_token_ids = None if only_token_ids is None else torch.as_tensor(list(only_token_ids), dtype=torch.long)
        self.token_ids: torch.Tensor | None = None  # (batch, seq) of the forward under way (generate sets it)
        self.calls = 0

    def _active(self) -> bool:
        first = self.calls == 0
        return self.positions == "all" or (self.positions == "prompt") == first

    @torch.no_grad()
    def steer(self, x: torch.Tensor, clamp: bool = True, skip: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, seq, d_model) layer output -> steered output of the same shape and dtype.

        ``clamp=False``: no clamp (error_term: x itself; reference: the plain reconstruction).
        ``skip`` (batch, seq) bool: positions left as they are; None = those of
        :attr:`skip_token_ids` (and those not of :attr:`only_token_ids`) in :attr:`token_ids`.

        Raises:
            ValueError: per-row clamps for another batch size than x's; ``skip_token_ids`` without
                the forward's token ids, or ids of another shape than x's positions.
        """
        if skip is None and (self.skip_token_ids is not None or self.only_token_ids is not None):
            if self.token_ids is None or tuple(self.token_ids.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"steer: skip_token_ids needs the forward's input_ids of shape {tuple(x.shape[:-1])}, "
                                 f"got {None if self.token_ids is None else tuple(self.token_ids.shape)}")
            ids = self.token_ids
            skip = torch.zeros_like(ids, dtype=torch.bool)
            if self.skip_token_ids is not None:
                skip |= torch.isin(ids, self.skip_token_ids.to(ids.device))
            if self.only_token_ids is not None:
                skip |= ~torch.isin(ids, self.only_token_ids.to(ids.device))
        if not self.per_row:
            return self._apply(x, self.clamps, clamp, skip)
        if len(self.clamps) != x.shape[0]:
            raise ValueError(f"steer: {len(self.clamps)} per-row clamp lists for a batch of {x.shape[0]}")
        return torch.cat([x[b: b + 1] if row is None else self._apply(x[b: b + 1], row, clamp, None if skip is None else skip[b: b + 1])
                          for b, row in enumerate(self.clamps)])

    def _apply(self, x: torch.Tensor, clamps: list[Clamp], clamp: bool, skip: torch.Tensor | None) -> torch.Tensor:
        sae = self.sae
        flat = x.reshape(-1, x.shape[-1]).to(sae.W_enc.dtype)
        keep = None if skip is None else skip.reshape(-1, 1).to(flat.device)
        if self.mode == "reference":
            pre = sae.pre_acts(flat).relu()
            for c in clamps if clamp else ():
                pre[:, c.feature] = c.value
            # TopK: the released code's select_topk; BatchTopK architectures: their inference threshold
            vals, idx = select_topk(pre, sae.k) if sae.architecture == "topk" else sae.select(pre)
            new = sae.decode(vals, idx).to(x.dtype).reshape(x.shape)
            return new if keep is None else torch.where(keep.reshape(*x.shape[:-1], 1), x, new)
        if not clamps or not clamp:
            return x
        vals, idx = sae.encode(flat)
        delta = torch.zeros_like(flat)
        for c in clamps:
            z_f = (vals * (idx == c.feature)).sum(-1)  # current value (0 when not in the top k)
            delta += (c.value - z_f)[:, None] * sae.W_dec[c.feature]
        if keep is not None:
            delta = delta.masked_fill(keep, 0.0)
        return x + delta.to(x.dtype).reshape(x.shape)

    def __call__(self, _module, _inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        new = self.steer(x, clamp=self._active())
        self.calls += 1
        if new is x:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

"""Paper figures 5-16: steer the model by clamping SAE features at the hooked layer.

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
position, i.e. the first forward of a cached ``generate``). ``positions`` then picks where the clamp
applies (default ``prompt``, the released code); the reconstruction is applied everywhere.

Positions: ``all``, ``prompt`` (the first forward of ``generate``, which covers the prompt) or
``generated`` (the later single-token forwards).

Evaluation of a steered generation (:func:`evaluate_generation`): its perplexity under the
unsteered model (teacher-forced), whether it moved *toward the feature* (:func:`toward_feature`),
and ``success`` = changed AND ppl_after / ppl_before <= max ratio AND toward the feature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from mmsae.data.corpus import Sample, load_image
from mmsae.models import prepare_inputs
from mmsae.sae.model import TopKSAE


def select_topk(latents: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d_sae) ReLU'd latents -> (values, indices), each (n, k): the k largest, unsorted.

    The released code's ``Sae.select_topk`` (EleutherAI ``sae``, used by
    EvolvingLMMs-Lab/multimodal-sae ``sae_auto_interp/features/steering.py``), which takes the top k
    *after* ReLU and after the clamp, so a clamped feature can enter or leave the top k.
    """
    return latents.topk(k, dim=-1, sorted=False)


def sae_hook_point(sae_cfg: dict, configured: str, where: str) -> str:
    """The hook point an SAE was trained at, read from its ``cfg.json`` (SAELens's key ``hook_name``,
    top level or under ``metadata``); it must equal the configured ``model.hook_point``.

    Args:
        sae_cfg: the parsed cfg.json; configured: ``model.hook_point``; where: the cfg.json path (for errors).

    Returns:
        The hook point (``configured`` when cfg.json names none).

    Raises:
        ValueError: cfg.json names another hook point than the config.
    """
    name = sae_cfg.get("hook_name") or (sae_cfg.get("metadata") or {}).get("hook_name")
    if name is None:
        return configured
    if name != configured:
        raise ValueError(f"{where}: the SAE was trained at hook_name {name!r} but model.hook_point is {configured!r}; "
                         "set model.hook_point to the SAE's hook point or use an SAE trained there")
    return name


@dataclass(frozen=True)
class Clamp:
    """Set feature ``feature`` to ``value`` (absolute units of the SAE latent)."""

    feature: int
    value: float


class SteeringHook:
    """A forward hook on the hooked layer that applies clamps (see module docstring).

    Args:
        sae: the SAE trained on that layer.
        clamps: features and values for every batch row (empty = no clamp), or one entry per batch
            row: a list of clamps, or None for a row left untouched (the unsteered model, also in
            reference mode), so that one batched ``generate`` runs the baseline and many clamps.
        mode: ``error_term`` (Anthropic) or ``reference`` (released code: every forward is replaced
            by the SAE reconstruction, no error term).
        positions: where the clamp applies: ``all``, ``prompt`` or ``generated``; None = the mode's
            own (``all`` for error_term, ``prompt`` for reference, as in the released code).

    Raises:
        ValueError: unknown positions or mode, or a feature outside the SAE.
    """

    def __init__(self, sae: TopKSAE, clamps: list[Clamp] | list[list[Clamp] | None], mode: str, positions: str | None):
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
        self.calls = 0

    def _active(self) -> bool:
        first = self.calls == 0
        return self.positions == "all" or (self.positions == "prompt") == first

    @torch.no_grad()
    def steer(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """(..., d_model) layer output -> steered output of the same shape and dtype.

        ``clamp=False``: no clamp (error_term: x itself; reference: the plain reconstruction).

        Raises:
            ValueError: per-row clamps for another batch size than x's.
        """
        if not self.per_row:
            return self._apply(x, self.clamps, clamp)
        if len(self.clamps) != x.shape[0]:
            raise ValueError(f"steer: {len(self.clamps)} per-row clamp lists for a batch of {x.shape[0]}")
        return torch.cat([x[b: b + 1] if row is None else self._apply(x[b: b + 1], row, clamp)
                          for b, row in enumerate(self.clamps)])

    def _apply(self, x: torch.Tensor, clamps: list[Clamp], clamp: bool) -> torch.Tensor:
        sae = self.sae
        flat = x.reshape(-1, x.shape[-1]).to(sae.W_enc.dtype)
        if self.mode == "reference":
            pre = sae.pre_acts(flat).relu()
            for c in clamps if clamp else ():
                pre[:, c.feature] = c.value
            vals, idx = select_topk(pre, sae.k)
            return sae.decode(vals, idx).to(x.dtype).reshape(x.shape)
        if not clamps or not clamp:
            return x
        vals, idx = sae.encode(flat)
        delta = torch.zeros_like(flat)
        for c in clamps:
            z_f = (vals * (idx == c.feature)).sum(-1)  # current value (0 when not in the top k)
            delta += (c.value - z_f)[:, None] * sae.W_dec[c.feature]
        return x + delta.to(x.dtype).reshape(x.shape)

    def __call__(self, _module, _inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        new = self.steer(x, clamp=self._active())
        self.calls += 1
        if new is x:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new


@torch.no_grad()
def generate(model: nn.Module, inputs: dict, module: nn.Module, hook: SteeringHook | None, max_new_tokens: int) -> torch.Tensor:
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


# Function words, and words that describe a feature rather than what it is about; never "feature words".
STOPWORDS = frozenset("""
a about above after again all also an and any are as at be because been before being below between both but by can
could did do does doing down during each either etc even few for from further had has have having he her here hers him
his how however i if in into is it its itself just like may me might more most much must my no nor not now of off on
once only or other our ours out over own same she should so some such than that the their theirs them then there these
they this those through to too under until up upon very was we were what when where which while who whom why will with
within would you your yours
activate activates activated activation activations captures concept concepts context contexts denote denotes detect
detects especially example examples explanation feature features fires including indicate indicates mention mentions
often pattern patterns refer refers related relates represent represents sequence specific text texts token tokens
typically usually various word words
""".split())


def content_words(text: str) -> list[str]:
    """Lower-cased alphabetic words of ``text`` with at least 3 letters, minus :data:`STOPWORDS`, in order, unique."""
    out = []
    for w in re.findall(r"[a-z]+", (text or "").lower()):
        if len(w) >= 3 and w not in STOPWORDS and w not in out:
            out.append(w)
    return out


def feature_words(feature: int, contexts=None, explanations=None) -> list[str]:
    """The words that stand for a feature: its top activating tokens and its explanation's content words.

    Args:
        contexts: ``results/features/maps/contexts.parquet`` (feature, tokens, focus, ...): the token
            at ``focus`` of each of the feature's top text contexts; None = not available.
        explanations: ``explanations.parquet`` (feature, explanation); None = not available.

    Returns:
        :func:`content_words` of those tokens, then of the explanation, unique; empty when the
        feature has neither (then nothing can be said about its direction).
    """
    words: list[str] = []
    if contexts is not None:
        for row in contexts.filter(contexts["feature"] == feature).iter_rows(named=True):
            words += content_words(row["tokens"][row["focus"]])
    if explanations is not None:
        for row in explanations.filter(explanations["feature"] == feature).iter_rows(named=True):
            words += content_words(row.get("explanation") or "")
    return list(dict.fromkeys(words))


def toward_feature(text_before: str, text_after: str, words: list[str]) -> tuple[bool | None, list[str]]:
    """Did steering move the text toward the feature?

    Definition: True when some word of ``text_after`` begins with one of the feature's ``words``
    (:func:`feature_words`; so the word "ocean" matches "oceans", the sub-word token "phot" matches
    "photosynthesis") while no word of ``text_before`` begins with it. Words are compared
    lower-cased, as :func:`content_words` splits them.

    Returns:
        (toward, matched words); toward is None when ``words`` is empty (the feature has no top
        tokens or explanation to judge by).
    """
    if not words:
        return None, []
    before, after = set(re.findall(r"[a-z]+", text_before.lower())), set(re.findall(r"[a-z]+", text_after.lower()))
    hit = [w for w in words if any(a.startswith(w) for a in after) and not any(b.startswith(w) for b in before)]
    return bool(hit), hit


def is_success(changed: bool, ppl_before: float, ppl_after: float, toward: bool | None, max_ppl_ratio: float) -> bool:
    """The steering success rule: changed AND ppl_after / ppl_before <= max_ppl_ratio AND toward the feature.

    ``ppl_*`` are perplexities under the unsteered model (:func:`continuation_perplexity`); a
    ``toward`` of None (unknown) is not a success.
    """
    return bool(changed and toward is True and ppl_after <= max_ppl_ratio * ppl_before)


@torch.no_grad()
def prompt_state(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, object]:
    """Run the prompt once through ``model`` as it is (no hook) for :func:`continuation_perplexity`.

    Returns:
        (logits at the last prompt position (vocab,), the prompt's KV cache).
    """
    out = model(**inputs, use_cache=True)
    return out.logits[0, -1].float(), out.past_key_values


@torch.no_grad()
def continuation_perplexity(model: nn.Module, inputs: dict, continuation: torch.Tensor, state=None) -> float:
    """Perplexity of ``continuation`` given the prompt under ``model`` as it is (no hook), teacher-forced.

    Args:
        inputs: processor outputs of the prompt, batch 1 (input_ids (1, n), attention_mask,
            pixel_values, image_sizes as present).
        continuation: (m,) generated token ids, m >= 1.
        state: :func:`prompt_state` of the same model and inputs, to score many continuations of one
            prompt without re-running it (its cache is cropped back to the prompt afterwards).

    Returns:
        exp(mean over the m tokens of -log p(token | prompt, previous tokens)).

    Raises:
        ValueError: an empty continuation.
    """
    if continuation.numel() == 0:
        raise ValueError("continuation_perplexity: empty continuation")
    last, cache = state if state is not None else prompt_state(model, inputs)
    n = cache.get_seq_length()
    cont = continuation.reshape(1, -1).to(inputs["input_ids"].device, inputs["input_ids"].dtype)
    logits = [last[None]]
    if cont.shape[1] > 1:
        try:
            out = model(input_ids=cont[:, :-1], attention_mask=torch.ones(1, n + cont.shape[1] - 1, dtype=torch.long, device=cont.device),
                        past_key_values=cache, use_cache=True)
        finally:
            cache.crop(n - cache.get_seq_length())  # negative: drop what this call appended
        logits.append(out.logits[0].float())
    nll = torch.nn.functional.cross_entropy(torch.cat(logits), cont[0], reduction="mean")
    return float(nll.exp())


def _until_eos(ids: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """(n,) generated ids up to and including the first end-of-sequence token (batch rows are padded after it)."""
    for i, t in enumerate(ids.tolist()):
        if t in eos:
            return ids[: i + 1]
    return ids


def steering_sweep(subject, module: nn.Module, sae: TopKSAE, features: list[int], prompts: list[dict],
                   values: list[float], scale: str, max_activation: dict[int, float], positions: str | None,
                   mode: str, max_new_tokens: int, max_ppl_ratio: float, words: dict[int, list[str]]) -> list[dict]:
    """Greedy text before and after clamping each feature to each value, for each prompt, judged.

    Per prompt, one batched greedy ``generate``: row 0 unhooked (the "before" text), one row per
    (feature, value) with its clamp (:class:`SteeringHook` per-row clamps), so the prompt is batched
    rather than re-run per clamp and every row shares the baseline's numerics.

    Args:
        subject: the loaded model; module: its hooked layer.
        prompts: ``{"prompt": str, "image": path or None}`` each.
        values: clamp values, in ``scale`` units (``absolute`` or ``max_multiple``).
        max_activation: feature -> max activation (from the feature statistics).
        positions, mode, max_new_tokens: see :class:`SteeringHook` and ``steer`` in config/schema.yaml.
        max_ppl_ratio: ``steer.success_max_ppl_ratio`` (:func:`is_success`).
        words: feature -> :func:`feature_words` (missing = none known).

    Returns:
        One row per (feature, prompt, value): feature, prompt, image, scale, value, clamp_value,
        positions, mode, text_before, text_after, changed, ppl_before, ppl_after (perplexities of the
        unsteered / steered continuation under the unsteered model), feature_words,
        toward_words (those that newly appear), toward_feature (None: no words known), success.
    """
    rows = []
    decode = subject.tokenizer.decode
    eos = subject.model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    for p in prompts:
        image = None
        if p.get("image"):
            image, status = load_image(p["image"])
            if image is None:
                raise ValueError(f"steer.prompts: image {p['image']}: {status}")
        inputs = dict(prepare_inputs(subject, [(Sample("steer", p["prompt"], p.get("image")), image)]).to(subject.device))
        # one batched generate: row 0 unsteered, then every (feature, value); the rows share their numerics
        runs = [(f, v, resolve_clamp_value(v, scale, max_activation.get(f))) for f in features for v in values]
        hook = SteeringHook(sae, [None] + [[Clamp(f, c)] for f, _, c in runs], mode=mode, positions=positions)
        batch = {k: t.repeat(len(runs) + 1, *[1] * (t.dim() - 1)) if torch.is_tensor(t) else t for k, t in inputs.items()}
        out = [_until_eos(ids, eos) for ids in generate(subject.model, batch, module, hook, max_new_tokens)]
        before = decode(out[0], skip_special_tokens=True)
        state = prompt_state(subject.model, inputs)
        ppl_before = continuation_perplexity(subject.model, inputs, out[0], state)
        for (f, v, c), ids_after in zip(runs, out[1:]):
            after = decode(ids_after, skip_special_tokens=True)
            ppl_after = continuation_perplexity(subject.model, inputs, ids_after, state)
            toward, hit = toward_feature(before, after, words.get(f, []))
            changed = after != before
            rows.append({"feature": f, "prompt": p["prompt"], "image": p.get("image"), "scale": scale, "value": float(v),
                         "clamp_value": c, "positions": hook.positions, "mode": mode, "text_before": before,
                         "text_after": after, "changed": changed, "ppl_before": ppl_before, "ppl_after": ppl_after,
                         "feature_words": list(words.get(f, [])), "toward_words": hit, "toward_feature": toward,
                         "success": is_success(changed, ppl_before, ppl_after, toward, max_ppl_ratio)})
    return rows

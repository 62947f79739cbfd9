"""Loss recovered when the SAE is spliced into the model, on held-out samples of the training corpus.

The downstream metric of SAELens (``sae_lens/evals.py``: ``get_recons_loss`` and
``get_downstream_reconstruction_metrics``, reported as ``ce_loss_score`` and ``kl_div_score``) and
SAEBench's core eval. Each held-out sample is run through the FULL model four times (the forward is
not stopped at the hook): clean, with the hooked layer's output replaced by the SAE reconstruction
``x_hat = decode(TopK(ReLU(pre_acts(x))))`` (error term dropped; :class:`mmsae.sae.splice.SteeringHook`
in reference mode with no clamp), zero-ablated (replaced by 0) and mean-ablated (replaced by the mean
of the layer's output over the held-out tokens, see :func:`layer_mean`). Then, over a set of scored
tokens (token t+1 predicted from position t)::

    CE_m                   = mean_t  -log p_m(token_{t+1} | tokens_{<=t})        (nats per token)
    ce_loss_recovered      = (CE_zero - CE_sae) / (CE_zero - CE_clean)          (SAELens ce_loss_score)
    ce_loss_recovered_mean = (CE_mean - CE_sae) / (CE_mean - CE_clean)          (mean-ablation baseline)
    kl_div_m               = mean_t  sum_v p_clean(v) (log p_clean(v) - log p_m(v))   (KL(clean || m), nats)
    kl_div_score           = (kl_div_zero - kl_div_sae) / kl_div_zero            (SAELens kl_div_score)

Means are over tokens (all scored tokens of all samples pooled), as SAELens concatenates its
per-token values before averaging. A ratio whose denominator is 0 is None.

Scored tokens, two disjoint sets (:func:`scored_positions`):

* ``text``: position t and t+1 are text tokens of the user side (role ``user``, not an image
  placeholder), neither a special token: the user's text predicting its next text token. Chat-template
  words ("user", "assistant", the default system prompt) count; ``<|im_start|>``-like specials do not
  (SAELens's ``ignore_tokens`` likewise drop BOS/EOS/pad positions).
* ``answer``: token t+1 belongs to an assistant turn (:func:`mmsae.models.token_roles`): the
  answer's tokens given everything before them. None when no held-out sample has an answer.

Spliced positions: every token of the sequence, image tokens included (the SAE is trained on the
hooked layer's image and text tokens alike; SAELens replaces every position of the hook), except the
special tokens when the SAE was trained without them (``sae.exclude_special_tokens``; SAELens's
replacement hook keeps its ``ignore_tokens`` positions likewise). Zero and mean ablation replace the
same positions, so that a reconstruction of exactly 0 recovers exactly 0. Unlike SAELens, which
zero-ablates every position even where it keeps the activation for the SAE.

``all_positions``: SAELens's default beside ours. The same four forwards with EVERY position replaced
(special tokens included; zero ablation at every position; mean ablation by the same mean vector),
scored on every next-token prediction of the sequence (t in [0, n-2]; one sample per forward, so no
padding; SAELens likewise scores every token outside its ignore list). The two can differ by an order
of magnitude when a special token (an attention sink) carries a large activation the SAE was not
trained on: ours leaves it alone, SAELens's replaces it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from mmsae.data.corpus import Sample
from mmsae.extract.forward import forward_batches, image_batches
from mmsae.models import OutputReplacement, SubjectModel, prepare_inputs, resolve_hook_point
from mmsae.sae.model import TopKSAE
from mmsae.sae.splice import SteeringHook

log = logging.getLogger(__name__)

MODES = ("clean", "sae", "zero", "mean")
DEFINITION = ("ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean) (SAELens ce_loss_score); "
              "ce_loss_recovered_mean: the same with mean ablation; kl_div = mean over tokens of KL(clean || SAE spliced) "
              "of the next-token distributions (nats); CE in nats per token, token t+1 predicted from position t")
SPLICED = ("every token (image and text) of the hooked layer's output, special tokens excluded when the SAE was trained "
           "without them; zero and mean ablation replace the same positions")
ALL_POSITIONS = ("SAELens-style: every position of the hooked layer's output replaced (special tokens included), "
                 "every next-token prediction scored (t predicts t+1 for every t but the last; no padding)")


def scored_positions(token_ids: np.ndarray, roles: np.ndarray, image_token_id: int | None,
                     special_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The positions t whose next-token prediction is scored, as (text, answer) int64 arrays.

    Args:
        token_ids: (n,) one sample's input ids (no padding); roles: (n,) ``user``/``assistant``.
        image_token_id: the image placeholder's id (None for a text-only model).
        special_ids: special token ids (:attr:`mmsae.models.SubjectModel.special_token_ids`).

    Returns:
        text: t in [0, n-2] with tokens t and t+1 both user-side, not image placeholders and not
        special; answer: t with token t+1 in an assistant turn (see the module docstring).
    """
    ids = np.asarray(token_ids)
    n = len(ids)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    plain = ~np.isin(ids, special_ids)
    if image_token_id is not None:
        plain &= ids != image_token_id
    user = np.asarray(roles) == "user"
    text = plain[:-1] & plain[1:] & user[:-1] & user[1:]
    answer = np.asarray(roles)[1:] == "assistant"
    return np.flatnonzero(text).astype(np.int64), np.flatnonzero(answer).astype(np.int64)


def splice_mask(token_ids: np.ndarray, special_ids: list[int], keep_special: bool) -> np.ndarray:
    """(n,) bool: the positions whose layer output is replaced (all, or all but special tokens)."""
    ids = np.asarray(token_ids)
    return ~np.isin(ids, special_ids) if keep_special else np.ones(len(ids), bool)


def layer_mean(subject: SubjectModel, samples: list[Sample], hook_point: str, special_ids: list[int], keep_special: bool,
               max_image_pixels: int | None, skipped: list[dict]) -> tuple[torch.Tensor, int, dict]:
    """The mean of the hooked layer's output over the spliced positions of ``samples`` (the values that
    mean ablation puts in), from forwards stopped at the hook (:func:`mmsae.extract.forward.forward_batches`).

    Returns:
        (mean (d_model,) float32 on the model's device, number of tokens averaged, ``{sample_id:
        (token_ids, roles)}`` of the samples that ran).
    """
    total, count, layouts = None, 0, {}
    for batch in forward_batches(subject, samples, hook_point, 1, max_image_pixels, skipped, stop_at_hook=True):
        for b, st in enumerate(batch.samples):
            keep = torch.from_numpy(splice_mask(st.token_ids, special_ids, keep_special)).to(batch.acts.device)
            x = batch.acts[b, : st.n][keep].double()
            total = x.sum(0) if total is None else total + x.sum(0)
            count += len(x)
            layouts[st.sample.sample_id] = (st.token_ids, st.roles)
    if not count:
        return torch.zeros(0), 0, layouts
    return (total / count).float(), count, layouts


@dataclass
class Totals:
    """Running sums over the scored tokens of one set: CE and KL(clean || mode) per mode, and the count."""

    n: int = 0
    ce: dict = field(default_factory=lambda: {m: 0.0 for m in MODES})
    kl: dict = field(default_factory=lambda: {m: 0.0 for m in MODES})

    def add(self, ce: dict, kl: dict, idx: torch.Tensor) -> None:
        if len(idx):
            self.n += len(idx)
            for m in MODES:
                self.ce[m] += float(ce[m][idx].double().sum())
                self.kl[m] += float(kl[m][idx].double().sum())

    def summary(self) -> dict | None:
        """The metrics of the module docstring, or None when no token was scored."""
        if not self.n:
            return None
        ce = {m: self.ce[m] / self.n for m in MODES}
        kl = {m: self.kl[m] / self.n for m in MODES}
        return {
            "n_tokens": self.n,
            "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"], "ce_mean": ce["mean"],
            "ce_loss_recovered": _ratio(ce["zero"] - ce["sae"], ce["zero"] - ce["clean"]),
            "ce_loss_recovered_mean": _ratio(ce["mean"] - ce["sae"], ce["mean"] - ce["clean"]),
            "kl_div": kl["sae"], "kl_div_zero": kl["zero"], "kl_div_mean": kl["mean"],
            "kl_div_score": _ratio(kl["zero"] - kl["sae"], kl["zero"]),
        }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b != 0 else None


@torch.no_grad()
def next_token_losses(model, module, inputs: dict, positions: torch.Tensor, targets: torch.Tensor,
                      replacements: dict, where: torch.Tensor) -> tuple[dict, dict]:
    """CE and KL(clean || mode) at ``positions`` for the clean model and each replacement.

    Args:
        inputs: processor outputs of one sample (batch 1) on the model's device.
        positions: (m,) positions t; targets: (m,) the token ids at t+1.
        replacements: ``{mode: fn (batch, seq, d_model) -> same}`` applied at ``where`` (1, seq) of
            the hooked ``module``'s output.

    Returns:
        ``({"clean": ce (m,), mode: ce (m,), ...}, {same keys: kl (m,)})``, float32 on the device;
        logits are computed at ``positions`` only (``logits_to_keep``).
    """
    def logprobs():
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits[0]
        return F.log_softmax(logits.float(), dim=-1)

    clean = logprobs()
    p_clean = clean.exp()
    ce, kl = {"clean": -clean.gather(1, targets[:, None])[:, 0]}, {"clean": torch.zeros(len(positions), device=clean.device)}
    for mode, fn in replacements.items():
        with OutputReplacement(module, fn, where):
            lp = logprobs()
        ce[mode] = -lp.gather(1, targets[:, None])[:, 0]
        kl[mode] = (p_clean * (clean - lp)).sum(-1)
    return ce, kl


def select_samples(ids: list[str], max_samples: int | None) -> list[str]:
    """At most ``max_samples`` of ``ids`` (sorted), evenly spread over the sorted list (so a cap keeps
    image and text samples alike); None or a larger cap keeps all."""
    ids = sorted(ids)
    if max_samples is None or len(ids) <= max_samples:
        return ids
    return [ids[i] for i in sorted(set(np.linspace(0, len(ids) - 1, max_samples).round().astype(int).tolist()))]


def loss_recovered(subject: SubjectModel, sae: TopKSAE, corpus: list[Sample], heldout_ids: list[str], hook_point: str,
                   keep_special: bool, max_samples: int | None, max_image_pixels: int | None) -> dict:
    """Loss recovered with the SAE spliced in, over held-out samples (module docstring).

    Args:
        subject: the loaded model; sae: the SAE trained at ``hook_point`` (raw activations in).
        corpus: the training corpus (:func:`mmsae.data.build_corpus` of its config section).
        heldout_ids: the SAE's held-out sample ids (``heldout.json``).
        keep_special: leave special tokens unspliced (the SAE was trained without them).
        max_samples: evaluate at most this many held-out samples (:func:`select_samples`); None = all.
        max_image_pixels: larger images are skipped (``extract.max_image_pixels``).

    Returns:
        JSON-able dict: ``text`` and ``answer`` (ours: trained positions spliced; text/answer
        tokens scored) and ``all_positions`` (SAELens-style: every position spliced and scored),
        each :meth:`Totals.summary` or None with a ``*_null_reason``; the samples evaluated, skipped
        images, tokens in the mean, definitions.

    Raises:
        ValueError: a held-out id is not a sample of ``corpus`` (the SAE was trained on another
            corpus), or the SAE's width differs from the layer's.
    """
    by_id = {s.sample_id: s for s in corpus}
    unknown = sorted(set(heldout_ids) - set(by_id))
    if unknown:
        raise ValueError(f"heldout.json: {len(unknown)} held-out sample id(s) are not in the training corpus, e.g. "
                         f"{unknown[:5]}; was the SAE trained on another corpus configuration?")
    chosen = select_samples(heldout_ids, max_samples)
    samples = [by_id[i] for i in chosen]
    special = subject.special_token_ids
    model, module = subject.model, resolve_hook_point(subject.model, hook_point)
    skipped: list[dict] = []
    mean, n_mean, layouts = layer_mean(subject, samples, hook_point, special, keep_special, max_image_pixels, skipped)
    if n_mean and mean.shape[0] != sae.d_model:
        raise ValueError(f"the SAE has d_model={sae.d_model} but {hook_point} outputs {mean.shape[0]} dimensions")
    recon = SteeringHook(sae, [], mode="reference", positions="all")  # decode(TopK(ReLU(pre_acts(x)))), no clamp
    replacements = {"sae": recon.steer, "zero": torch.zeros_like, "mean": lambda x: mean.to(x.dtype).expand_as(x)}
    totals = {"text": Totals(), "answer": Totals(), "all_positions": Totals()}
    for batch in image_batches([s for s in samples if s.sample_id in layouts], 1, max_image_pixels, []):
        (s, img, _), = batch
        inputs = prepare_inputs(subject, [(s, img)]).to(subject.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        ids = inputs["input_ids"][0].cpu()
        seen, roles = layouts[s.sample_id]  # the same inputs as the forward to the hook built
        if not np.array_equal(seen, ids.numpy()):
            raise RuntimeError(f"{s.sample_id}: the model's inputs differ between the two passes")
        text, answer = scored_positions(ids.numpy(), roles, subject.image_token_id, special)
        pos = np.concatenate([text, answer])
        where = torch.from_numpy(splice_mask(ids.numpy(), special, keep_special))[None]
        dev = subject.device
        if len(pos):
            positions = torch.from_numpy(pos).to(dev)
            targets = inputs["input_ids"][0, positions + 1]  # token t+1, predicted at position t
            ce, kl = next_token_losses(model, module, dict(inputs), positions, targets, replacements, where)
            totals["text"].add(ce, kl, torch.arange(len(text), device=dev))
            totals["answer"].add(ce, kl, torch.arange(len(text), len(pos), device=dev))
        every = torch.arange(len(ids) - 1, device=dev)  # SAELens-style: every position spliced and scored
        if len(every):
            ce, kl = next_token_losses(model, module, dict(inputs), every, inputs["input_ids"][0, 1:], replacements,
                                       torch.ones_like(where))
            totals["all_positions"].add(ce, kl, torch.arange(len(every), device=dev))
        log.info("%s: %d text and %d answer tokens scored (%d all-positions)", s.sample_id, len(text), len(answer), len(every))
    out = {"definition": DEFINITION, "hook_point": hook_point, "spliced_positions": SPLICED,
           "all_positions_definition": ALL_POSITIONS,
           "special_tokens_spliced": not keep_special,
           "n_heldout_samples": len(heldout_ids), "max_samples": max_samples, "samples": chosen,
           "n_mean_ablation_tokens": n_mean, "skipped": skipped}
    has_answers = any(role == "assistant" for s in samples for role, _ in s.turns)
    for name, t in totals.items():
        out[name] = t.summary()
        out[f"{name}_null_reason"] = None if out[name] is not None else _null_reason(name, chosen, has_answers)
    return out


def _null_reason(name: str, chosen: list[str], has_answers: bool) -> str:
    if not chosen:
        return "no held-out samples (sae.heldout_fraction is 0 or no sample fell in the held-out split)"
    if name == "all_positions":
        return "no held-out sample ran (images skipped, or fewer than 2 tokens)"
    if name == "answer" and not has_answers:
        return "no held-out sample has an assistant answer (the corpus has no responses)"
    return f"no {name} tokens to score in the held-out samples"

"""Multimodal neurons, found without gradients (arXiv 2311.07470, from its released code).

1. Caption each image with the model (prompt and answer prefix from config, greedy).
2. Nouns of the caption from lemminflect's English lexicon (installed with the wheel, no download):
   a word is a noun when its NOUN lemma has noun inflections in the lexicon (lemminflect guesses
   NOUN for unknown words such as "their"; those have none), it is not also a function word
   (AUX/PRON/DET/...), and it is not a gerund of a verb ("sitting" is taken as a verb). Each noun's
   first sub-token t and the position p that predicts it.
3. Score every FFN neuron i of every layer l:

       s[l, i] = a[l, p, i] * (W_out[l] W_U)[i, t]

   with a the neuron's coefficient at p - by default the SwiGLU product that feeds ``down_proj``
   (``coefficient: "down_proj_input"``), by flag the ``act_fn`` output as the released code.
   W_out[l] = down_proj.weight (d_model, d_ff), W_U = lm_head.weight (vocab, d_model). Only the
   columns (W_out W_U)[:, t] of target tokens are needed for scores and only the rows of the top
   neurons for their top tokens; both are computed in chunks (memory bounded by ``chunk`` x d_ff
   floats, also for a 4096-wide model with a 128k vocabulary). All (layer, neuron) pairs are
   ranked together and the top K kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmsae.data.corpus import Sample
from mmsae.models import prepare_inputs

_NOT_NOUN = {"AUX", "PRON", "DET", "ADP", "CCONJ", "SCONJ", "NUM", "PART"}


def is_noun(word: str) -> bool:
    """True when lemminflect's lexicon lists ``word`` as an unambiguous noun (see module docstring)."""
    from lemminflect import getAllInflections, getAllLemmas

    lemmas = getAllLemmas(word.lower())
    if "NOUN" not in lemmas or _NOT_NOUN & set(lemmas) or not getAllInflections(lemmas["NOUN"][0], upos="NOUN"):
        return False
    verb = lemmas.get("VERB", ())
    return not (verb and lemmas["NOUN"][0] not in verb and word.lower().endswith("ing"))


def mlp_modules(model: nn.Module) -> list[nn.Module]:
    """The language model's MLP blocks, in layer order (Llama-style ``gate/up/down_proj``)."""
    lm = model.get_submodule("model.language_model") if hasattr(model, "model") and hasattr(model.model, "language_model") else model.model
    return [layer.mlp for layer in lm.layers]


def unembedding(model: nn.Module) -> torch.Tensor:
    """W_U, (vocab, d_model): the output embedding."""
    return model.get_output_embeddings().weight


@dataclass
class Target:
    """A noun of a caption: its word, first sub-token id, and the sequence position predicting it."""

    noun: str
    token_id: int
    position: int


def noun_targets(tokenizer, ids: list[int], start: int) -> list[Target]:
    """Nouns among the generated tokens ``ids[start:]``, with the position that predicts each.

    A word's first sub-token is the token where the word's first letter appears. Each noun counts
    once per caption, at its first occurrence (lower-cased), as in the released code
    (opanhw/MM_Neurons ``trainer.find_mm_neurons``: a set of the caption's nouns, each at
    ``output_tokens.index``): a caption that repeats a noun would otherwise weigh it twice in every
    statistic over cases and give the same (image, noun) two top-neuron sets.
    """
    targets, text, spans = [], "", []
    for pos in range(start, len(ids)):
        piece = tokenizer.decode([ids[pos]])
        spans.append((len(text), len(text) + len(piece), pos))
        text += piece
    for m in re.finditer(r"[A-Za-z]+", text):
        if not is_noun(m.group()) or m.group().lower() in {t.noun for t in targets}:
            continue
        pos = next(p for a, b, p in spans if a <= m.start() < b)
        targets.append(Target(m.group().lower(), ids[pos], pos - 1))
    return targets


class CoefficientCapture:
    """Capture every layer's neuron coefficients (seq, d_ff) for batch 1 during a forward pass."""

    def __init__(self, mlps: list[nn.Module], coefficient: str = "down_proj_input"):
        if coefficient not in ("down_proj_input", "act_fn"):
            raise ValueError(f"neurons.coefficient: {coefficient!r} is not one of down_proj_input, act_fn")
        self.mlps, self.coefficient = mlps, coefficient
        self.acts: list[torch.Tensor | None] = [None] * len(mlps)
        self.handles = []

    def __enter__(self):
        for i, mlp in enumerate(self.mlps):
            if self.coefficient == "down_proj_input":
                hook = (lambda i: lambda _m, inp: self.acts.__setitem__(i, inp[0][0].detach()))(i)
                self.handles.append(mlp.down_proj.register_forward_pre_hook(hook))
            else:
                hook = (lambda i: lambda _m, _inp, out: self.acts.__setitem__(i, out[0].detach()))(i)
                self.handles.append(mlp.act_fn.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    def stacked(self) -> torch.Tensor:
        """(n_layers, seq, d_ff)."""
        return torch.stack(self.acts)


@torch.no_grad()
def projection_columns(model: nn.Module, token_ids: list[int], chunk: int = 256) -> torch.Tensor:
    """(W_out[l] W_U)[:, t] for every layer l and token t: (n_layers, d_ff, n_tokens), in chunks."""
    w_u = unembedding(model)
    cols = []
    for mlp in mlp_modules(model):
        w_out = mlp.down_proj.weight  # (d_model, d_ff)
        parts = [w_out.T.float() @ w_u[token_ids[i : i + chunk]].float().T for i in range(0, len(token_ids), chunk)]
        cols.append(torch.cat(parts, 1))
    return torch.stack(cols)


@torch.no_grad()
def neuron_top_tokens(model: nn.Module, layer: int, neuron: int, k: int = 10, chunk: int = 16384) -> tuple[list[int], list[float]]:
    """The k tokens a neuron promotes most: top entries of its row W_out[:, i] . W_U^T, in vocab chunks."""
    w_u = unembedding(model)
    row = mlp_modules(model)[layer].down_proj.weight[:, neuron].float()
    best_v, best_i = torch.empty(0), torch.empty(0, dtype=torch.long)
    for s in range(0, w_u.shape[0], chunk):
        v = w_u[s : s + chunk].float() @ row
        top = v.topk(min(k, len(v)))
        best_v, best_i = torch.cat([best_v, top.values]), torch.cat([best_i, top.indices + s])
        keep = best_v.topk(min(k, len(best_v))).indices
        best_v, best_i = best_v[keep], best_i[keep]
    order = best_v.argsort(descending=True)
    return best_i[order].tolist(), best_v[order].tolist()


def score_neurons(coeffs: torch.Tensor, columns: torch.Tensor, position: int, col: int, top_k: int) -> list[tuple[int, int, float, float]]:
    """Rank all (layer, neuron) pairs together by s = a[l, p, i] * P[l, i, t].

    Args:
        coeffs: (n_layers, seq, d_ff); columns: (n_layers, d_ff, n_tokens) from :func:`projection_columns`.
        position: p; col: the target token's column in ``columns``.

    Returns:
        The top ``top_k`` as (layer, neuron, score, activation), best first.
    """
    a = coeffs[:, position, :].float()
    s = a * columns[:, :, col]
    flat = s.flatten()
    top = flat.topk(min(top_k, flat.numel()))
    d_ff = s.shape[1]
    return [(int(i) // d_ff, int(i) % d_ff, float(v), float(a.flatten()[i])) for v, i in zip(top.values, top.indices)]


@dataclass
class Caption:
    """A greedy caption and the inputs that reproduce it (batch 1).

    Attributes:
        inputs: processor inputs whose ``input_ids`` (1, seq) are the prompt followed by the caption's
            generated tokens (``attention_mask`` all ones), ready for a teacher-forced forward pass.
        ids: the same ids as a list of length seq.
        start: index in ``ids`` of the first generated token.
        text: prefix + generated text (special tokens skipped, generation cut at the first EOS).
    """

    inputs: dict
    ids: list[int]
    start: int
    text: str


@torch.no_grad()
def caption(subject, image, prompt: str, prefix: str, max_new_tokens: int, name: str = "image") -> Caption:
    """Greedy caption of ``image`` (None: text only) answering ``prompt``, the answer prefilled with ``prefix``."""
    inputs = dict(prepare_inputs(subject, [(Sample(name, prompt, "x" if image is not None else None), image)], suffix=prefix))
    out = subject.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    start = inputs["input_ids"].shape[1]
    gen = out[0, start:]
    eos = subject.tokenizer.eos_token_id
    if eos is not None and (gen == eos).any():
        gen = gen[: int((gen == eos).nonzero()[0])]
    ids = torch.cat([inputs["input_ids"][0], gen])
    full = {**inputs, "input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
    return Caption(full, ids.tolist(), start, prefix + subject.tokenizer.decode(gen, skip_special_tokens=True))

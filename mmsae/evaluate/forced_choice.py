"""Logprob-mode scoring on a local scorer model without a server: P("1") from the model's own
next-token logits (a forced choice between the two answer tokens).

delphi's log-prob scoring (arXiv 2410.13928 §3) asks the scorer for a one-token ``1``/``0`` answer
and takes the probability of ``1`` normalised over the two answers. Behind an endpoint that comes
from its ``top_logprobs`` (:func:`~mmsae.evaluate.scoring_prompts.probability_of_one`); ``transformers
serve``, our local server, ignores ``logprobs``, so with ``scoring.scorer.server: local`` in logprob
mode (:func:`uses_forced_choice`) the scoring job loads the model itself (:class:`ForcedChoiceScorer`)
and reads the same quantity off the logits:

    P("1") = exp(z_1) / (exp(z_1) + exp(z_0)),

with z_1, z_0 the logits of the tokens ``1`` and ``0`` at the first answer position, after the same
chat messages rendered by the model's chat template with the assistant turn opened (as ``transformers
serve`` renders them). Everything else - prompts, examples, rows, summary - is the endpoint path's.
The answers go to the same response cache, under a key of their own (:data:`FORCED_CHOICE`), so a
rerun computes nothing again and never mixes them with a server's answers.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmsae.core.progress import track
from mmsae.explain.cache import ResponseCache, request_key

log = logging.getLogger(__name__)

ANSWERS = ("1", "0")
FORCED_CHOICE = {"method": "forced_choice", "answers": list(ANSWERS)}  # the sampling part of the cache key


def uses_forced_choice(endpoint: dict, mode: str) -> bool:
    """Whether a scoring job reads P("1") off a local model's logits: logprob mode with a local scorer
    (``endpoint``: the resolved ``scoring.scorer``, :func:`mmsae.explain.endpoints.scorer`)."""
    return mode == "logprob" and endpoint.get("server") == "local"


def answer_token_ids(tokenizer, answers: tuple[str, ...] = ANSWERS) -> tuple[int, ...]:
    """The token id of each answer string (``1``, ``0``), encoded without special tokens.

    Raises:
        ValueError: an answer is not exactly one token for this tokenizer.
    """
    ids = []
    for a in answers:
        enc = tokenizer.encode(a, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"forced-choice scoring needs {a!r} to be one token; this tokenizer gives {enc}")
        ids.append(int(enc[0]))
    return tuple(ids)


def processor_messages(messages: list[dict], multimodal: bool) -> list[dict]:
    """OpenAI chat messages as a transformers chat template takes them: for a multimodal processor a
    list of parts per message (``{"type": "text", "text"}``, and ``{"type": "image", "url"}`` for an
    ``image_url`` part, data URLs included); for a text-only tokenizer the text parts joined by a
    space (images dropped), as ``transformers serve`` renders a language model's chat.

    Raises:
        ValueError: a content part of another type.
    """
    out = []
    for m in messages:
        content = m.get("content") or []
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
        for c in ([] if isinstance(content, str) else content):
            if c["type"] == "text":
                parts.append({"type": "text", "text": c["text"]})
            elif c["type"] == "image_url":
                url = c["image_url"]["url"] if isinstance(c["image_url"], dict) else c["image_url"]
                if multimodal:
                    parts.append({"type": "image", "url": url})
            else:
                raise ValueError(f"forced-choice scoring: content part of type {c['type']!r}")
        out.append({"role": m["role"], "content": parts if multimodal else " ".join(p["text"] for p in parts)})
    return out


def render(subject, messages: list[dict]) -> dict:
    """The model inputs of ``messages`` rendered by the processor's chat template with the assistant
    turn opened (``input_ids`` (1, n) and, with images, ``pixel_values`` and its companions), on the
    model's device."""
    proc = subject.processor
    multimodal = subject.image_token_id is not None and proc is not subject.tokenizer
    inputs = proc.apply_chat_template(processor_messages(messages, multimodal), add_generation_prompt=True,
                                      tokenize=True, return_dict=True, return_tensors="pt")
    inputs = {k: v.to(subject.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(subject.model.parameters()).dtype)
    return inputs


class PrefixCache:
    """The key/value cache of the last text-only prompt, reused up to its longest common prefix with
    the next one (the system prompt and few-shot turns every request of a method shares), so a
    request costs a forward over its own tokens only. Used only when every cache layer is a plain
    full-attention layer (cropping a sliding-window or linear-attention layer loses state)."""

    def __init__(self):
        self.ids: list[int] = []
        self.kv = None

    @staticmethod
    def _croppable(kv) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in getattr(kv, "layers", [None]))

    def logits(self, model, ids: list[int], device) -> torch.Tensor:
        """The (vocab,) logits after ``ids``, the prompt's first shared tokens taken from the cache."""
        n = 0
        for a, b in zip(self.ids, ids[:-1]):  # at least one token is run
            if a != b:
                break
            n += 1
        if self.kv is None or n == 0 or not self._croppable(self.kv):
            self.kv, n = None, 0
        else:
            self.kv.crop(n - len(self.ids))  # a negative count: tokens removed from the end
        out = model(input_ids=torch.tensor([ids[n:]], device=device), past_key_values=self.kv, use_cache=True,
                    logits_to_keep=1)
        self.kv, self.ids = out.past_key_values, list(ids)
        return out.logits[0, -1]


@torch.no_grad()
def next_token_logits(subject, messages: list[dict], prefix: PrefixCache | None = None) -> tuple[torch.Tensor, int]:
    """The logits of the first answer token after ``messages`` and the prompt's length.

    Args:
        subject: a :class:`~mmsae.models.load.SubjectModel` (model and processor or tokenizer).
        messages: OpenAI chat messages (system, few-shot turns, the request).
        prefix: a :class:`PrefixCache` to reuse for a text-only prompt (None: one full forward).

    Returns:
        ``(logits, n_prompt_tokens)``: float32 (vocab,) logits at the last prompt position, the
        chat rendered by :func:`render`.
    """
    inputs = render(subject, messages)
    n = int(inputs["input_ids"].shape[1])
    if prefix is not None and set(inputs) <= {"input_ids", "attention_mask"}:
        return prefix.logits(subject.model, inputs["input_ids"][0].tolist(), subject.device).float().cpu(), n
    return subject.model(**inputs, logits_to_keep=1).logits[0, -1].float().cpu(), n


def forced_choice_answer(subject, messages: list[dict], answer_ids: tuple[int, int],
                         prefix: PrefixCache | None = None) -> dict:
    """One logprob-mode answer computed on the local model, shaped as an endpoint's answer.

    Returns:
        ``{"content", "logprobs", "answer_mass", "latency_s", "prompt_tokens", "completion_tokens"}``:
        ``content`` is the model's most likely first token (what greedy decoding would start with);
        ``logprobs`` is OpenAI's ``choices[0].logprobs.content`` layout - that token with its
        log-probability over the vocabulary, and as ``top_logprobs`` the two answers ``1`` and ``0``
        with their log-probabilities renormalised over the two (log-softmax of (z_1, z_0)), so
        :func:`~mmsae.evaluate.scoring_prompts.probability_of_one` returns exp(z_1) / (exp(z_1) +
        exp(z_0)); ``answer_mass`` is P("1") + P("0") over the whole vocabulary (how much of the
        model's belief the forced choice keeps). ``prefix``: see :func:`next_token_logits`.
    """
    t0 = time.perf_counter()
    logits, n = next_token_logits(subject, messages, prefix)
    full = torch.log_softmax(logits, dim=-1)
    two = torch.log_softmax(logits[list(answer_ids)], dim=-1)
    top = int(logits.argmax())
    token = subject.tokenizer.decode([top])
    return {
        "content": token,
        "logprobs": [{"token": token, "logprob": float(full[top]),
                      "top_logprobs": [{"token": a, "logprob": float(lp)} for a, lp in zip(ANSWERS, two.tolist())]}],
        "answer_mass": float(sum(math.exp(float(full[i])) for i in answer_ids)),
        "latency_s": time.perf_counter() - t0, "prompt_tokens": n, "completion_tokens": 1,
    }


@dataclass
class ForcedChoiceConfig:
    """What :class:`ForcedChoiceScorer` scores with; ``model`` and :meth:`sampling` make the cache key
    (as :class:`~mmsae.explain.EndpointConfig`'s do, so :func:`~mmsae.evaluate.scoring.all_cached` takes it).

    Attributes:
        model: the local model directory (resolved to an absolute path, as a local server names it).
        device: ``auto``, ``cpu``, ``cuda``...; dtype: ``float32``, ``bfloat16`` or ``float16``
            (None: float32 on the CPU, bfloat16 on a GPU).
    """

    model: str
    device: str = "auto"
    dtype: str | None = None
    loader: object = field(default=None, repr=False, compare=False)  # tests: a callable returning a SubjectModel

    def sampling(self) -> dict:
        return dict(FORCED_CHOICE)


class ForcedChoiceScorer:
    """Answers logprob-mode scoring requests on a local model, cache in front; the model is loaded
    when the first uncached request comes (a job whose answers are all cached never loads it).

    It offers what :func:`~mmsae.evaluate.scoring.score_tasks` uses of an
    :class:`~mmsae.explain.Explainer`: ``cfg.model``, ``complete_all`` and ``sent`` (requests
    computed). A request whose forward raises is answered with its ``error`` (status ``failed``,
    not cached), as an endpoint's failure is.

    Args:
        cfg: a :class:`ForcedChoiceConfig`.
        cache: a :class:`~mmsae.explain.cache.ResponseCache`.
    """

    def __init__(self, cfg: ForcedChoiceConfig, cache: ResponseCache):
        self.cfg, self.cache = cfg, cache
        self.sent = 0
        self.masses: list[float] = []  # answer_mass of every answer given (cached ones too)
        self._subject = self._ids = None
        self._prefix = PrefixCache()

    @classmethod
    def for_directory(cls, model_dir: str, cache: ResponseCache, **kw) -> "ForcedChoiceScorer":
        """A scorer of the local model directory ``model_dir`` (resolved as a local server resolves it)."""
        return cls(ForcedChoiceConfig(model=str(Path(model_dir).resolve()), **kw), cache)

    def _load(self):
        if self._subject is None:
            from mmsae.core.gpu import resolve_device
            from mmsae.models import load_subject_model

            if self.cfg.loader is not None:
                self._subject = self.cfg.loader()
            else:
                device = resolve_device(self.cfg.device)
                dtype = self.cfg.dtype or ("float32" if str(device) == "cpu" else "bfloat16")
                self._subject = load_subject_model(self.cfg.model, dtype=dtype, device=str(device))
            self._ids = answer_token_ids(self._subject.tokenizer)
        return self._subject

    def complete(self, messages: list[dict]) -> dict:
        """One answer (:func:`forced_choice_answer`) with ``cached``, ``error`` and ``attempts``."""
        key = request_key(self.cfg.model, messages, self.cfg.sampling())
        hit = self.cache.get(key)
        if hit is not None:
            self.masses.append(hit["answer_mass"])
            return {**hit, "cached": True, "error": None, "attempts": 0}
        subject = self._load()
        self.sent += 1
        try:
            answer = forced_choice_answer(subject, messages, self._ids, self._prefix)
        except Exception as exc:  # noqa: BLE001 - one request's failure is its row's status, as an endpoint's
            log.warning("forced-choice request failed: %s: %s", type(exc).__name__, exc)
            return {"content": None, "latency_s": None, "prompt_tokens": None, "completion_tokens": None,
                    "cached": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}", "attempts": 1}
        self.cache.put(key, self.cfg.model, answer)
        self.masses.append(answer["answer_mass"])
        return {**answer, "cached": False, "error": None, "attempts": 1}

    def summary(self) -> dict:
        """For ``scoring_summary.json``: how the probabilities were read, the answers given and computed,
        and the median and minimum over answers of P("1") + P("0") over the whole vocabulary (near 1:
        the model would answer 1 or 0 anyway; near 0: the forced choice is far from what it would say)."""
        m = sorted(self.masses)
        return {"method": "softmax over the logits of the answer tokens 1 and 0 at the first answer position",
                "n_answers": len(m), "n_computed": self.sent,
                "answer_mass_median": statistics.median(m) if m else None, "answer_mass_min": float(m[0]) if m else None}

    async def complete_all(self, requests: list[list[dict]], label: str = "requests") -> list[dict]:
        """Answers for many message lists, in order (identical requests computed once). They are
        computed sorted by their messages, so that requests sharing a system prompt and few-shot turns
        follow each other and reuse its cache (:class:`PrefixCache`). Progress (a bar, and count, rate
        and ETA in the log, :func:`mmsae.core.progress.track`) is reported under ``label``, as
        :meth:`~mmsae.explain.Explainer.complete_all` reports it."""
        keys = [request_key(self.cfg.model, m, self.cfg.sampling()) for m in requests]
        unique = {k: m for k, m in zip(keys, requests)}
        order = sorted(unique, key=lambda k: json.dumps(unique[k], ensure_ascii=False))
        sent = self.sent
        answers = {k: self.complete(unique[k]) for k in track(order, label, unit="requests")}
        log.info("%s: %d of %d requests computed on the local model (forced choice), the rest cached",
                 label, self.sent - sent, len(unique))
        return [answers[k] for k in keys]

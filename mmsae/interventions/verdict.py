"""The verdict on a steered generation (:func:`mmsae.interventions.steer.steering_sweep`): did it move toward the
feature (:func:`toward_feature`, by the feature's words: :func:`feature_words`), and did it stay
fluent (:func:`continuation_perplexity` under the unsteered model); :func:`is_success` combines them.

The control beside it (:func:`control_features`): the same steered text judged by every other
feature's words in turn. Any change in the text can bring in new words, so some verdicts are
"toward" by chance; the control's mean rate is what chance and a changed text give, and the
feature's own rate means something only above it.
"""

from __future__ import annotations

import re

import torch
from torch import nn


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
        contexts: ``results/runs/<run>/features/maps/contexts.parquet`` (feature, tokens, focus, ...): the token
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


def control_features(feature: int, words: dict[int, list[str]]) -> list[int]:
    """The controls for ``feature``: every other feature that has words (:func:`feature_words`),
    ascending; none when ``feature`` has no words itself (its own verdict is then unknown, so
    there is nothing to compare).

    A steered text judged by each control's words instead of the feature's gives the rate at which
    a changed text meets some feature's words by chance; averaging over all the controls, rather
    than drawing one, keeps that rate from hanging on which feature was drawn.
    """
    if not words.get(feature):
        return []
    return sorted(g for g, w in words.items() if w and g != feature)


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


SPECIAL_TOKEN = re.compile(r"^\s*<[^<>]*>\s*$")
"""A token spelled as a markup tag (``<|im_start|>``, ``<image>``, ``</s>``): a template token, never a word."""


def token_level_features(contexts, candidates: list[int], n: int, min_share: float = 0.6) -> list[tuple[int, str, float]]:
    """The first ``n`` of ``candidates`` whose top text contexts peak on one content word: the
    features steering can visibly move text toward (a feature that peaks on chat-template tokens or
    punctuation changes text in ways no word can judge).

    Args:
        contexts: ``contexts.parquet`` (feature, tokens, focus): each top context's peak token.
        candidates: feature ids in order of preference (e.g. the selected text-dominant features).
        min_share: the share of a feature's top contexts whose peak token is the same content word
            (:func:`content_words`; at least 2 contexts).

    Returns:
        ``(feature, word, share)`` for each chosen feature, in ``candidates`` order.
    """
    out = []
    for f in candidates:
        rows = contexts.filter(contexts["feature"] == f)
        peaks = [None if SPECIAL_TOKEN.match(t) else (content_words(t) or [None])[0]
                 for t in (r["tokens"][r["focus"]] for r in rows.iter_rows(named=True))]
        words = [w for w in peaks if w is not None]
        if len(peaks) < 2 or not words:
            continue
        word = max(sorted(set(words)), key=words.count)
        share = words.count(word) / len(peaks)
        if share >= min_share:
            out.append((f, word, share))
        if len(out) == n:
            break
    return out

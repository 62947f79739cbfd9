"""Refine explanations to a short phrase and label their concept category, through the same
OpenAI-compatible client and cache as the explanations.

The phrase comes from the refiner (paper: Llama-3.1-8B-Instruct, few-shot; EvolvingLMMs-Lab/multimodal-sae
``sae_auto_interp/launch/score/segment.py`` line 138), the category from the categorizer, which the
released code runs on a larger model (``tools/label_explanation.py`` lines 25-31:
Llama-3.1-70B-Instruct, ``max_tokens`` 16); ``evaluate.categorizer`` names its endpoint and is, by
default, the refiner's.

Prompts are versioned (:data:`REFINE_VERSION`); answers are validated, and an unusable one is kept
with its status (``invalid``), never dropped.
"""

from __future__ import annotations

import asyncio
import re

REFINE_VERSION = "v1"
CATEGORIES = ("scene", "object", "part", "material", "texture", "colour")

REFINE_PROMPT = (
    "Reduce the description of a visual concept to its key entity or phrase, in at most five words. "
    "Answer with the phrase only.\n\n"
    "Description: The highlighted regions all show the fluffy fur of cats and dogs.\nPhrase: animal fur\n\n"
    "Description: Each image has a red double-decker bus in the middle of the street.\nPhrase: red bus\n\n"
    "Description: {explanation}\nPhrase:"
)
CATEGORY_PROMPT = (
    "Which kind of visual concept is '{phrase}'? Answer with exactly one word from: "
    "scene, object, part, material, texture, colour.\n\n"
    "'kitchen' -> scene\n'dog' -> object\n'wheel' -> part\n'wood' -> material\n'stripes' -> texture\n'red' -> colour\n"
    "'{phrase}' ->"
)


def parse_phrase(text: str | None) -> tuple[str | None, str]:
    """The phrase from a refiner's answer: its first non-empty line without a 'Phrase:' label or
    quotes, at most 8 words. ``(phrase, "ok")`` or ``(None, "invalid")``."""
    for line in (text or "").splitlines():
        line = re.sub(r"^\s*(phrase|answer)\s*:\s*", "", line.strip(), flags=re.I).strip(" \"'*.`")
        if line:
            return (line, "ok") if len(line.split()) <= 8 else (None, "invalid")
    return None, "invalid"


def parse_category(text: str | None) -> tuple[str | None, str]:
    """The first category word in an answer (``color`` counts as ``colour``)."""
    words = re.findall(r"[a-z]+", (text or "").lower().replace("color", "colour"))
    for w in words:
        if w in CATEGORIES:
            return w, "ok"
    return None, "invalid"


def refine_phrases(refiner, explanations: list[tuple[int, str]]) -> list[dict]:
    """For (feature, explanation) pairs: ``{feature, phrase, refine_status, raw_phrase, error,
    category: None, category_status: None, raw_category: None}`` from the refiner (an
    :class:`~mmsae.explain.Explainer`)."""
    answers = asyncio.run(refiner.complete_all(
        [[{"role": "user", "content": REFINE_PROMPT.format(explanation=e)}] for _, e in explanations], label="refine"))
    rows = []
    for (f, _), ans in zip(explanations, answers):
        phrase, status = parse_phrase(ans["content"]) if ans["error"] is None else (None, "failed")
        rows.append({"feature": f, "phrase": phrase, "refine_status": status, "raw_phrase": ans["content"],
                     "error": ans["error"], "category": None, "category_status": None, "raw_category": None})
    return rows


def label_categories(categorizer, rows: list[dict]) -> list[dict]:
    """Fill ``category``, ``category_status``, ``raw_category`` (and ``error``) in place for the rows
    with a phrase, asking the categorizer (an :class:`~mmsae.explain.Explainer`); returns ``rows``."""
    todo = [r for r in rows if r["phrase"]]
    if todo:
        answers = asyncio.run(categorizer.complete_all(
            [[{"role": "user", "content": CATEGORY_PROMPT.format(phrase=r["phrase"])}] for r in todo], label="categorize"))
        for r, ans in zip(todo, answers):
            r["category"], r["category_status"] = parse_category(ans["content"]) if ans["error"] is None else (None, "failed")
            r["raw_category"] = ans["content"]
            r["error"] = r["error"] or ans["error"]
    return rows


def refine_all(refiner, categorizer, explanations: list[tuple[int, str]]) -> list[dict]:
    """:func:`refine_phrases` by the refiner, then :func:`label_categories` by the categorizer (the
    same object when they share an endpoint); the category is asked only for features with a phrase."""
    return label_categories(categorizer, refine_phrases(refiner, explanations))


def prompt_params() -> dict:
    """The prompt's version and a hash of its text: a rule's ``prompt`` param, so that changing either
    redoes the answers."""
    import hashlib

    return {"version": REFINE_VERSION, "text_sha256": hashlib.sha256((REFINE_PROMPT + CATEGORY_PROMPT).encode()).hexdigest()[:16]}

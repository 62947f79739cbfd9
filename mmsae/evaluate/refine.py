"""Refine explanations to a short phrase and label their concept category, through the same
OpenAI-compatible client and cache as the explanations (paper: Llama-3.1-8B-Instruct, few-shot).

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


def refine_all(explainer, explanations: list[tuple[int, str]]) -> list[dict]:
    """For (feature, explanation) pairs: ``{feature, phrase, category, refine_status, category_status,
    raw_phrase, raw_category, error}``; category is asked only for features with a phrase."""
    phrase_answers = asyncio.run(explainer.complete_all(
        [[{"role": "user", "content": REFINE_PROMPT.format(explanation=e)}] for _, e in explanations]))
    rows = []
    for (f, _), ans in zip(explanations, phrase_answers):
        phrase, status = parse_phrase(ans["content"]) if ans["error"] is None else (None, "failed")
        rows.append({"feature": f, "phrase": phrase, "refine_status": status, "raw_phrase": ans["content"],
                     "error": ans["error"], "category": None, "category_status": None, "raw_category": None})
    todo = [r for r in rows if r["phrase"]]
    if todo:
        cat_answers = asyncio.run(explainer.complete_all(
            [[{"role": "user", "content": CATEGORY_PROMPT.format(phrase=r["phrase"])}] for r in todo]))
        for r, ans in zip(todo, cat_answers):
            r["category"], r["category_status"] = parse_category(ans["content"]) if ans["error"] is None else (None, "failed")
            r["raw_category"] = ans["content"]
            r["error"] = r["error"] or ans["error"]
    return rows

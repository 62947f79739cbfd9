"""The explainer prompt (paper step b, arXiv 2411.14982 §3.2; docs/methods.md, 'Explanations') and parsing.

An image feature is shown as its top-N images with the activated regions kept bright and the rest
darkened; the explainer is asked for what the highlighted regions have in common and to end with
``[EXPLANATION]: <description>`` (or ``[EXPLANATION]: Unable to produce descriptions``). A text
feature is shown as its top contexts with the activating tokens marked ``«like this»``.

Changing :data:`PROMPT_VERSION` or the text below changes every request's cache key, and the
workflow passes both as params, so the explanations are redone.
"""

from __future__ import annotations

import base64
import re

PROMPT_VERSION = "v2"  # v2: our own opening sentence (v1 reused the released code's)

IMAGE_INSTRUCTION = (
    "We are studying one unit inside a vision-language model and want to know what makes it fire.\n"
    "You are shown {n} images. In each, the regions where the unit activates are kept bright and "
    "everything else is darkened. Look only at the highlighted regions; ignore images with very few "
    "highlighted regions. Find what the highlighted regions have in common - an object, a part, a "
    "texture, a colour, a material or a scene - and describe it literally in a few words.\n"
    "End your answer with one line of the form\n"
    "[EXPLANATION]: <short description>\n"
    "or, if the highlighted regions have nothing in common,\n"
    "[EXPLANATION]: Unable to produce descriptions"
)

TEXT_INSTRUCTION = (
    "We are studying one unit inside a language model and want to know what makes it fire. "
    "Below are text excerpts where the unit activates; the tokens where it "
    "activates most are marked like «this». Find what the marked tokens have in common and describe "
    "it literally in a few words.\n"
    "End your answer with one line of the form\n"
    "[EXPLANATION]: <short description>\n"
    "or, if the marked tokens have nothing in common,\n"
    "[EXPLANATION]: Unable to produce descriptions\n\n{contexts}"
)

UNABLE = "unable to produce descriptions"
_TAG = re.compile(r"\[?\s*explanation\s*\]?\s*[:：]\s*(.+)", re.IGNORECASE)


def png_data_url(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URL for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_messages(pngs: list[bytes], instruction: str = IMAGE_INSTRUCTION) -> list[dict]:
    """OpenAI chat messages for an image feature: the instruction, then each image as a data URL."""
    content = [{"type": "text", "text": instruction.format(n=len(pngs))}]
    content += [{"type": "image_url", "image_url": {"url": png_data_url(p)}} for p in pngs]
    return [{"role": "user", "content": content}]


def mark_context(tokens: list[str], activations: list[float], rel_threshold: float = 0.5) -> str:
    """Join tokens, wrapping those at or above ``rel_threshold`` x the maximum in «»."""
    top = max(activations) if activations else 0.0
    out = []
    for t, a in zip(tokens, activations):
        out.append(f"«{t}»" if top > 0 and a >= rel_threshold * top else t)
    return "".join(out).replace("<image>", "")


def text_messages(contexts: list[tuple[list[str], list[float]]], instruction: str = TEXT_INSTRUCTION) -> list[dict]:
    """OpenAI chat messages for a text feature from its top contexts (tokens, activations)."""
    body = "\n".join(f"{i + 1}. {mark_context(t, a).strip()}" for i, (t, a) in enumerate(contexts))
    return [{"role": "user", "content": instruction.format(contexts=body)}]


def parse_response(text: str | None) -> tuple[str | None, str]:
    """Extract the explanation from an explainer's answer.

    Returns:
        ``(explanation, status)`` with status ``ok`` for a tagged answer; ``(None,
        "no_explanation")`` when the explainer said it is unable; ``(last line, "untagged")`` when
        there is no ``[EXPLANATION]:`` line but some text (small explainers often ignore the
        format); ``(None, "unparsed")`` for an empty answer. The raw answer is always kept.
    """
    if not text or not text.strip():
        return None, "unparsed"
    matches = _TAG.findall(text)
    if not matches:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1][:300], "untagged"
    explanation = matches[-1].strip().strip("*").strip().strip('"').strip()
    explanation = explanation.splitlines()[0].strip() if explanation else ""
    if not explanation:
        return None, "unparsed"
    if UNABLE in explanation.lower():
        return None, "no_explanation"
    return explanation.rstrip("."), "ok"


def prompt_params() -> dict:
    """The prompt's version and a hash of its text: a rule's ``prompt`` param, so that changing either
    redoes the answers."""
    import hashlib

    return {"version": PROMPT_VERSION, "text_sha256": hashlib.sha256((IMAGE_INSTRUCTION + TEXT_INSTRUCTION).encode()).hexdigest()[:16]}

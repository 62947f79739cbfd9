"""Model inputs for a sample: chat messages, processor outputs, and each token's place in the image.

Shared by extraction, steering, attribution and the multimodal-neuron stage, so that every stage
feeds the model exactly the same prompt for the same sample.
"""

from __future__ import annotations

import numpy as np
import torch

from mmsae.data.corpus import Sample
from mmsae.models.load import SubjectModel

VIEW_TEXT = -1  # ``view`` of a text token (image-newline tokens are -2, image views 0, 1, ...)


def build_messages(sample: Sample) -> list[dict]:
    """The chat messages for one sample: the image (if any) then the prompt as the first user turn,
    then the sample's further turns (e.g. the assistant's answer of a training conversation)."""
    content = ([{"type": "image"}] if sample.image_path else []) + [{"type": "text", "text": sample.prompt}]
    return [{"role": "user", "content": content}] + [
        {"role": role, "content": [{"type": "text", "text": text}]} for role, text in sample.turns]


def _ends_with_answer(sample: Sample) -> bool:
    return bool(sample.turns) and sample.turns[-1][0] == "assistant"


def _template(subject: SubjectModel, messages: list[dict], generation_prompt: bool) -> str:
    return subject.processor.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def prepare_inputs(subject: SubjectModel, batch: list[tuple[Sample, object]], suffix: str = ""):
    """Processor outputs (right-padded) for ``(sample, PIL image or None)`` pairs of one kind.

    A sample whose last turn is the assistant's (a training conversation) is rendered as it stands;
    any other gets the chat template's generation prompt, then ``suffix`` (e.g. an answer prefix).
    """
    proc = subject.processor
    texts = [_template(subject, build_messages(s), not _ends_with_answer(s)) + suffix for s, _ in batch]
    images = [img for _, img in batch if img is not None]
    tok = subject.tokenizer
    tok.padding_side = "right"
    if images:
        return proc(images=images, text=texts, return_tensors="pt", padding=True)
    if hasattr(proc, "image_processor"):
        return proc(text=texts, return_tensors="pt", padding=True)
    return tok(texts, return_tensors="pt", padding=True)


def token_roles(subject: SubjectModel, sample: Sample, input_ids: torch.Tensor) -> np.ndarray:
    """Each token's role: ``assistant`` for the tokens of an assistant turn's text, ``user`` for the rest.

    ``user`` covers the prompt, the image and every token the chat template adds (headers, end-of-turn
    markers, a default system prompt). An assistant turn's span is found by rendering the conversation
    up to and including that turn, finding the answer's text after the generation prompt (a template
    may put text of its own in between, e.g. the Llama-3 LLaVA-NeXT template's newline) and taking the
    tokens whose characters lie inside it (a fast tokenizer's offsets). A token that straddles the
    answer's first or last character stays ``user``.

    Args:
        input_ids: (n,) the sample's token ids as :func:`prepare_inputs` made them (padding removed).

    Returns:
        (n,) array of ``"user"`` / ``"assistant"``.

    Raises:
        ValueError: the chat template does not keep an answer's text verbatim after the generation
            prompt (the message names the sample and turn).
    """
    n = len(input_ids)
    roles = np.full(n, "user", dtype=object)
    if not any(role == "assistant" for role, _ in sample.turns):
        return roles.astype(str)
    messages = build_messages(sample)
    ids = input_ids.tolist()
    n_image = int((input_ids == subject.image_token_id).sum()) if subject.image_token_id is not None else 0
    shift = n_image - 1 if n_image else 0  # the processor expands the one image placeholder to n_image tokens
    encode = subject.tokenizer
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        text = msg["content"][0]["text"]
        if not text:  # an empty answer (a blank gpt value) has no tokens to mark
            continue
        prefix = _template(subject, messages[:i], True)
        turn = _template(subject, messages[: i + 1], False)
        # a template may put its own text between the generation prompt and the answer (the Llama-3
        # LLaVA-NeXT one opens every text part with a newline); the answer's tokens are those whose
        # characters lie inside the answer in the rendered turn
        at = turn.find(text, len(prefix)) if turn.startswith(prefix) else -1
        enc = encode(turn, return_offsets_mapping=True) if at >= 0 else {"input_ids": [], "offset_mapping": []}
        inside = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= at and b <= at + len(text)]
        first, last = (inside[0], inside[-1] + 1) if inside else (0, 0)
        start, end = first + shift, last + shift
        if not inside or len(inside) != last - first or ids[start:end] != enc["input_ids"][first:last]:
            raise ValueError(f"{sample.sample_id}: turn {i} ({text[:40]!r}): the chat template does not keep the "
                             "answer verbatim after its generation prompt; its tokens cannot be marked")
        roles[start:end] = "assistant"
    return roles.astype(str)


def token_layout(subject: SubjectModel, input_ids: torch.Tensor, coords: torch.Tensor | None, name: str = "sample") -> dict:
    """Per-token modality and image coordinates for one sequence.

    Args:
        input_ids: (n,) the sample's token ids (padding removed).
        coords: (n_image_tokens, 3) from :func:`mmsae.models.image_token_coordinates`, or None.

    Returns:
        ``{"modality": str array, "view", "patch_row", "patch_col": int16 arrays}`` with view -1
        and coordinates -1 for text tokens.

    Raises:
        ValueError: the number of image tokens differs from the model's layout.
    """
    n = len(input_ids)
    view = np.full(n, VIEW_TEXT, np.int16)
    prow = np.full(n, -1, np.int16)
    pcol = np.full(n, -1, np.int16)
    if coords is not None:
        pos = (input_ids == subject.image_token_id).nonzero().flatten().numpy()
        c = coords.numpy()
        if len(pos) != len(c):
            raise ValueError(f"{name}: {len(pos)} image tokens in the prompt but {len(c)} in the model's layout")
        view[pos], prow[pos], pcol[pos] = c[:, 0], c[:, 1], c[:, 2]
    return {"modality": np.where(view == VIEW_TEXT, "text", "image"), "view": view, "patch_row": prow, "patch_col": pcol}

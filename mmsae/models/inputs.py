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
    """The chat messages for one sample: the image (if any) then the prompt, as one user turn."""
    content = ([{"type": "image"}] if sample.image_path else []) + [{"type": "text", "text": sample.prompt}]
    return [{"role": "user", "content": content}]


def prepare_inputs(subject: SubjectModel, batch: list[tuple[Sample, object]], suffix: str = ""):
    """Processor outputs (right-padded) for ``(sample, PIL image or None)`` pairs of one kind.

    ``suffix`` is appended after the chat template's generation prompt (e.g. an answer prefix).
    """
    proc = subject.processor
    texts = [proc.apply_chat_template(build_messages(s), add_generation_prompt=True, tokenize=False) + suffix
             for s, _ in batch]
    images = [img for _, img in batch if img is not None]
    tok = subject.tokenizer
    tok.padding_side = "right"
    if images:
        return proc(images=images, text=texts, return_tensors="pt", padding=True)
    if hasattr(proc, "image_processor"):
        return proc(text=texts, return_tensors="pt", padding=True)
    return tok(texts, return_tensors="pt", padding=True)


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

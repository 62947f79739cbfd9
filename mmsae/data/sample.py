"""The corpus sample: one model input (an optional image, a user prompt, later turns)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One model input: an optional image and a user prompt.

    Attributes:
        sample_id: unique, stable id (used as the key in every table).
        prompt: the user's text.
        image_path: path of the image file, or None for a text-only sample.
        image_key: the image's stable name within the corpus (skimage name, path relative to the
            folder with its extension, or the table row id); None for a text-only sample.
        turns: ``(role, text)`` turns after the first user prompt (role ``assistant`` or ``user``),
            e.g. the training answer of a LLaVA conversation; empty for a bare prompt.
    """

    sample_id: str
    prompt: str
    image_path: str | None = None
    image_key: str | None = None
    turns: tuple[tuple[str, str], ...] = ()

"""Small helpers shared by the neuron stages: a sample's image and whole-word matching in captions."""

from __future__ import annotations

import re

from mmsae.data.corpus import load_image


def has_word(text: str, word: str) -> bool:
    """True when ``word`` (or its plural with -s) occurs in ``text`` as a whole word, ignoring case."""
    return re.search(rf"\b{re.escape(word)}s?\b", text.lower()) is not None


def load_sample_image(sample: dict):
    """The PIL image of a neuron sample ``{"image": path or None}``; None for a text-only sample.

    Raises:
        ValueError: the image cannot be read (names the path and the reason).
    """
    if not sample["image"]:
        return None
    image, status = load_image(sample["image"])
    if image is None:
        raise ValueError(f"neurons: image {sample['image']}: {status}")
    return image

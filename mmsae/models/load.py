"""Load a subject model (any Hugging Face LMM, or a text-only causal LM) and its processor."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from mmsae.core.gpu import resolve_device

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SubjectModel:
    """A loaded subject model with what the pipeline needs to know about it.

    Attributes:
        model: the ``PreTrainedModel`` in eval mode.
        processor: its ``AutoProcessor`` (or tokenizer for a text-only model).
        name: the hub id or directory it came from.
        image_token_id: id of the image placeholder token, or None for a text-only model.
    """

    model: nn.Module
    processor: object
    name: str
    image_token_id: int | None

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def special_token_ids(self) -> list[int]:
        """The tokenizer's special tokens other than the image placeholder (e.g. ``<|im_start|>``, an
        attention sink whose norm can be 100x the median), sorted: what ``sae.exclude_special_tokens``
        leaves out of training and what the activation manifest lists."""
        return sorted({i for i in self.tokenizer.all_special_ids if i != self.image_token_id})


def load_subject_model(source: str | os.PathLike, dtype: str = "float32", device: str = "auto") -> SubjectModel:
    """Load a multimodal (or text-only) model and its processor from a hub id or a local directory.

    The same path serves the embedded demo model (a local directory) and real LMMs such as
    ``llava-hf/llama3-llava-next-8b-hf``: ``AutoModelForImageTextToText`` first, then
    ``AutoModelForCausalLM`` for text-only models.

    Args:
        source: hub id or directory.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ValueError: unknown dtype.
        OSError: the source cannot be found (offline machines cannot reach a hub).
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    device = resolve_device(device)
    source = str(source)
    cfg = AutoConfig.from_pretrained(source)
    is_multimodal = hasattr(cfg, "vision_config")
    cls = AutoModelForImageTextToText if is_multimodal else AutoModelForCausalLM
    model = cls.from_pretrained(source, dtype=DTYPES[dtype]).to(device).eval()
    processor = AutoProcessor.from_pretrained(source)
    image_token_id = getattr(model.config, "image_token_index", None)
    if image_token_id is None:
        image_token_id = getattr(model.config, "image_token_id", None)
    log.info("loaded %s (%s, %s) on %s", source, type(model).__name__, dtype, device)
    return SubjectModel(model=model, processor=processor, name=source, image_token_id=image_token_id)

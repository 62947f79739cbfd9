"""Subject models: one loader for every Hugging Face LMM, hook points, image-token coordinates.

A *hook point* is a module path as ``model.named_modules()`` prints it, e.g.
``model.language_model.layers.15`` for LLaVA-NeXT in transformers 5. The residual stream is the
output of that decoder layer, shape ``(batch, seq, d_model)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmsae.gpu import resolve_device  # noqa: F401 (re-exported)

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
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoConfig

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


def resolve_hook_point(model: nn.Module, hook_point: str) -> nn.Module:
    """Return the module at ``hook_point`` (a path from ``model.named_modules()``).

    Raises:
        ValueError: no such module; the message lists nearby decoder-layer paths.
    """
    try:
        return model.get_submodule(hook_point)
    except AttributeError:
        layers = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1].isdigit() and "layers" in n]
        hint = f" (e.g. {layers[0]} ... {layers[-1]})" if layers else ""
        raise ValueError(f"model.hook_point: no module {hook_point!r} in {type(model).__name__}{hint}") from None


def layer_index(hook_point: str) -> int | None:
    """The trailing integer of a hook point (``...layers.15`` -> 15), or None."""
    tail = hook_point.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else None


class StopForward(Exception):
    """Raised by a capture hook to end the forward pass once the hooked layer has run."""


class ActivationCapture:
    """Forward hook that stores a module's output and optionally stops the forward there.

    Usage::

        with ActivationCapture(module, stop=True) as cap:
            cap.run(model, **inputs)
        acts = cap.output  # (batch, seq, d_model)
    """

    def __init__(self, module: nn.Module, stop: bool = True):
        self.module, self.stop = module, stop
        self.output: torch.Tensor | None = None
        self._handle = None

    def _hook(self, _module, _inputs, output):
        self.output = (output[0] if isinstance(output, tuple) else output).detach()
        if self.stop:
            raise StopForward

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False

    def run(self, model: nn.Module, **inputs) -> torch.Tensor:
        """Run ``model(**inputs)`` and return the captured output."""
        self.output = None
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            pass
        if self.output is None:
            raise RuntimeError("the hooked module did not run during the forward pass")
        return self.output


def image_token_coordinates(model: nn.Module, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Map every image token of each image to (view, patch_row, patch_col).

    For LLaVA-NeXT-style models the model's own ``pack_image_features`` is run on a coordinate
    tensor instead of image features, so the layout (base view first, then the unpadded anyres grid
    with an image-newline token closing each row) is exactly the model's. Image-newline tokens get
    view -2 and null (-1) coordinates.

    Args:
        model: a loaded image-text model.
        image_sizes: (n_images, 2) original (height, width) per image, as the processor returns.

    Returns:
        A list of int tensors, one per image, of shape (n_image_tokens, 3): view (0 = base view,
        1.. = anyres tiles in the processor's order, -2 = newline), patch_row, patch_col
        (-1 where undefined).
    """
    inner = getattr(model, "model", model)
    cfg = model.config
    vcfg = cfg.vision_config
    side = vcfg.image_size // vcfg.patch_size
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    if hasattr(inner, "pack_image_features") and getattr(cfg, "image_grid_pinpoints", None):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        feats = []
        for size in image_sizes:
            n = image_size_to_num_patches(size, cfg.image_grid_pinpoints, vcfg.image_size)
            view = torch.arange(n)[:, None].expand(n, side * side)
            feats.append(torch.stack([view, rows.flatten().expand(n, -1), cols.flatten().expand(n, -1)], -1).float())
        newline = torch.tensor([-2.0, -1.0, -1.0])
        packed, _ = inner.pack_image_features(
            feats, image_sizes, cfg.vision_feature_select_strategy, image_newline=newline
        )
        return [p.round().long() for p in packed]
    # Fallback: a single square view (e.g. LLaVA-1.5).
    base = torch.stack([torch.zeros(side * side, dtype=torch.long), rows.flatten(), cols.flatten()], -1)
    return [base.clone() for _ in range(len(image_sizes))]


def is_demo_model(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory built by :func:`mmsae.models.demo.build_demo_model`."""
    return (Path(path) / "mmsae_provenance.json").is_file()

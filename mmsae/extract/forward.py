"""The subject model's forward passes over a corpus, with the hooked layer's output per token.

One loop shared by everything that needs the hooked layer's residual stream over a corpus: extraction
to shards (:mod:`mmsae.extract.run`), encoding straight from the model, and online SAE training. It
decodes images one batch ahead in a thread, runs the model up to the hook point, and yields per
batch the activations (still on the model's device) with each sample's token layout.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from mmsae.data.corpus import Sample, load_image
from mmsae.models import (
    ActivationCapture, SubjectModel, image_token_coordinates, prepare_inputs, resolve_hook_point, token_layout, token_roles,
)

log = logging.getLogger(__name__)


@dataclass
class SampleTokens:
    """One sample of a forward batch and the layout of its ``n`` (unpadded) tokens.

    Attributes:
        sample: the corpus sample.
        image: the decoded PIL image, or None for a text sample.
        status: how the image was read ('' or 'converted: …').
        n: number of tokens (padding excluded).
        token_ids: (n,) int32 input ids.
        layout: per-token arrays of :func:`mmsae.models.token_layout` (modality, view, patch_row, patch_col).
        roles: (n,) 'user'/'assistant' per token (:func:`mmsae.models.token_roles`).
    """

    sample: Sample
    image: object
    status: str
    n: int
    token_ids: np.ndarray
    layout: dict
    roles: np.ndarray

    def columns(self) -> dict:
        """The per-token metadata columns of a shard row group (everything but the activation)."""
        return {"sample_id": self.sample.sample_id, "token_index": np.arange(self.n, dtype=np.int32),
                "token_id": self.token_ids, **self.layout, "role": self.roles}

    def sample_row(self) -> dict:
        """The sample's row of a samples table (:data:`mmsae.extract.run.SAMPLES_SCHEMA`)."""
        s, img = self.sample, self.image
        return {"sample_id": s.sample_id, "prompt": s.prompt, "image_path": s.image_path, "image_key": s.image_key,
                "image_status": self.status or None,
                "image_height": img.size[1] if img is not None else None,
                "image_width": img.size[0] if img is not None else None,
                "n_tokens": self.n, "input_ids": self.token_ids}


@dataclass
class ForwardBatch:
    """A forward pass's output: ``acts`` (batch, seq, d_model) on the model's device, right-padded;
    ``samples[b]`` describes row b (its first ``n`` positions are real tokens)."""

    samples: list[SampleTokens]
    acts: torch.Tensor


def image_batches(todo: list[Sample], batch_size: int, max_image_pixels: int | None,
                  skipped: list[dict]) -> Iterator[list[tuple[Sample, object, str]]]:
    """Batches of ``(sample, PIL image or None, status)``, image samples first; images are decoded here,
    one batch at a time, and unusable ones are appended to ``skipped`` with their reason."""
    for with_image in (True, False):
        batch = []
        for s in todo:
            if (s.image_path is not None) != with_image:
                continue
            img, status = (None, "")
            if with_image:
                img, status = load_image(s.image_path, max_image_pixels)
                if img is None:
                    skipped.append({"sample_id": s.sample_id, "image": s.image_path, "reason": status})
                    log.warning("skipping %s (%s): %s", s.sample_id, s.image_path, status)
                    continue
            batch.append((s, img, status))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def prefetched(it: Iterator, pool: ThreadPoolExecutor) -> Iterator:
    """Iterate ``it`` with its next item computed in ``pool`` while the caller works on the current one."""
    nxt = pool.submit(next, it, None)
    while True:
        item = nxt.result()
        if item is None:
            return
        nxt = pool.submit(next, it, None)
        yield item


def forward_batches(subject: SubjectModel, todo: list[Sample], hook_point: str, batch_size: int = 1,
                    max_image_pixels: int | None = None, skipped: list[dict] | None = None,
                    stop_at_hook: bool = True) -> Iterator[ForwardBatch]:
    """Run the model over ``todo`` (image samples first) and yield each batch's hooked-layer output.

    Args:
        subject: the loaded model (:func:`mmsae.models.load_subject_model`).
        todo: samples to run.
        hook_point: module path whose output is captured.
        batch_size: samples per forward pass.
        max_image_pixels: images with more pixels are skipped (decompression bombs); None = Pillow's limit.
        skipped: unusable images are appended here as ``{"sample_id", "image", "reason"}``.
        stop_at_hook: end each forward at the hooked layer.

    Yields:
        :class:`ForwardBatch`; its ``acts`` were computed under ``torch.no_grad`` (grad mode is not held
        across the yield, so a consumer may train between batches).

    Raises:
        ValueError: bad hook point; an image's token count disagrees with the model's layout.
    """
    model = subject.model
    module = resolve_hook_point(model, hook_point)
    skipped = [] if skipped is None else skipped
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-loader")
    try:
        with ActivationCapture(module, stop=stop_at_hook) as cap:
            for batch in prefetched(image_batches(todo, batch_size, max_image_pixels, skipped), loader):
                inputs = prepare_inputs(subject, [(s, img) for s, img, _ in batch]).to(subject.device)
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
                with torch.no_grad():
                    acts = cap.run(model, **inputs)
                ids = inputs["input_ids"].cpu()
                lengths = inputs["attention_mask"].sum(1).tolist()
                coords = image_token_coordinates(model, inputs["image_sizes"].cpu()) if "image_sizes" in inputs else []
                rows = []
                for b, (s, img, status) in enumerate(batch):
                    n = int(lengths[b])
                    tok_ids = ids[b, :n]
                    layout = token_layout(subject, tok_ids, coords[b] if img is not None else None, s.sample_id)
                    rows.append(SampleTokens(s, img, status, n, tok_ids.numpy().astype(np.int32), layout,
                                             token_roles(subject, s, tok_ids)))
                yield ForwardBatch(rows, acts)
    finally:
        loader.shutdown(wait=True, cancel_futures=True)

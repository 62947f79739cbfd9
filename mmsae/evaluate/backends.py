"""Model backends for evaluation, all through transformers: open-vocabulary detection whose boxes
prompt SAM (GroundingDINO + SAM as in the paper, or OWL-ViT + SAM: any
``AutoModelForZeroShotObjectDetection``), and CLIP (``CLIPModel``; open_clip when installed).

Loading never substitutes random weights: :func:`try_load` returns ``(None, reason)`` when a model
cannot be loaded (e.g. offline with no local copy), and the stage reports that metric unavailable.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


def try_load(loader, what: str):
    """``(loader(), None)`` or ``(None, "what: reason")`` when loading raises."""
    try:
        return loader(), None
    except Exception as exc:  # noqa: BLE001 - any failure means the metric is unavailable
        reason = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        log.warning("unavailable: %s", reason)
        return None, reason


SAM_MASKS = ("union", "single")


class GroundedSegmenter:
    """Phrase -> mask: zero-shot detection, boxes above ``box_threshold`` prompt SAM, masks united.

    Per box, ``sam_masks="union"`` (default in ``evaluate.sam_masks``; the released code) asks SAM for
    its three candidate masks and keeps their union: EvolvingLMMs-Lab/multimodal-sae
    ``sae_auto_interp/agents/scorers/segment/segment_scorer.py`` lines 256-263 call SAM with the
    default ``multimask_output=True`` and ``segment/utils.py`` ``refine_masks`` (lines 91-97) keeps
    pixels where the mean over the three is > 0; segment_scorer.py lines 183-185 then unite the boxes.
    ``sam_masks="single"`` asks for SAM's single-mask output (``multimask_output=False``) instead.

    Args:
        detector, detector_processor: an ``AutoModelForZeroShotObjectDetection`` and its processor.
        sam, sam_processor: a ``SamModel`` and ``SamProcessor``.
        box_threshold, text_threshold: detection thresholds (paper: 0.3).
        sam_masks: ``"union"`` or ``"single"``.

    Raises:
        ValueError: ``sam_masks`` is not one of :data:`SAM_MASKS`.
    """

    def __init__(self, detector, detector_processor, sam, sam_processor, box_threshold: float = 0.3,
                 text_threshold: float = 0.25, device: str = "cpu", *, sam_masks: str):
        if sam_masks not in SAM_MASKS:
            raise ValueError(f"evaluate.sam_masks: {sam_masks!r} is not one of {', '.join(SAM_MASKS)}")
        self.det, self.det_proc = detector.eval().to(device), detector_processor
        self.sam, self.sam_proc = sam.eval().to(device), sam_processor
        self.box_threshold, self.text_threshold, self.device = box_threshold, text_threshold, device
        self.sam_masks = sam_masks

    @classmethod
    def from_pretrained(cls, detector: str, sam: str, **kw) -> "GroundedSegmenter":
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor

        return cls(AutoModelForZeroShotObjectDetection.from_pretrained(detector), AutoProcessor.from_pretrained(detector),
                   SamModel.from_pretrained(sam), SamProcessor.from_pretrained(sam), **kw)

    @torch.no_grad()
    def boxes(self, image: Image.Image, phrase: str) -> np.ndarray:
        """(n, 4) boxes (x0, y0, x1, y1) in pixels for ``phrase``."""
        text = phrase.lower().strip().rstrip(".") + "."
        grounded = hasattr(self.det_proc, "post_process_grounded_object_detection") and "grounding" in type(self.det).__name__.lower()
        if grounded:
            inputs = self.det_proc(images=image, text=text, return_tensors="pt").to(self.device)
            out = self.det(**inputs)
            res = self.det_proc.post_process_grounded_object_detection(
                out, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
                target_sizes=[image.size[::-1]])[0]
        else:
            inputs = self.det_proc(images=image, text=[[text.rstrip(".")]], return_tensors="pt").to(self.device)
            out = self.det(**inputs)
            res = self.det_proc.post_process_grounded_object_detection(
                out, threshold=self.box_threshold, target_sizes=[image.size[::-1]])[0]
        return res["boxes"].detach().cpu().float().numpy().reshape(-1, 4)

    @torch.no_grad()
    def mask(self, image: Image.Image, phrase: str) -> np.ndarray | None:
        """Bool (height, width) union over the detected boxes of SAM's masks (per box: the union of the
        three candidates, or the single mask; see the class docstring); None when nothing is detected."""
        boxes = self.boxes(image, phrase)
        if len(boxes) == 0:
            return None
        inputs = self.sam_proc(images=image, input_boxes=[[b.tolist() for b in boxes]], return_tensors="pt").to(self.device)
        out = self.sam(**inputs, multimask_output=self.sam_masks == "union")
        masks = self.sam_proc.post_process_masks(out.pred_masks.cpu(), inputs["original_sizes"].cpu(),
                                                 inputs["reshaped_input_sizes"].cpu())[0]  # (boxes, candidates, h, w)
        return masks.reshape(-1, image.size[1], image.size[0]).any(0).numpy()


class ClipScorer:
    """CLIP embeddings and scores (torchmetrics' definition) for images and phrases.

    Args:
        model, processor: a transformers ``CLIPModel`` and ``CLIPProcessor``.
    """

    def __init__(self, model, processor, device: str = "cpu"):
        self.model, self.proc, self.device = model.eval().to(device), processor, device

    @classmethod
    def from_pretrained(cls, name: str, backend: str = "transformers", **kw):
        if backend == "open_clip":
            return OpenClipScorer(name)
        from transformers import CLIPModel, CLIPProcessor

        return cls(CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name), **kw)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        inputs = self.proc(images=images, return_tensors="pt").to(self.device)
        return _as_array(self.model.get_image_features(**inputs))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        inputs = self.proc(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
        return _as_array(self.model.get_text_features(**inputs))


def _as_array(out) -> np.ndarray:
    t = out if torch.is_tensor(out) else getattr(out, "pooler_output", out[0])
    return t.detach().cpu().float().numpy()


class OpenClipScorer:
    """The same interface over open_clip (optional; it needs torchvision)."""

    def __init__(self, name: str):
        import open_clip

        arch, _, pretrained = name.partition(":")
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.model.eval()

    @torch.no_grad()
    def embed_images(self, images):
        return self.model.encode_image(torch.stack([self.preprocess(i) for i in images])).float().numpy()

    @torch.no_grad()
    def embed_texts(self, texts):
        return self.model.encode_text(self.tokenizer(texts)).float().numpy()

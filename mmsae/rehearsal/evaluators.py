"""Tiny random GroundingDINO, SAM and CLIP for the rehearsal's Table 1, built from their transformers configs.

Each is saved with ``save_pretrained`` (model and processor) into a local directory that
``evaluate.detector``, ``evaluate.segmenter`` and ``evaluate.clip`` name in ``config/rehearsal.yaml``,
so :mod:`mmsae.evaluate.backends` loads it through the same ``from_pretrained`` calls as the paper's
``IDEA-Research/grounding-dino-base``, ``facebook/sam-vit-huge`` and ``openai/clip-vit-base-patch32``,
and ``evaluate.require_models`` accepts it (a local directory counts as present).

Kept from the published models: the architectures and their processors' conventions (GroundingDINO:
a Swin backbone, a BERT text encoder with WordPiece and ``[CLS] ... [SEP]``, phrases ending in ``.``;
SAM: images resized to a fixed longest side and padded square, 16 px patches; CLIP: a BPE
with ``</w>`` word ends, ``<|startoftext|>``/``<|endoftext|>``, 77 positions, 224 px crops with
32 px patches). Shrunk: every width and depth, GroundingDINO's queries and input resolution, SAM's input side, and the
vocabularies (characters, so any phrase tokenizes). Weights are random (seeded): the boxes, masks and
similarities are noise, and the Table 1 they give says nothing about the method.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

DETECTOR_DIR = "models/grounding-dino-tiny"  # relative to the working directory (config/rehearsal.yaml)
SEGMENTER_DIR = "models/sam-tiny"
CLIP_DIR = "models/clip-tiny"
SEED = 0
WIDTH = 32
SAM_SIDE = 256  # SAM's input side (the published 1024 makes every mask ~16x slower on a CPU)
QUERIES = 6  # GroundingDINO's object queries (900 published): at most this many boxes per phrase


def recipe(kind: str) -> dict:
    return {"kind": kind, "version": 2, "seed": SEED, "width": WIDTH, "sam_side": SAM_SIDE, "queries": QUERIES}


def _bert_tokenizer():
    """A WordPiece tokenizer over single characters (whole words from :data:`string.ascii_lowercase`
    letters fall apart into ``c ##h ##a ...``), lower-casing as bert-base-uncased does."""
    from transformers import BertTokenizer

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits
    pieces += list(chars + string.punctuation) + [f"##{c}" for c in chars]
    return BertTokenizer(vocab={p: i for i, p in enumerate(pieces)}, do_lower_case=True, model_max_length=256)


def _clip_tokenizer():
    """CLIP's BPE layout (byte-level, ``</w>`` word ends) with every byte and byte-plus-``</w>`` as a
    piece and no merges: each word is its characters."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [f"{c}</w>" for c in alphabet]
    return CLIPTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], model_max_length=77)


def build_detector(out_dir: str | os.PathLike = DETECTOR_DIR) -> Path:
    """A random GroundingDINO (Swin backbone of 4 one-block stages, 1 encoder and 2 decoder layers (its
    weight tying needs 2),
    :data:`QUERIES` queries, d_model 32) and its processor (images resized to 160-256 px) in ``out_dir``."""
    import torch
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    from mmsae.rehearsal import building, is_built

    out_dir = Path(out_dir)
    if is_built(out_dir, recipe("grounding-dino-tiny")):
        return out_dir
    tokenizer = _bert_tokenizer()
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
                          out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=2 * WIDTH, max_position_embeddings=256)
    config = GroundingDinoConfig(backbone_config=backbone.to_dict(), text_config=text.to_dict(), num_queries=QUERIES,
                                 encoder_layers=1, decoder_layers=2, encoder_ffn_dim=2 * WIDTH,
                                 decoder_ffn_dim=2 * WIDTH, encoder_attention_heads=2, decoder_attention_heads=2,
                                 d_model=WIDTH, max_text_len=256)
    torch.manual_seed(SEED)
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 160, "longest_edge": 256}),
        tokenizer=tokenizer)
    with building(out_dir, recipe("grounding-dino-tiny")) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir


def build_segmenter(out_dir: str | os.PathLike = SEGMENTER_DIR) -> Path:
    """A random SAM (a 2-layer ViT encoder of width 32 with one global-attention layer, a 2-layer
    mask decoder) and SAM's processor (longest side resized to :data:`SAM_SIDE`, padded square) in
    ``out_dir``."""
    import torch
    from transformers import (SamConfig, SamMaskDecoderConfig, SamModel, SamProcessor, SamPromptEncoderConfig,
                              SamVisionConfig)
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from mmsae.rehearsal import building, is_built

    out_dir = Path(out_dir)
    if is_built(out_dir, recipe("sam-tiny")):
        return out_dir
    vision = SamVisionConfig(hidden_size=WIDTH, output_channels=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                             mlp_dim=2 * WIDTH, window_size=8, global_attn_indexes=[1], num_pos_feats=WIDTH // 2,
                             image_size=SAM_SIDE)
    prompt = SamPromptEncoderConfig(hidden_size=WIDTH, mask_input_channels=4, image_size=SAM_SIDE)
    decoder = SamMaskDecoderConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, mlp_dim=2 * WIDTH,
                                   iou_head_hidden_dim=WIDTH)
    config = SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                       mask_decoder_config=decoder.to_dict())
    torch.manual_seed(SEED)
    model = SamModel(config).eval()
    processor = SamProcessor(image_processor=SamImageProcessorPil(
        size={"longest_edge": SAM_SIDE}, pad_size={"height": SAM_SIDE, "width": SAM_SIDE}))
    with building(out_dir, recipe("sam-tiny")) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir


def build_clip(out_dir: str | os.PathLike = CLIP_DIR) -> Path:
    """A random CLIP (one-layer text and vision transformers of width 32, 224 px images in 32 px
    patches, 77 text positions) and its processor in ``out_dir``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from mmsae.rehearsal import building, is_built

    out_dir = Path(out_dir)
    if is_built(out_dir, recipe("clip-tiny")):
        return out_dir
    tokenizer = _clip_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                          num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                              num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=WIDTH)
    torch.manual_seed(SEED)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 224},
                                                                    crop_size={"height": 224, "width": 224}),
                              tokenizer=tokenizer)
    with building(out_dir, recipe("clip-tiny")) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir


def build_all(workdir: str | os.PathLike) -> dict[str, Path]:
    """The three models under ``workdir``: ``{"detector", "segmenter", "clip": path}``."""
    workdir = Path(workdir)
    return {"detector": build_detector(workdir / DETECTOR_DIR), "segmenter": build_segmenter(workdir / SEGMENTER_DIR),
            "clip": build_clip(workdir / CLIP_DIR)}

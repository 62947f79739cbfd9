"""A tiny random subject model with the layout of ``llava-hf/llama3-llava-next-8b-hf`` (the paper's model).

What is kept from the published model (its ``config.json``, processor and chat template files):

* the composite: ``LlavaNextForConditionalGeneration``, a CLIP vision tower on 336 px views of
  14 px patches (576 tokens per view), anyres grid pinpoints 336x672, 672x336, 672x672, 1008x336,
  336x1008, the learned image-newline vector (``use_image_newline_parameter``), vision features
  from the second-to-last layer without CLS (``vision_feature_layer`` -2, strategy ``default``), a
  GELU projector, untied input and output embeddings;
* the language model's depth and shape ratios: 32 Llama layers (so the paper's hook point
  ``model.language_model.layers.24`` exists), grouped-query attention with 4 query heads per key/value
  head, an MLP 3.5x the width, RMSNorm eps 1e-5, rope theta 500000, 8192 positions;
* the Llama-3 token conventions: a byte-level BPE with Llama-3's pre-tokenizer split, BOS
  ``<|begin_of_text|>`` added by the tokenizer, turns ``<|start_header_id|>ROLE<|end_header_id|>``
  + blank line, images first as ``<image>``, each text part as a newline, the text and ``<|eot_id|>``;
  ``<image>`` and ``<pad>`` added after the base vocabulary, the embedding rows padded to a multiple of 64.

What is shrunk: every width (d_model 64, vision 32), the vision depth (2) and the vocabulary (a 2048-piece
BPE trained here on CPython's topic help and the rehearsal's own conversations). Every weight is random
(seeded). Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DIR = "models/llama3-llava-next-8b-tiny"  # relative to the working directory (config/rehearsal.yaml)
SEED = 0
BPE_VOCAB = 2048
D_MODEL = 64
VISION_WIDTH = 32

# the published model's values
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
IMAGE_SIZE, PATCH_SIZE = 336, 14
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BOS, EOS_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
IMAGE_TOKEN, PAD = "<image>", "<pad>"
# Llama-3's pre-tokenizer split (contractions, letter runs with one leading non-letter, 1-3 digits,
# punctuation runs, newline runs, other whitespace)
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
         r"\s*[\r\n]+|\s+(?!\S)|\s+")

# The published chat format, written out: per message a header and a blank line, then every image
# part as <image>, then every text part as a newline, its text and <|eot_id|>; the generation prompt
# is the assistant's header.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\n\n' -}}"
    "{%- set parts = m['content'] -%}"
    "{%- for p in parts if p['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{- '\n' ~ p['text'] ~ '<|eot_id|>' -}}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)


def recipe() -> dict:
    """What the build depends on (its stamp): a change rebuilds it."""
    return {"kind": "llama3-llava-next-8b-tiny", "version": 2, "seed": SEED, "bpe_vocab": BPE_VOCAB,
            "d_model": D_MODEL, "vision_width": VISION_WIDTH, "chat_template": CHAT_TEMPLATE}


def training_text() -> str:
    """The BPE's training text: CPython's topic help (inside every CPython) and the rehearsal's
    conversations and prompts, so their words are few tokens."""
    import pydoc_data.topics

    from mmsae.rehearsal.data import vocabulary_text

    return vocabulary_text() + "\n\n" + "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))


def build_tokenizer():
    """A Llama-3-style fast tokenizer with a :data:`BPE_VOCAB`-piece byte-level BPE.

    Returns:
        A ``PreTrainedTokenizerFast``: BOS added to every encoding, EOS ``<|eot_id|>``, pad ``<pad>``,
        ``<image>`` a special token (ids: the BPE, then the Llama-3 specials, then ``<image>``, ``<pad>``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([training_text()], trainer)
    specials = [BOS, EOS_TEXT, HEADER_START, HEADER_END, EOT]
    tok.add_special_tokens(specials)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, model_max_length=8192,
                                   clean_up_tokenization_spaces=True)
    fast.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    fast.add_special_tokens({"pad_token": PAD})
    return fast


def build(out_dir: str | os.PathLike = DIR) -> Path:
    """Build the tiny model, its tokenizer and processor into ``out_dir`` (kept when already built).

    Returns:
        ``out_dir``; it loads with :func:`mmsae.models.load_subject_model` like the published model.
    """
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from mmsae.rehearsal import building, is_built

    out_dir = Path(out_dir)
    if is_built(out_dir, recipe()):
        return out_dir
    tokenizer = build_tokenizer()
    image_id, pad_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, PAD])
    vocab = -(-len(tokenizer) // 64) * 64  # the published model pads its 128258 rows to 128320
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=D_MODEL, intermediate_size=D_MODEL * 7 // 2, num_hidden_layers=32,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=VISION_WIDTH,
                              intermediate_size=4 * VISION_WIDTH, num_hidden_layers=2, num_attention_heads=2,
                              projection_dim=VISION_WIDTH)
    config = LlavaNextConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_id,
        image_grid_pinpoints=PINPOINTS, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", use_image_newline_parameter=True, tie_word_embeddings=False,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, do_pad=True)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                                   image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    with building(out_dir, recipe()) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "mmsae_provenance.json").write_text(json.dumps({
            "kind": "mmsae-rehearsal-llava-next", "layout_of": "llava-hf/llama3-llava-next-8b-hf",
            "weights": "random (seeded), untrained: numbers from this model test the plumbing only",
            "seed": SEED}, indent=2))
    log.info("rehearsal subject model: %d parameters, vocabulary %d", sum(p.numel() for p in model.parameters()), vocab)
    return out_dir

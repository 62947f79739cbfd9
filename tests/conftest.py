"""Shared fixtures: a tiny random LLaVA-NeXT (shapes only), the real demo model, both loaded once per
session as subject models, odd images. Shared non-fixture helpers (the checkout, Snakemake dry runs,
declared dependencies) are in tests/helpers.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmsae.models.demo import build_demo_model


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from mmsae.models.demo import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A LLaVA-NeXT with a 4-layer, 64-wide random language model (SmolLM2's tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    lm = LlamaForCausalLM(cfg).eval()
    return build_demo_model(tmp_path_factory.mktemp("models") / "tiny", text_model=lm, tokenizer=smollm2_tokenizer(),
                            image_size=56, patch_size=14, vision_hidden_size=32, vision_layers=1)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory):
    """The real embedded default model (SmolLM2-135M-Instruct weights), built once per session."""
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def subject(tiny_llava_dir):
    """The tiny LLaVA-NeXT loaded once per session (float32 on the CPU, whatever GPU is visible).
    Shared: a test that hooks or edits it must undo that before it returns."""
    from mmsae.models import load_subject_model

    return load_subject_model(tiny_llava_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def demo_subject(demo_model_dir):
    """The demo model (SmolLM2-135M-Instruct language model) loaded once per session (float32, CPU); shared as
    :func:`subject` is."""
    from mmsae.models import load_subject_model

    return load_subject_model(demo_model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """Images of many kinds: good RGB, CMYK, 16-bit, palette, RGBA, truncated, junk, degenerate."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "good.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)).save(d / "deep16.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    rgba = np.concatenate([rgb, np.full((60, 90, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    Image.fromarray(rgb).save(d / "full.jpg", quality=95)
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (d / "full.jpg").unlink()
    (d / "junk.png").write_bytes(b"this is not an image")
    Image.fromarray(rgb[:4, :4]).save(d / "tiny.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(d / "blank.png")
    return d


# Fixtures that load the real demo model (SmolLM2-135M-Instruct's weights: ~30 s to build, then
# seconds per forward on 2 cores). A test that uses one is an integration test of the demo, so it
# belongs to the slow tier; the fast tier (-m "not slow and not workflow") keeps the tiny models.
_DEMO_FIXTURES = {"demo_model_dir", "demo_subject"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _DEMO_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

"""steer.mode: reference judges a clamp against the reconstruction model with no clamp (#28.4), so
the reconstruction's own effect is not counted as the clamp's: an identity clamp changes nothing."""

import pytest
import torch

from mmsae.interventions.steer import SweepConfig, steering_sweep
from mmsae.models import load_subject_model, resolve_hook_point
from mmsae.sae import TopKSAE

HOOK = "model.language_model.layers.1"
DEAD = 5  # a latent that never fires: clamping it to 0 everywhere is the identity


@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    s = load_subject_model(tiny_llava_dir, dtype="float32", device="cpu")
    sae = TopKSAE(64, 128, k=8, seed=2)
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e4
    return s, resolve_hook_point(s.model, HOOK), sae


def test_identity_clamp_in_reference_mode_changes_nothing(tiny):
    s, module, sae = tiny
    cfg = SweepConfig(values=(0.0,), scale="absolute", positions="all", mode="reference", max_new_tokens=10)
    prompts = [{"prompt": "What is the capital of France?"}, {"prompt": "Write a haiku about the sea."}]
    rows = steering_sweep(s, module, sae, [DEAD], prompts, cfg, {}, {})
    assert len(rows) == 2
    for r in rows:
        assert r["changed"] is False and r["text_after"] == r["text_before"]
        assert r["ppl_after"] == pytest.approx(r["ppl_before"])
        assert r["baseline"] == "reconstruction"


def test_error_term_mode_keeps_the_unsteered_baseline(tiny):
    s, module, sae = tiny
    cfg = SweepConfig(values=(0.0,), scale="absolute", positions="all", mode="error_term", max_new_tokens=6)
    rows = steering_sweep(s, module, sae, [DEAD], [{"prompt": "What is the capital of France?"}], cfg, {}, {})
    assert rows[0]["changed"] is False and rows[0]["baseline"] == "unsteered"

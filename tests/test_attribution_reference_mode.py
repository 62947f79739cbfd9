"""attribution.method: reference explains the reconstruction-spliced model (#28.3): its summary
reports that model's metric, no error node, and validates against zero-ablation inside the
reconstruction-only splice. Checked against a hand-written hook."""

import numpy as np
import pytest
import torch

from mmsae.data import Sample
from mmsae.interventions.attribution_case import run_case
from mmsae.models import load_subject_model, prepare_inputs, resolve_hook_point
from mmsae.sae import TopKSAE

HOOK = "model.language_model.layers.2"
CASE = {"name": "c", "prompt": "What is the capital of France?", "answer_prefix": "The capital is", "answer": " Paris",
        "baseline": " London"}


pytestmark = pytest.mark.slow  # two attribution runs per method on the tiny model (~50 s on 2 cores)

@pytest.fixture(scope="module")
def tiny(tiny_llava_dir):
    s = load_subject_model(tiny_llava_dir, dtype="float32", device="cpu")
    return s, resolve_hook_point(s.model, HOOK), TopKSAE(64, 128, k=8, seed=1)


def _metric_by_hand(s, module, sae, off=None):
    """m with the layer output replaced at every position by decode(TopK(ReLU(pre_acts(x)) with
    feature ``off`` masked to 0)), error term dropped; None = the unmodified model."""
    def hook(_m, _i, out):
        x = out[0] if isinstance(out, tuple) else out
        z = sae.pre_acts(x.flatten(0, 1)).relu()
        if off is not None:
            z[:, off] = 0
        vals, idx = z.topk(sae.k)
        new = sae.decode(vals, idx).view(x.shape)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    inputs = dict(prepare_inputs(s, [(Sample("c", CASE["prompt"]), None)], suffix=CASE["answer_prefix"]))
    a, b = (s.tokenizer.encode(CASE[k], add_special_tokens=False)[0] for k in ("answer", "baseline"))
    h = module.register_forward_hook(hook) if off != "clean" else None
    try:
        with torch.no_grad():
            logits = s.model(**inputs, use_cache=False).logits[0, -1]
    finally:
        if h is not None:
            h.remove()
    return (logits[a] - logits[b]).item()


def test_reference_mode_reports_the_reconstruction_model(tiny):
    s, module, sae = tiny
    _, summary, _ = run_case(s, module, sae, CASE, top_k=3, validate_top=5, how="sum", method="reference")
    m_recon = _metric_by_hand(s, module, sae)
    assert summary["metric"] == summary["metric_reconstruction"]
    assert summary["metric"] == pytest.approx(m_recon, rel=1e-4, abs=1e-5)
    assert summary["metric_clean"] == pytest.approx(_metric_by_hand(s, module, sae, "clean"), rel=1e-4, abs=1e-5)
    assert summary["error_attribution"] is None
    v = summary["validation"]
    want = [m_recon - _metric_by_hand(s, module, sae, f) for f in v["features"]]
    np.testing.assert_allclose(v["ablation_effect"], want, rtol=1e-4, atol=1e-5)
    assert v["ablation_splice"] == "reconstruction"


def test_ours_mode_keeps_the_clean_model_and_reports_the_reconstruction_beside(tiny):
    s, module, sae = tiny
    _, summary, _ = run_case(s, module, sae, CASE, top_k=3, validate_top=5, how="sum", method="ours")
    clean = _metric_by_hand(s, module, sae, "clean")
    assert summary["metric"] == pytest.approx(clean, rel=1e-4, abs=1e-5) and summary["metric_clean"] == summary["metric"]
    assert summary["metric_reconstruction"] == pytest.approx(_metric_by_hand(s, module, sae), rel=1e-4, abs=1e-5)
    assert isinstance(summary["error_attribution"], float) and summary["validation"]["ablation_splice"] == "error_kept"

"""attribution.method: reference (the released code) against a direct re-implementation, and the
validation of both methods against true zero-ablation."""

import numpy as np
import pytest
import torch

from mmsae.models import prepare_inputs
from mmsae.interventions.attribution import (ablation_effects, agreement, attribute, reconstruction_ablation_effects,
                                             reference_attribution)
from mmsae.interventions.attribution_case import run_case
from mmsae.data import Sample
from mmsae.models import ActivationCapture, resolve_hook_point
from mmsae.sae import TopKSAE

HOOK = "model.language_model.layers.2"


@pytest.fixture(scope="module")
def tiny(subject):
    s = subject
    sae = TopKSAE(64, 128, k=8, seed=1)
    return s, resolve_hook_point(s.model, HOOK), sae


def _released(model, module, sae, inputs, a, b, idx):
    """EvolvingLMMs-Lab/multimodal-sae get_attribution for one feature, re-typed: a clean and a corrupted
    forward through get_model_forward_cache_with_sae (mask multiply before select_topk, reconstruction
    replaces the output), backward of get_logit_diff on the corrupted logits, (clean - corrupted) *
    corrupted.grad summed over the hidden dim."""
    def forward(off):
        cache = {}

        def hook(_m, _i, outputs):
            x = outputs[0] if isinstance(outputs, tuple) else outputs
            bs, seq, dim = x.shape
            latents = sae.pre_acts(x.flatten(0, 1)).relu()
            if off is not None:
                mask = torch.ones_like(latents)
                mask[:, off] = 0
                latents = latents * mask
            top_acts, top_indices = latents.topk(sae.k, sorted=False)
            out = sae.decode(top_acts, top_indices).view(bs, seq, dim)
            cache["x"] = out
            return (out, *outputs[1:]) if isinstance(outputs, tuple) else out

        h = module.register_forward_hook(hook)
        try:
            logits = model(**inputs, use_cache=False).logits
        finally:
            h.remove()
        return logits, cache["x"]

    with torch.enable_grad():
        clean_logits, clean = forward(None)
        corrupted_logits, corrupted = forward(idx)
        corrupted.retain_grad()
        last = corrupted_logits[:, -1, :]
        (last[:, a] - last[:, b]).mean().backward()
    return ((clean - corrupted) * corrupted.grad).sum(-1).detach()[0], (clean_logits[0, -1, a] - clean_logits[0, -1, b]).item()


def test_reference_attribution_is_the_released_computation(tiny):
    s, module, sae = tiny
    inputs = dict(prepare_inputs(s, [(Sample("t", "What is the capital of France?"), None)], suffix="The capital is"))
    a, b = 5, 6
    with ActivationCapture(module, stop=True) as cap, torch.no_grad():  # which features are active in this sequence
        x = cap.run(s.model, **inputs)[0]
    feats = [int(f) for f in torch.unique(sae.encode(x.reshape(-1, 64))[1])[:4]]
    m_recon, got = reference_attribution(s.model, module, sae, inputs, a, b, feats)
    for f in feats:
        want, m_clean = _released(s.model, module, sae, inputs, a, b, f)
        np.testing.assert_allclose(got[f], want.numpy(), rtol=1e-4, atol=1e-6)
        assert m_recon == pytest.approx(m_clean, rel=1e-5)
        assert np.abs(got[f]).sum() > 0


def test_agreement():
    v = agreement([1.0, -2.0, 3.0, 0.5], [2.0, -1.0, 2.5, -0.1])
    assert v["n_features"] == 4 and v["sign_agreement"] == 0.75
    assert v["pearson_r"] == pytest.approx(np.corrcoef([1, -2, 3, 0.5], [2, -1, 2.5, -0.1])[0, 1])
    assert agreement([1.0, 2.0], [1.0, 2.0])["pearson_r"] is None


@pytest.mark.parametrize("method", ["ours", "reference"])
def test_run_case_validates_both_methods_against_zero_ablation(tiny, method):
    s, module, sae = tiny
    case = {"name": "c", "prompt": "What is the capital of France?", "answer_prefix": "The capital is", "answer": " Paris",
            "baseline": " London"}
    rows, summary, _ = run_case(s, module, sae, case, top_k=3, validate_top=6, how="sum", method=method)
    v = summary["validation"]
    assert summary["method"] == method and len(v["features"]) == 6
    inputs = dict(prepare_inputs(s, [(Sample("c", case["prompt"]), None)], suffix=case["answer_prefix"]))
    a, b = (s.tokenizer.encode(case[k], add_special_tokens=False)[0] for k in ("answer", "baseline"))
    truth = reconstruction_ablation_effects if method == "reference" else ablation_effects  # the model each explains
    _, effects = truth(s.model, module, sae, inputs, a, b, v["features"])  # the truth, recomputed
    np.testing.assert_allclose(v["ablation_effect"], [effects[f] for f in v["features"]], rtol=1e-4, atol=1e-6)
    _, ref = reference_attribution(s.model, module, sae, inputs, a, b, v["features"])
    np.testing.assert_allclose(v["reference"]["attribution"], [ref[f].sum() for f in v["features"]], rtol=1e-4, atol=1e-6)
    for name in ("ours", "reference"):
        want = agreement(v[name]["attribution"], v["ablation_effect"])
        assert v[name]["n_features"] == 6 and v[name]["sign_agreement"] == want["sign_agreement"]
        assert v[name]["pearson_r"] == pytest.approx(want["pearson_r"])
    by_feature = {}
    for r in rows:
        by_feature[r["feature"]] = by_feature.get(r["feature"], 0.0) + r["attribution"]
    chosen = v[method]["attribution"]
    np.testing.assert_allclose([by_feature[f] for f in v["features"]], chosen, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="attribution.method"):
        run_case(s, module, sae, case, 3, 6, "sum", "released")


def test_special_tokens_the_sae_was_trained_without_are_left_undecomposed(tiny):
    """keep_special (an SAE trained with exclude_special_tokens): no feature is attributed or ablated at a
    special-token position, in either method; elsewhere ours is unchanged (the forward is the same), and
    at a special position the error node takes what the features had: <x - b_dec, dm/dx>."""
    s, module, sae = tiny
    case = {"name": "c", "prompt": "What is the capital of France?", "answer_prefix": "The capital is", "answer": " Paris",
            "baseline": " London"}
    inputs = dict(prepare_inputs(s, [(Sample("c", case["prompt"]), None)], suffix=case["answer_prefix"]))
    special = np.isin(inputs["input_ids"][0].numpy(), s.special_token_ids)
    assert special.any() and not special.all()  # the chat template's specials: the check is not vacuous
    a, b = (s.tokenizer.encode(case[k], add_special_tokens=False)[0] for k in ("answer", "baseline"))
    skip = torch.from_numpy(special)
    every, kept = attribute(s.model, module, sae, inputs, a, b), attribute(s.model, module, sae, inputs, a, b, skip)
    assert kept.metric == pytest.approx(every.metric, abs=1e-5)
    assert special[every.positions].any() and not special[kept.positions].any()
    dense = lambda r: np.bincount(r.positions * sae.d_sae + r.features, r.values, len(special) * sae.d_sae)  # noqa: E731
    np.testing.assert_allclose(dense(kept), dense(every) * ~special.repeat(sae.d_sae), atol=1e-6)
    per_pos = np.bincount(every.positions, every.values, len(special))
    np.testing.assert_allclose(kept.error, every.error + per_pos * special, rtol=1e-4, atol=1e-4)

    rows, summary, _ = run_case(s, module, sae, case, top_k=3, validate_top=6, how="sum", method="ours", keep_special=True)
    assert rows and not any(special[r["position"]] for r in rows)
    assert summary["special_tokens_spliced"] is False and summary["n_positions_unspliced"] == int(special.sum())
    v = summary["validation"]
    _, effects = ablation_effects(s.model, module, sae, inputs, a, b, v["features"], skip)
    np.testing.assert_allclose(v["ablation_effect"], [effects[f] for f in v["features"]], rtol=1e-4, atol=1e-6)
    _, nowhere = ablation_effects(s.model, module, sae, inputs, a, b, v["features"], torch.ones_like(skip))
    assert all(e == 0 for e in nowhere.values())  # skipping every position: no feature is active to ablate
    _, everywhere = ablation_effects(s.model, module, sae, inputs, a, b, v["features"])
    assert any(e != 0 for e in everywhere.values())
    _, ref = reference_attribution(s.model, module, sae, inputs, a, b, v["features"], skip)
    assert all((ref[f][special] == 0).all() for f in v["features"])
    np.testing.assert_allclose(v["reference"]["attribution"], [ref[f].sum() for f in v["features"]], rtol=1e-4, atol=1e-6)
    assert run_case(s, module, sae, case, 3, 6, "sum", "ours")[1]["special_tokens_spliced"] is True
    rows, summary, _ = run_case(s, module, sae, case, top_k=3, validate_top=6, how="mean", method="ours", keep_special=True)
    n_text = int(((s.model.config.image_token_id != inputs["input_ids"][0]).numpy() & ~special).sum())  # text positions decomposed
    for t in summary["top_text"]:  # a mean over the decomposed text positions, not over the specials too
        assert t["attribution"] == pytest.approx(sum(r["attribution"] for r in rows if r["feature"] == t["feature"]) / n_text, rel=1e-5)

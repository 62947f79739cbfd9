"""Steering (clamping with the error term) and attribution (one backward) on real models."""

import numpy as np
import pytest
import torch

from mmsae.interventions.attribution import ablation_effects, attribute, pool
from mmsae.interventions.attribution_case import run_case
from mmsae.data import Sample
from mmsae.models import load_subject_model, prepare_inputs, resolve_hook_point
from mmsae.sae import TopKSAE
from mmsae.sae.splice import Clamp, SteeringHook
from mmsae.interventions.steer import generate, resolve_clamp_value

HOOK = "model.language_model.layers.15"


@pytest.fixture(scope="module")
def demo(demo_subject):
    s = demo_subject
    sae = TopKSAE(576, 512, k=8, seed=0)
    with torch.no_grad():  # a data-like b_dec so that latents fire with realistic magnitudes
        x = _layer_output(s, "The quick brown fox jumps over the lazy dog.")
        sae.init_b_dec(x, "mean")
    return s, resolve_hook_point(s.model, HOOK), sae


def _layer_output(s, text):
    from mmsae.models import ActivationCapture

    ids = s.tokenizer(text, return_tensors="pt")
    with ActivationCapture(resolve_hook_point(s.model, HOOK), stop=True) as cap, torch.no_grad():
        return cap.run(s.model, **ids)[0]


def _inputs(s, prompt, suffix=""):
    return dict(prepare_inputs(s, [(Sample("t", prompt), None)], suffix=suffix))


def test_no_clamp_is_the_identity(demo):
    s, module, sae = demo
    inputs = _inputs(s, "What is the capital of France?")
    with torch.no_grad():
        base = s.model(**inputs).logits
        h = module.register_forward_hook(SteeringHook(sae, [], mode="error_term", positions=None))
        hooked = s.model(**inputs).logits
        h.remove()
    assert torch.equal(base, hooked)
    plain = generate(s.model, inputs, module, None, 12)
    assert torch.equal(plain, generate(s.model, inputs, module, SteeringHook(sae, [], mode="error_term", positions=None), 12))
    assert "Paris" in s.tokenizer.decode(plain[0])


def test_clamp_adds_the_decoder_direction(demo):
    s, _, sae = demo
    x = torch.randn(1, 5, 576) * 3
    vals, idx = sae.encode(x[0])
    f = int(idx[0, 0])  # active at position 0
    out = SteeringHook(sae, [Clamp(f, 50.0)], mode="error_term", positions="all").steer(x)
    z_f = (vals * (idx == f)).sum(-1)
    torch.testing.assert_close(out[0], x[0] + (50.0 - z_f)[:, None] * sae.W_dec[f])
    ref = SteeringHook(sae, [Clamp(f, 50.0)], mode="reference", positions=None).steer(x)
    pre = sae.pre_acts(x[0]).relu()
    pre[:, f] = 50.0
    torch.testing.assert_close(ref[0], sae.decode(*pre.topk(sae.k, dim=-1)))  # no error term


def test_a_clamp_changes_generation_and_positions_are_respected(demo):
    s, module, sae = demo
    inputs = _inputs(s, "Tell me about your favourite food.")
    plain = generate(s.model, inputs, module, None, 10)
    f = 3
    big = resolve_clamp_value(200.0, "absolute", None)
    assert not torch.equal(plain, generate(s.model, inputs, module, SteeringHook(sae, [Clamp(f, big)], mode="error_term", positions="all"), 10))
    gen_only = generate(s.model, inputs, module, SteeringHook(sae, [Clamp(f, big)], mode="error_term", positions="generated"), 10)
    assert gen_only[0, 0] == plain[0, 0]  # the first token comes from the (unsteered) prompt pass
    assert not torch.equal(gen_only, plain)
    assert resolve_clamp_value(5, "max_multiple", 2.0) == 10.0
    with pytest.raises(ValueError, match="max_multiple"):
        resolve_clamp_value(5, "max_multiple", None)


def test_attribution_equals_the_dense_gradient(demo):
    s, module, sae = demo
    inputs = _inputs(s, "What is the capital of France?", suffix="The capital of France is")
    a, b = s.tokenizer.encode(" Paris", add_special_tokens=False)[0], s.tokenizer.encode(" London", add_special_tokens=False)[0]
    res = attribute(s.model, module, sae, inputs, a, b)
    with torch.no_grad():
        logits = s.model(**inputs).logits[0, -1]
    assert res.metric == pytest.approx((logits[a] - logits[b]).item(), abs=1e-3)  # the splice changes nothing

    # brute force: a dense (seq, d_sae) latent leaf
    holder = {}

    def dense_hook(_m, _i, out):
        x = out[0] if isinstance(out, tuple) else out
        flat = x.reshape(-1, 576)
        with torch.no_grad():
            z = sae.encode_dense(flat)
            eps = flat - (z @ sae.W_dec + sae.b_dec)
        z = z.requires_grad_(True)
        holder["z"] = z
        return (z @ sae.W_dec + sae.b_dec + eps).reshape(x.shape)

    h = module.register_forward_hook(dense_hook)
    with torch.enable_grad():
        logits = s.model(**inputs, use_cache=False).logits[0, -1]
        (logits[a] - logits[b]).backward()
    h.remove()
    dense = (holder["z"] * holder["z"].grad).detach()
    sparse = torch.zeros_like(dense)
    sparse[torch.as_tensor(res.positions), torch.as_tensor(res.features)] = torch.as_tensor(res.values)
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=1e-3)

    base, effects = ablation_effects(s.model, module, sae, inputs, a, b, [int(res.features[0])])
    assert base == pytest.approx(res.metric, abs=1e-3)
    modality = np.array(["text"] * len(inputs["input_ids"][0]))
    pooled = pool(res, modality, "sum")
    assert pooled["image"] == {} and sum(pooled["text"].values()) == pytest.approx(res.values.sum(), rel=1e-4)


def test_run_case_with_an_image_and_bad_answers(tiny_llava_dir, image_dir):
    s = load_subject_model(tiny_llava_dir)
    module = resolve_hook_point(s.model, "model.language_model.layers.2")
    sae = TopKSAE(64, 128, k=8, seed=1)
    case = {"name": "c", "prompt": "Is it green?", "image": str(image_dir / "good.png"), "answer": "Yes", "baseline": "No"}
    rows, summary, grids = run_case(s, module, sae, case, top_k=3, validate_top=5, how="sum", method="ours")
    assert rows and {r["modality"] for r in rows} == {"image", "text"}
    assert summary["top_image"] and all((f, v) for (f, v) in grids) and all(g.shape == (4, 4) for g in grids.values())
    assert summary["metric_spliced"] == pytest.approx(summary["metric"], abs=1e-4)
    assert len(summary["validation"]["features"]) == 5
    with pytest.raises(ValueError, match="not one"):
        run_case(s, module, sae, {**case, "answer": " Yes indeed"}, 3, 5, "sum", "ours")


def test_skipped_positions_are_never_steered(demo):
    """skip (special tokens the SAE was trained without): those positions keep x in both modes, the
    others are steered as before; in generate the hook learns every forward's input_ids, so skipping
    every id of the vocabulary leaves the generation unsteered, and skipping the specials does not."""
    s, module, sae = demo
    x = torch.randn(1, 5, 576) * 3
    skip = torch.tensor([[True, False, False, True, False]])
    f = int(sae.encode(x[0])[1][1, 0])
    for mode in ("error_term", "reference"):
        hook = SteeringHook(sae, [Clamp(f, 50.0)], mode=mode, positions="all")
        full, part = hook.steer(x), hook.steer(x, skip=skip)
        assert torch.equal(part[skip], x[skip]) and torch.equal(part[~skip], full[~skip])
        assert not torch.equal(full[skip], x[skip])
        rows = SteeringHook(sae, [None, [Clamp(f, 50.0)], [Clamp(f, 50.0)]], mode=mode, positions="all")  # per-row, as the sweep
        x3, skip3 = x.repeat(3, 1, 1), skip.repeat(3, 1)
        out = rows.steer(x3, skip=skip3)
        assert torch.equal(out[0], x3[0]) and torch.equal(out[skip3], x3[skip3]) and torch.equal(out[1:][~skip3[1:]], full[~skip].repeat(2, 1))
    inputs = _inputs(s, "Tell me about your favourite food.")
    plain = generate(s.model, inputs, module, None, 10)
    every = SteeringHook(sae, [Clamp(3, 200.0)], mode="error_term", positions="all", skip_token_ids=range(len(s.tokenizer)))
    assert torch.equal(generate(s.model, inputs, module, every, 10), plain)
    special = SteeringHook(sae, [Clamp(3, 200.0)], mode="error_term", positions="all", skip_token_ids=s.special_token_ids)
    assert not torch.equal(generate(s.model, inputs, module, special, 10), plain)
    with pytest.raises(ValueError, match="input_ids"):
        SteeringHook(sae, [Clamp(3, 1.0)], mode="error_term", positions="all", skip_token_ids=[0]).steer(x)

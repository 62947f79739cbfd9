"""Steering and attribution logic on toy layers and toy data (no subject model): the released code's
steering hook, the success rule, 'toward the feature', the hook point travelling with the SAE."""

import pytest

from mmsae.sae.io import check_hook_point


def test_hook_point_comes_from_the_sae_cfg():
    cfg = {"hook_name": "model.language_model.layers.15", "metadata": {"hook_name": "model.language_model.layers.15"}}
    assert check_hook_point(cfg, "model.language_model.layers.15", "sae/cfg.json") == "model.language_model.layers.15"
    assert check_hook_point({"metadata": {"hook_name": "a.b"}}, "a.b", "x") == "a.b"
    with pytest.raises(ValueError, match=r"sae/cfg.json.*'model.language_model.layers.15'.*model.hook_point is 'model.language_model.layers.3'"):
        check_hook_point(cfg, "model.language_model.layers.3", "sae/cfg.json")
    assert check_hook_point({}, "a.b", "x") == "a.b"  # an SAE without hook_name: nothing to disagree with


import re

import numpy as np
import polars as pl
import torch
from torch import nn

from mmsae.models import prepare_inputs
from mmsae.data import Sample
from mmsae.models import load_subject_model, resolve_hook_point
from mmsae.sae import TopKSAE
from mmsae.sae.splice import Clamp, SteeringHook
from mmsae.interventions.steer import SweepConfig, generate, steering_sweep
from mmsae.interventions.verdict import (content_words, continuation_perplexity, control_features, feature_words, is_success, prompt_state,
                                  toward_feature)


class _Toy(nn.Module):
    """A decoder-layer-like module: returns a tuple whose first element is the hidden state."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return (self.lin(x), "cache")


def _released_hook(sae, feature, k):
    """Direct re-implementation of the released clamp_features_max hook (EvolvingLMMs-Lab/multimodal-sae,
    sae_auto_interp/features/steering.py); EleutherAI's Sae.pre_acts includes the ReLU, select_topk is
    topk(k, sorted=False), decode adds b_dec."""
    def hook(module, _, outputs):
        # released: unpack_outputs = list(outputs) (decoder layers returned tuples then; now a tensor)
        unpack = list(outputs) if isinstance(outputs, tuple) else [outputs]
        latents = sae.pre_acts(unpack[0]).relu()
        if latents.shape[1] != 1:
            latents[:, :, feature] = k
        top_acts, top_indices = latents.topk(sae.k, sorted=False)
        unpack[0] = sae.decode(top_acts[0], top_indices[0]).unsqueeze(0)
        return tuple(unpack) if isinstance(outputs, tuple) else unpack[0]
    return hook


def test_reference_mode_is_the_released_hook_on_every_forward():
    torch.manual_seed(0)
    d, sae = 16, TopKSAE(16, 64, k=4, seed=3)
    layer = _Toy(d)
    calls = [torch.randn(1, 6, d)] + [torch.randn(1, 1, d) for _ in range(4)]  # the prompt pass, then 4 generated tokens
    f = 7
    with torch.no_grad():
        plain = [layer(x)[0] for x in calls]
        h = layer.register_forward_hook(_released_hook(sae, f, 30.0))
        want = [layer(x) for x in calls]
        h.remove()
        h = layer.register_forward_hook(SteeringHook(sae, [Clamp(f, 30.0)], mode="reference", positions=None))
        got = [layer(x) for x in calls]
        h.remove()
    for w, g, p in zip(want, got, plain):
        assert g[1] == "cache"
        torch.testing.assert_close(g[0], w[0])
        assert not torch.allclose(g[0], p)  # the reconstruction replaces every forward, also the generated ones
    # the clamp reached the generated forwards in the old code: it must not
    gen = SteeringHook(sae, [Clamp(f, 30.0)], mode="reference", positions=None)
    gen.calls = 1
    torch.testing.assert_close(gen.steer(calls[1], clamp=False), gen(None, None, (calls[1],))[0])


@pytest.mark.parametrize("mode", ["error_term", "reference"])
def test_per_row_clamps_equal_one_hook_per_row(mode):
    torch.manual_seed(1)
    sae = TopKSAE(16, 64, k=4, seed=3)
    x = torch.randn(1, 5, 16).repeat(3, 1, 1)
    rows = [None, [Clamp(7, 30.0)], [Clamp(2, 5.0), Clamp(9, 1.0)]]
    got = SteeringHook(sae, rows, mode=mode, positions="all").steer(x)
    assert torch.equal(got[0], x[0])  # None: the unsteered model, also in reference mode
    for b in (1, 2):
        torch.testing.assert_close(got[b], SteeringHook(sae, rows[b], mode=mode, positions="all").steer(x[b: b + 1])[0])
    with pytest.raises(ValueError, match="batch of 2"):
        SteeringHook(sae, rows, mode=mode, positions="all").steer(x[:2])
    with pytest.raises(ValueError, match="outside the SAE"):
        SteeringHook(sae, [None, [Clamp(64, 1.0)]], mode=mode, positions="all")


def test_reference_generation_matches_the_released_hook(tiny_llava_dir):
    s = load_subject_model(tiny_llava_dir)
    module = resolve_hook_point(s.model, "model.language_model.layers.2")
    sae = TopKSAE(64, 128, k=8, seed=1)
    inputs = dict(prepare_inputs(s, [(Sample("t", "Tell me about your day."), None)]))
    h = module.register_forward_hook(_released_hook(sae, 5, 40.0))
    try:
        with torch.no_grad():
            want = s.model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    finally:
        h.remove()
    got = generate(s.model, inputs, module, SteeringHook(sae, [Clamp(5, 40.0)], mode="reference", positions=None), 8)
    assert torch.equal(got, want)


def test_continuation_perplexity_equals_a_token_by_token_computation(tiny_llava_dir):
    s = load_subject_model(tiny_llava_dir)
    inputs = dict(prepare_inputs(s, [(Sample("t", "Tell me about your day."), None)]))
    cont = torch.tensor([100, 2000, 35, 7, 4096])
    nll = []
    with torch.no_grad():
        ids = inputs["input_ids"]
        for i in range(len(cont)):
            x = torch.cat([ids, cont[None, :i]], 1)
            logp = s.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].log_softmax(-1)
            nll.append(-logp[cont[i]].item())
    want = float(torch.tensor(nll).mean().exp())
    assert continuation_perplexity(s.model, inputs, cont) == pytest.approx(want, rel=1e-4)
    state = prompt_state(s.model, inputs)  # one prompt pass shared by many continuations
    for _ in range(2):
        assert continuation_perplexity(s.model, inputs, cont, state) == pytest.approx(want, rel=1e-4)
    assert continuation_perplexity(s.model, inputs, cont[:1], state) == pytest.approx(float(torch.tensor(nll[0]).exp()), rel=1e-4)
    with pytest.raises(ValueError, match="empty"):
        continuation_perplexity(s.model, inputs, torch.tensor([], dtype=torch.long))


def test_perplexity_with_an_image_reuses_the_prompt_pass(tiny_llava_dir, image_dir):
    from mmsae.data.corpus import load_image

    s = load_subject_model(tiny_llava_dir)
    image = load_image(str(image_dir / "good.png"))[0]
    inputs = dict(prepare_inputs(s, [(Sample("t", "Describe this image.", str(image_dir / "good.png")), image)]))
    cont = torch.tensor([100, 2000, 35, 7])
    with torch.no_grad():  # the whole sequence in one pass, no cache
        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], cont[None]], 1),
                    attention_mask=torch.ones(1, inputs["input_ids"].shape[1] + 4, dtype=torch.long))
        logits = s.model(**full, use_cache=False).logits[0, inputs["input_ids"].shape[1] - 1: -1]
    want = float(torch.nn.functional.cross_entropy(logits, cont).exp())
    state = prompt_state(s.model, inputs)
    assert continuation_perplexity(s.model, inputs, cont, state) == pytest.approx(want, rel=1e-4)
    assert continuation_perplexity(s.model, inputs, cont, state) == pytest.approx(want, rel=1e-4)


def test_toward_the_feature_and_the_success_rule():
    assert content_words("The feature detects words about Oceans, the sea and ships!") == ["oceans", "sea", "ships"]
    contexts = pl.DataFrame({"feature": [3, 3, 4], "tokens": [["a", " ocean", "b"], [" Phot", "os"], ["x"]], "focus": [1, 0, 0]})
    expl = pl.DataFrame({"feature": [3], "explanation": ["Tokens related to the sea and water"]})
    words = feature_words(3, contexts, expl)
    assert words == ["ocean", "phot", "sea", "water"]
    assert feature_words(4, contexts, None) == [] and feature_words(9, None, None) == []
    assert toward_feature("I had a nice day.", "The oceans are deep.", words) == (True, ["ocean"])
    assert toward_feature("Photos of the sea.", "More photographs of the sea.", words) == (False, [])  # already there before
    assert toward_feature("I had a day.", "Photosynthesis!", words) == (True, ["phot"])
    assert toward_feature("a", "b sea", []) == (None, [])
    assert is_success(True, 2.0, 4.0, True, 2.0) and not is_success(True, 2.0, 4.01, True, 2.0)
    assert not is_success(False, 2.0, 2.0, True, 2.0) and not is_success(True, 2.0, 2.0, False, 2.0)
    assert not is_success(True, 2.0, 2.0, None, 2.0)


def test_control_features_are_every_other_feature_with_words():
    words = {3: ["sea"], 9: ["dog"], 5: ["cat"], 7: []}
    assert control_features(5, words) == [3, 9] and control_features(4, {**words, 4: ["x"]}) == [3, 5, 9]
    assert control_features(7, words) == [] and control_features(8, words) == []  # no words of its own: no verdict to compare
    assert control_features(3, {3: ["sea"]}) == []


def test_sweep_rows_carry_the_judgement(tiny_llava_dir):
    s = load_subject_model(tiny_llava_dir)
    module = resolve_hook_point(s.model, "model.language_model.layers.2")
    sae = TopKSAE(64, 128, k=8, seed=1)
    rows = steering_sweep(s, module, sae, [5], [{"prompt": "Tell me about your day.", "image": None}],
                          SweepConfig((0.5, 50.0), "absolute", None, "error_term", 6, 2.0), {}, {5: ["zzzz"]})
    assert [r["value"] for r in rows] == [0.5, 50.0]
    for r in rows:
        assert r["positions"] == "all" and r["ppl_before"] > 0 and r["ppl_after"] > 0
        assert r["toward_feature"] is False and r["success"] is False and r["feature_words"] == ["zzzz"]
        assert r["control_features"] == [] and r["control_toward"] is None and r["control_success"] is None


def test_sweep_judges_the_same_text_by_the_control_features_words(tiny_llava_dir):
    """The control is the steered text judged by every other feature's words: a word new in the
    steered text, given to feature 9 only, makes half the controls (9 of 6 and 9) toward and
    successful, and not the feature itself."""
    s = load_subject_model(tiny_llava_dir)
    module = resolve_hook_point(s.model, "model.language_model.layers.2")
    sae = TopKSAE(64, 128, k=8, seed=1)
    args = (s, module, sae, [5], [{"prompt": "Tell me about your day.", "image": None}],
            SweepConfig((50.0,), "absolute", None, "error_term", 6, 1e9), {})
    r = steering_sweep(*args, {5: ["zzzz"]})[0]
    assert r["changed"]
    new = [w for w in re.findall(r"[a-z]+", r["text_after"].lower()) if not any(b.startswith(w) for b in re.findall(r"[a-z]+", r["text_before"].lower()))]
    assert new, (r["text_before"], r["text_after"])
    r2 = steering_sweep(*args, {5: ["zzzz"], 9: [new[0]], 6: ["qqqq"], 7: []})[0]  # feature 7 has no words: no control
    assert r2["text_after"] == r["text_after"] and r2["control_features"] == [6, 9]
    assert r2["control_toward"] == 0.5 and r2["control_success"] == 0.5
    assert r2["toward_feature"] is False and r2["success"] is False
    r3 = steering_sweep(*args, {5: [new[0]], 9: ["zzzz"]})[0]  # the roles swapped
    assert r3["toward_feature"] is True and r3["success"] is True and r3["control_toward"] == 0.0 and r3["control_success"] == 0.0


def test_sweep_with_keep_special_leaves_special_positions_unsteered(tiny_llava_dir):
    """The sweep's batched generate (row 0 unsteered, then one row per clamp): with keep_special the
    steered rows equal the unsteered row at the special-token positions of the prompt pass (read at the
    next layer's input) and differ elsewhere; without it they differ there too."""
    s = load_subject_model(tiny_llava_dir)
    module = resolve_hook_point(s.model, "model.language_model.layers.2")
    after = resolve_hook_point(s.model, "model.language_model.layers.3")
    sae = TopKSAE(64, 128, k=8, seed=1)
    prompt = [{"prompt": "Tell me about your day.", "image": None}]
    special = np.isin(prepare_inputs(s, [(Sample("p", prompt[0]["prompt"]), None)])["input_ids"][0].numpy(), s.special_token_ids)
    assert special.any() and not special.all()
    for keep in (True, False):
        seen = []
        h = after.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()) if not seen else None)
        try:
            rows = steering_sweep(s, module, sae, [5], prompt, SweepConfig((50.0,), "absolute", None, "error_term", 3, 2.0, keep), {}, {})
        finally:
            h.remove()
        x = seen[0]  # (2, seq, d): the prompt pass, unsteered row then the clamped one
        assert rows[0]["special_tokens_steered"] is (not keep)
        assert torch.equal(x[0, special], x[1, special]) is keep
        assert not torch.equal(x[0, ~special], x[1, ~special])


def test_token_level_features_peak_on_one_content_word():
    """Steering's automatic pick: a feature whose top contexts peak on the same content word
    qualifies; one that peaks on template tokens or on scattered words does not."""
    import polars as pl

    from mmsae.interventions.verdict import token_level_features

    ctx = pl.DataFrame({
        "feature": [1, 1, 1, 2, 2, 2, 3, 3, 3, 4],
        "tokens": [["the", " Dogs", "ran"], ["a", " dog", "x"], [" dog", "!"],       # 1: 'dog' in 2 of 3, 'dogs' once
                   ["<|im_start|>", "user"], ["<|im_start|>", "x"], ["\n", "y"],      # 2: template tokens
                   [" river"], [" piano"], [" apple"],                                  # 3: a different word each time
                   [" cat"]],                                                           # 4: one context only
        "focus": [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    })
    picked = token_level_features(ctx, [2, 3, 1, 4], n=2)
    assert picked == [(1, "dog", pytest.approx(2 / 3))]
    assert token_level_features(ctx, [1], n=1, min_share=0.9) == []

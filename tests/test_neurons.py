"""Multimodal neurons: scores against brute force, causal effect of noise, reversible edits."""

import pytest
import torch

from mmsae.models import load_subject_model
from mmsae.neurons import find_all
from mmsae.neurons.edit import Delta, apply_delta, closed_form_delta, revert
from mmsae.neurons.find import (
    CoefficientCapture, caption, is_noun, mlp_modules, neuron_top_tokens, noun_targets, projection_columns, score_neurons,
)

CFG = dict(prompt_prefix="An image of", max_new_tokens=12, coefficient="down_proj_input", top_k=50, heatmap_neurons=2,
           top_tokens=5, causal_k=20, noise_scale=3.0, causal_cases=3, seed=0)


def test_noun_lexicon():
    words = "An image of a person with a scarf on their head and its fur sitting red cat dogs running".split()
    assert [w for w in words if is_noun(w)] == ["image", "person", "scarf", "head", "fur", "red", "cat", "dogs"]


@pytest.mark.parametrize("coefficient", ["down_proj_input", "act_fn"])
def test_scores_equal_brute_force(tiny_llava_dir, coefficient):
    s = load_subject_model(tiny_llava_dir)
    captioned = caption(s, None, "Describe a cat.", "A cat and a dog", 6)
    full, ids, start = captioned.inputs, captioned.ids, captioned.start
    targets = noun_targets(s.tokenizer, ids, start - 4)  # the prefix's nouns too
    assert targets and all(ids[t.position + 1] == t.token_id for t in targets)
    mlps = mlp_modules(s.model)
    with CoefficientCapture(mlps, coefficient) as cap, torch.no_grad():
        s.model(**full, use_cache=False)
    coeffs = cap.stacked()
    # brute force: every layer's full W_out^T W_U, every neuron's coefficient recomputed from the MLP input
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda _m, inp: inputs.append(inp[0][0])) for m in mlps]
    with torch.no_grad():
        s.model(**full, use_cache=False)
    for h in hooks:
        h.remove()
    w_u = s.model.get_output_embeddings().weight
    cols = projection_columns(s.model, [t.token_id for t in targets], chunk=1)
    for j, t in enumerate(targets):
        brute = []
        for l, mlp in enumerate(mlps):
            x = inputs[l][t.position]
            act = mlp.act_fn(mlp.gate_proj(x))
            a = act * mlp.up_proj(x) if coefficient == "down_proj_input" else act
            torch.testing.assert_close(coeffs[l, t.position], a, atol=1e-5, rtol=1e-5)
            p_full = mlp.down_proj.weight.T @ w_u.T  # (d_ff, vocab)
            brute.append(a * p_full[:, t.token_id])
        brute = torch.stack(brute).detach()
        got = score_neurons(coeffs, cols, t.position, j, 10)
        top = brute.flatten().topk(10)
        assert [(l * brute.shape[1] + i) for l, i, *_ in got] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, _, v, _ in got]), top.values, atol=1e-4, rtol=1e-4)
    ids_top, vals = neuron_top_tokens(s.model, 1, 3, k=5, chunk=1000)
    expect = (mlps[1].down_proj.weight[:, 3] @ w_u.T).topk(5)
    assert ids_top == expect.indices.tolist()


def test_noise_on_top_neurons_removes_the_noun_more_than_random(demo_model_dir):
    s = load_subject_model(demo_model_dir)
    samples = [{"name": f"t{i}", "prompt": p, "image": None} for i, p in enumerate(
        ["Describe a cat sitting on a sofa in few words.", "Describe a dog in a park in few words.",
         "Describe a red car in few words."])]
    res = find_all(s, samples, CFG)
    props = res["properties"]
    assert props["n_cases"] >= 3 and props["causal_cases"] == 3
    assert props["noun_removed_rate_top"] > props["noun_removed_rate_random"]
    assert all(r["noun"] in c["nouns"] for c in res["captions"] for r in res["neurons"] if r["sample"] == c["sample"])


def test_edit_is_reversible_and_round_trips(tiny_llava_dir, tmp_path):
    s = load_subject_model(tiny_llava_dir)
    ids = s.tokenizer("a cat sat", return_tensors="pt")
    with torch.no_grad():
        before = s.model(**ids).logits
    w_before = [m.down_proj.weight.clone() for m in mlp_modules(s.model)]
    cat = s.tokenizer.encode(" cat", add_special_tokens=False)[0]
    dog = s.tokenizer.encode(" dog", add_special_tokens=False)[0]
    delta = closed_form_delta(s.model, [(0, 5, 1.0), (2, 7, -0.5), (2, 9, 2.0)], cat, dog, eta=50.0)
    delta.save(tmp_path / "d.safetensors", {"source": "cat"})
    loaded = Delta.load(tmp_path / "d.safetensors")
    assert sorted(loaded.cols) == [0, 2] and torch.equal(loaded.cols[2][1], delta.cols[2][1].float())
    saved = apply_delta(s.model, loaded)
    with torch.no_grad():
        edited = s.model(**ids).logits
    assert not torch.equal(edited, before)
    gain = (edited[0, -1, dog] - edited[0, -1, cat]) - (before[0, -1, dog] - before[0, -1, cat])
    assert gain.item() != 0
    revert(s.model, saved)
    with torch.no_grad():
        assert torch.equal(s.model(**ids).logits, before)
    assert all(torch.equal(m.down_proj.weight, w) for m, w in zip(mlp_modules(s.model), w_before))

"""Multimodal neurons: scores against brute force, semantic sensitivity and the causal sweep against
computations by hand, reversible edits."""

import pytest
import torch
import torch.nn.functional as F

from mmsae.models import load_subject_model
from mmsae.neurons import find_all
from mmsae.neurons.edit import Delta, apply_delta, closed_form_delta, noise_delta, revert
from mmsae.neurons.find import (
    CoefficientCapture, caption, is_noun, mlp_modules, neuron_top_tokens, noun_targets, projection_columns, score_neurons,
)
from mmsae.neurons.properties import (
    SWEEP_KEYS, causal_sweep, choose_scale, layer_matched_random, semantic_hit, semantic_sensitivity,
)

CFG = dict(prompt_prefix="An image of", max_new_tokens=12, coefficient="down_proj_input", top_k=50, heatmap_neurons=2,
           top_tokens=5, causal_k=20, noise_scales=[0.3, 3.0], fluency_tolerance=0.1, causal_cases=3, seed=0)


def test_a_noun_counts_once_per_caption_at_its_first_occurrence(tiny_llava_dir):
    tok = load_subject_model(tiny_llava_dir).tokenizer
    ids = tok.encode("Describe: A scarf on a cat and a Scarf on a dog", add_special_tokens=False)
    targets = noun_targets(tok, ids, 2)
    assert [t.noun for t in targets] == ["scarf", "cat", "dog"]
    first = [t.position + 1 for t in targets]
    assert tok.decode(ids[first[0]:]).strip().startswith("scarf on a cat")  # the first scarf, not the second


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


class _Tok:
    """decode() of a planted vocabulary."""

    vocab = {1: " sc", 2: " dogs", 3: " gir"}

    def decode(self, ids):
        return self.vocab[ids[0]]


def test_semantic_sensitivity_counts_whole_words_not_prefixes():
    # a planted single-letter token ('s' for scarf) and fragments are no hits; the noun, its lemma and
    # the multi-token noun's first sub-token (the token scored) are
    assert not semantic_hit("scarf", " scarf", ["s", "sc", "scar", "c"])
    assert semantic_hit("scarf", " scarf", ["s", " Scarf "])
    assert semantic_hit("dogs", " dogs", ["dog"]) and not semantic_hit("dogs", " dogs", ["do", "d"])
    assert semantic_hit("giraffe", " gir", [" gir"]) and not semantic_hit("giraffe", " gir", ["g", "gi"])
    assert not semantic_hit("cat", " cat", ["c", "ca", "cats's"])
    cases = [{"noun": "scarf", "token_id": 1, "top": [(0, 1, 9.0, 1.0), (0, 2, 8.0, 1.0), (1, 3, 7.0, 1.0)]},
             {"noun": "dogs", "token_id": 2, "top": [(0, 2, 9.0, 1.0), (1, 4, 8.0, 1.0), (1, 3, 7.0, 1.0)]}]
    tokens = [{"layer": 0, "neuron": 1, "token": t} for t in ["s", "c", " the"]]   # prefix rule: hit
    tokens += [{"layer": 0, "neuron": 2, "token": t} for t in [" sc", "x"]]        # first sub-token: hit for scarf
    tokens += [{"layer": 1, "neuron": 3, "token": t} for t in ["d", "Dog"]]        # lemma of dogs; 'd' no hit
    tokens += [{"layer": 1, "neuron": 4, "token": t} for t in ["do", "dogsled"]]  # fragments: no hit
    # by hand, the first two neurons of each case: scarf (0,1) no, (0,2) yes; dogs (0,2) no, (1,4) no
    assert semantic_sensitivity(cases, tokens, _Tok(), 2) == pytest.approx(1 / 4)
    # all three: + scarf (1,3) no ('d', 'Dog' are not scarf), dogs (1,3) yes
    assert semantic_sensitivity(cases, tokens, _Tok(), 3) == pytest.approx(2 / 6)
    assert semantic_sensitivity([], tokens, _Tok(), 3) is None


def test_semantic_hit_lemmatises_the_top_tokens():
    """A plural top token hits its singular noun (#28.9): both sides are lemmatised."""
    assert semantic_hit("dog", " dog", ["dogs"]) and semantic_hit("dog", " dog", [" Dogs "])
    assert semantic_hit("scarf", " scarf", [" Scarves"]) and semantic_hit("mouse", " mouse", ["mice"])
    assert not semantic_hit("dog", " dog", ["do", "d", "cats"])


def test_layer_matched_random_neurons(tiny_llava_dir):
    s = load_subject_model(tiny_llava_dir)
    top = [(0, 5), (0, 9), (2, 1), (3, 7), (3, 8), (3, 9)]
    rnd = layer_matched_random(s.model, top, seed=1)
    assert sorted(layer for layer, _ in rnd) == sorted(layer for layer, _ in top)
    assert not set(rnd) & set(top) and len(set(rnd)) == len(top)
    assert rnd == layer_matched_random(s.model, top, seed=1) and rnd != layer_matched_random(s.model, top, seed=2)


def test_causal_sweep_equals_a_direct_computation(tiny_llava_dir):
    s = load_subject_model(tiny_llava_dir)
    captioned = caption(s, None, "Describe a cat.", "A cat and a dog", 6)
    start = captioned.start - 4  # the prefix's nouns count as the caption's
    targets = noun_targets(s.tokenizer, captioned.ids, start)
    mlps = mlp_modules(s.model)
    with CoefficientCapture(mlps, "down_proj_input") as cap, torch.no_grad():
        s.model(**captioned.inputs, use_cache=False)
    cols = projection_columns(s.model, [t.token_id for t in targets])
    cases = [{"full": captioned.inputs, "start": start, "position": t.position, "token_id": t.token_id,
              "top": score_neurons(cap.stacked(), cols, t.position, j, 30)} for j, t in enumerate(targets[:2])]
    k, scales, seed = 6, [0.5, 4.0], 3
    sweep = causal_sweep(s.model, cases, k, scales, seed)
    assert [r["scale"] for r in sweep] == scales and all(tuple(r) == SWEEP_KEYS for r in sweep)

    ids = captioned.inputs["input_ids"][0]

    def scores(case):  # P(noun) at its predicting position; sum of log P of the other caption tokens
        with torch.no_grad():
            probs = F.softmax(s.model(input_ids=ids[None]).logits[0].double(), -1)
        others = [q for q in range(case["start"], len(ids)) if q != case["position"] + 1]
        return probs[case["position"], case["token_id"]].item(), sum(torch.log(probs[q - 1, ids[q]]).item() for q in others)

    base = [scores(c) for c in cases]
    for row, scale in zip(sweep, scales):
        for kind in ("top", "random"):
            drops, ll0, ll1 = [], 0.0, 0.0
            for c_i, (c, (p_before, ll_before)) in enumerate(zip(cases, base)):
                top = [(layer, i) for layer, i, *_ in c["top"][:k]]
                neurons = top if kind == "top" else layer_matched_random(s.model, top, seed + c_i)
                delta = noise_delta(s.model, neurons, scale, seed + c_i)
                w0 = [m.down_proj.weight.detach().clone() for m in mlps]
                with torch.no_grad():
                    for layer, (idx, d) in delta.cols.items():
                        mlps[layer].down_proj.weight[:, idx] += d
                p_after, ll_after = scores(c)
                with torch.no_grad():
                    for m, w in zip(mlps, w0):
                        m.down_proj.weight.copy_(w)
                drops.append(p_before - p_after)
                ll0, ll1 = ll0 + ll_before, ll1 + ll_after
            assert row[f"noun_prob_drop_{kind}"] == pytest.approx(sum(drops) / len(drops), abs=1e-5)
            assert row[f"fluency_change_{kind}"] == pytest.approx((ll1 - ll0) / abs(ll0), rel=1e-4, abs=1e-6)
    assert sweep[1]["fluency_change_top"] != 0.0 and sweep[1]["noun_prob_drop_top"] != 0.0
    assert causal_sweep(s.model, [], k, scales, seed) == []


def test_choose_scale():
    sweep = [{"scale": sc, "noun_prob_drop_top": 0.1 * sc, "noun_prob_drop_random": 0.0, "fluency_change_top": -0.2 * sc,
              "fluency_change_random": fr} for sc, fr in [(0.3, -0.01), (1.0, -0.09), (3.0, -0.4)]]
    out = choose_scale(sweep, 0.1)
    assert out["causal_scale"] == 1.0 and out["causal_at_scale"] == sweep[1] and out["causal_sweep"] == sweep
    assert out["causal_scale_reason"] is None
    none = choose_scale(sweep, 0.001)
    assert none["causal_scale"] is None and none["causal_at_scale"] is None and "0%" in none["causal_scale_reason"]
    assert choose_scale([], 0.1)["causal_scale_reason"] == "no cases to measure"


def test_find_all_on_the_demo_model(demo_model_dir):
    s = load_subject_model(demo_model_dir)
    samples = [{"name": f"t{i}", "prompt": p, "image": None} for i, p in enumerate(
        ["Describe a cat sitting on a sofa in few words.", "Describe a dog in a park in few words.",
         "Describe a red car in few words."])]
    res = find_all(s, samples, CFG)
    props = res["properties"]
    assert props["n_cases"] >= 3 and props["causal_cases"] == 3
    assert "noun_removed_rate_top" not in props and [r["scale"] for r in props["causal_sweep"]] == CFG["noise_scales"]
    assert props["causal_scale"] is None or props["causal_at_scale"]["scale"] == props["causal_scale"]
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

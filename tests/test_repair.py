"""Answer repair (mmsae.interventions.repair): the ranking finds a planted feature, the success rule,
the matched-activation control, the rule in the default dry run and the report's section."""

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from helpers import REPO

from mmsae.interventions.attribution import attribute
from mmsae.interventions.attribution_case import case_inputs
from mmsae.interventions.repair import RepairConfig, _position_ids, feature_profile, is_repaired, matched_controls, rank_features, repair_case
from mmsae.interventions.repair_tally import tally
from mmsae.models import resolve_hook_point
from mmsae.sae import TopKSAE

CASE = {"name": "planet", "prompt": "Which planet is the largest?", "answer_prefix": "It is", "wrong": " Neptune",
        "correct": " Jupiter"}
PLANTED = 17


def _planted(subject):
    """A random SAE on the tiny model's last layer whose feature 17 fires everywhere (b_enc) and whose
    decoder direction is the unembedding of the wrong answer minus that of the correct one: it pushes
    toward the wrong answer, far more than any other feature."""
    module = resolve_hook_point(subject.model, "model.language_model.layers.3")
    ids, inputs, _, layout = case_inputs(subject, CASE, ("wrong", "correct"))
    unembed = subject.model.get_output_embeddings().weight
    direction = unembed[ids["wrong"]] - unembed[ids["correct"]]
    sae = TopKSAE(64, 128, k=8, seed=1)
    with torch.no_grad():
        sae.W_dec[PLANTED] = direction / direction.norm()
        sae.b_enc[PLANTED] = 5.0
    return module, sae, ids, inputs, layout


def test_ranking_picks_the_feature_planted_toward_the_wrong_answer(subject):
    module, sae, ids, inputs, layout = _planted(subject)
    result = attribute(subject.model, module, sae, inputs, ids["wrong"], ids["correct"])
    ranked = rank_features(result, layout["modality"], 3)
    assert ranked["text"][0][0] == PLANTED and ranked["text"][0][1] > 10 * ranked["text"][1][1] > 0
    assert ranked["image"] == []  # a text-only prompt
    # the other direction: the correct answer's attribution puts it last (most negative), so it is not picked
    flipped = rank_features(attribute(subject.model, module, sae, inputs, ids["correct"], ids["wrong"]), layout["modality"], 3)
    assert PLANTED not in [f for f, _ in flipped["text"]]


def test_repair_case_ablates_the_planted_feature_and_the_control_does_not_flip(subject):
    """Ablating the planted feature subtracts its decoder direction (wrong minus correct) from every text
    position, so the first greedy token becomes the correct one; the matched controls are other features,
    drawn the same way for the same seed."""
    module, sae, ids, *_ = _planted(subject)
    cfg = RepairConfig(budget=2, ablate_values=(0.0,), control_draws=2, max_new_tokens=3, max_ppl_ratio=1e9)
    rows = repair_case(subject, module, sae, CASE, cfg)
    base = rows[0]
    assert base["arm"] == "baseline" and base["answer_before"] != CASE["correct"] and not base["flipped"]
    top = [r for r in rows if r["arm"] == "top"]
    assert [(r["n_features"], r["features"][0]) for r in top] == [(1, PLANTED), (2, PLANTED)]
    assert all(r["success"] and r["flipped"] and r["answer_after"] == CASE["correct"] for r in top)
    assert top[0]["clamp_values"] == [0.0] and top[0]["mean_activations"][0] > 4
    ctrl = [r for r in rows if r["arm"] == "control"]
    assert {r["draw"] for r in ctrl} == {1, 2} and all(PLANTED not in r["features"] for r in ctrl)
    assert not any(r["success"] for r in ctrl)
    t = tally(rows)["planet"]
    assert (t["n_trials"], t["successes"], t["control_successes"], t["control_draws"]) == (2, 2, 0.0, 2)
    assert t["first_success"]["n_features"] == 1
    again = repair_case(subject, module, sae, CASE, cfg)
    assert [r["features"] for r in again] == [r["features"] for r in rows]  # seeded
    with pytest.raises(ValueError, match="not one"):
        repair_case(subject, module, sae, {**CASE, "correct": " Jupiter and Saturn"}, cfg)


def test_the_flip_criterion_and_the_fluency_bound():
    wrong, right, other = 5, 7, 9
    assert is_repaired(wrong, right, right, 10.0, 20.0, 2.0)  # flipped, ppl exactly at the bound
    assert not is_repaired(wrong, right, right, 10.0, 20.01, 2.0)  # flipped but not fluent
    assert not is_repaired(wrong, other, right, 10.0, 10.0, 2.0)  # changed, to another token
    assert not is_repaired(right, right, right, 10.0, 10.0, 2.0)  # already correct: nothing repaired
    assert is_repaired(wrong, right, right, 10.0, 35.0, 4.0)


def test_the_control_draws_features_of_matched_mean_activation():
    mean = {0: 1.0, 1: 1.1, 2: 0.9, 3: 1.05, 4: 0.95, 5: 1.2, 6: 10.0, 7: 11.0, 8: 0.01, 10: 9.0, 11: 12.0}
    rng = np.random.default_rng(0)
    for _ in range(20):
        drawn = matched_controls([0, 6], mean, exclude={0, 6}, rng=rng, pool_size=2)
        # target 0 (mean 1.0): the 2 nearest in log-ratio are 3 (1.05) and 4 (0.95); target 6 (10.0): 10 (9.0), 7 (11.0)
        assert drawn[0] in {3, 4} and drawn[1] in {10, 7}
    drawn = matched_controls([0, 0, 0], mean, exclude={0}, rng=np.random.default_rng(1), pool_size=1)
    assert drawn == [3, 4, 1]  # nearest first, never twice
    assert matched_controls([6], {6: 10.0}, exclude={6}, rng=rng) == []  # no candidate left
    a = [matched_controls([0, 6], mean, {0, 6}, np.random.default_rng(7), 3) for _ in range(2)]
    assert a[0] == a[1]  # seeded


def test_feature_profile_and_where_each_intervention_acts(subject):
    module, sae, ids, inputs, layout = _planted(subject)
    prof = feature_profile(subject.model, module, sae, inputs, layout["modality"])
    mean, peak = prof["text"][PLANTED]
    assert prof["image"] == {} and peak >= mean > 4
    n_text = int((layout["modality"] == "text").sum())
    with torch.no_grad():
        total = float(sae.encode(_layer_out(subject, module, inputs)[layout["modality"] == "text"])[0].sum())
    assert sum(m for m, _ in prof["text"].values()) * n_text == pytest.approx(total, rel=1e-4)
    text, image = _position_ids(subject, "text", True)["skip_token_ids"], _position_ids(subject, "image", False)
    assert subject.image_token_id in text and set(subject.special_token_ids) <= set(text)
    assert image == {"only_token_ids": [subject.image_token_id]}  # every other position is left alone
    assert _position_ids(subject, "text", False) == {"skip_token_ids": [subject.image_token_id]}


def test_only_token_ids_steers_exactly_those_positions():
    from mmsae.sae.model import TopKSAE
    from mmsae.sae.splice import Clamp, SteeringHook

    sae = TopKSAE(8, 32, 4, seed=0)
    x, ids = torch.randn(2, 5, 8), torch.tensor([[7, 3, 7, 1, 2], [3, 3, 7, 9, 7]])
    only = SteeringHook(sae, [Clamp(5, 30.0)], mode="error_term", positions="all", only_token_ids=[7])
    only.token_ids = ids
    mask = SteeringHook(sae, [Clamp(5, 30.0)], mode="error_term", positions="all")
    assert torch.equal(only.steer(x), mask.steer(x, skip=ids != 7))
    both = SteeringHook(sae, [Clamp(5, 30.0)], mode="error_term", positions="all", only_token_ids=[7, 3], skip_token_ids=[3])
    both.token_ids = ids
    assert torch.equal(both.steer(x), only.steer(x))


def _layer_out(subject, module, inputs):
    seen = []
    h = module.register_forward_hook(lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out)[0]))
    try:
        with torch.no_grad():
            subject.model(**inputs)
    finally:
        h.remove()
    return seen[0]


def test_default_case_is_answered_wrongly_by_the_demo_model(demo_subject):
    """The default run's case is one the demo model gets wrong: its greedy answer is the configured wrong
    token, and the correct one is its runner-up."""
    case = yaml.safe_load((REPO / "config.yaml").read_text())["repair"]["cases"][0]
    ids, inputs, _, _ = case_inputs(demo_subject, case, ("wrong", "correct"))
    with torch.no_grad():
        top = demo_subject.model(**inputs).logits[0, -1].topk(2).indices.tolist()
    assert top == [ids["wrong"], ids["correct"]]


def test_report_shows_the_repair_section(tmp_path):
    from report_inputs import inputs

    from mmsae.report.page import ReportInputs, build_report

    base = {"case": "planet", "prompt": "Largest planet?", "image": None, "wrong": " Neptune", "correct": " Jupiter",
            "metric": 0.8, "answer_before": " Neptune", "text_before": " Neptune is big.", "ppl_before": 4.0}
    rows = [{**base, "kind": "none", "arm": "baseline", "draw": 0, "order": -1, "n_features": 0, "value": None,
             "features": [], "attributions": [], "answer_after": " Neptune", "text_after": " Neptune is big.",
             "flipped": False, "changed": False, "ppl_after": 4.0, "success": False}]
    for arm, draw, feats, after, ok in [("top", 0, [41], " Jupiter", True), ("control", 1, [12], " Neptune", False),
                                        ("control", 2, [13], " Jupiter", True)]:
        rows.append({**base, "kind": "ablate_text", "arm": arm, "draw": draw, "order": 0, "n_features": 1, "value": 0.0,
                     "features": feats, "attributions": [0.5], "answer_after": after, "text_after": after + " is big.",
                     "flipped": after == " Jupiter", "changed": after != " Neptune", "ppl_after": 5.0, "success": ok})
    page = build_report(ReportInputs(**inputs(tmp_path), repair=pl.DataFrame(rows)))
    assert "id=repair" in page and "Answer repair" in page
    section = page[page.index("id=repair"):]
    assert "<b>1</b> repaired the answer" in section and "<b>0.50</b> per draw (2 draws)" in section
    assert "ablate text features" in section and "#f41" in section and "First success: ablate text features 41 at 0" in section
    assert "id=repair" not in build_report(ReportInputs(**inputs(tmp_path / "none")))

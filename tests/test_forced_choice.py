"""Logprob-mode scoring on a local scorer (#28.2): P("1") read off the model's own logits, a forced
choice between the answer tokens 1 and 0, since ``transformers serve`` returns no logprobs."""

import io
import json
import math

import polars as pl
import pytest
import torch
from PIL import Image

from helpers import REPO
from scoring_tables import load_tasks, make_tables


def _independent_logit_gap(subject, messages: list[dict], images: list[Image.Image] = ()) -> float:
    """z("1") - z("0") at the first answer position by one full forward, built without the module under
    test: text chats through the tokenizer's own template (string contents), images handed to the
    processor as PIL images."""
    tok = subject.tokenizer
    if images:
        chat = []
        for m in messages:
            parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else [
                {"type": "text", "text": c["text"]} if c["type"] == "text" else {"type": "image", "image": images[0]}
                for c in m["content"]]
            chat.append({"role": m["role"], "content": parts})
        inputs = subject.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, return_tensors="pt")
    else:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")["input_ids"]
        inputs = {"input_ids": ids}
    with torch.no_grad():
        logits = subject.model(**inputs).logits[0, -1].double()
    one, zero = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("0")
    return float(logits[one] - logits[zero])


def _scorer(subject, tmp_path, calls=None):
    from mmsae.evaluate.forced_choice import ForcedChoiceConfig, ForcedChoiceScorer
    from mmsae.explain.cache import ResponseCache

    def loader():
        if calls is not None:
            calls.append(1)
        return subject
    return ForcedChoiceScorer(ForcedChoiceConfig(model="/models/scorer", loader=loader), ResponseCache(tmp_path / "cache.sqlite"))


def test_forced_choice_probability_is_the_softmax_over_the_two_answer_logits(subject, tmp_path):
    """Each row's P("1") equals exp(z1) / (exp(z1) + exp(z0)) from an independent full forward, also
    for the requests answered through the reused prefix cache and for an image request."""
    from mmsae.evaluate.scoring import build_tasks, score_tasks
    from mmsae.evaluate.scoring_examples import Example
    from mmsae.evaluate.scoring_prompts import highlight_tokens

    words = ["the", " river", " Danube", " flows", " east"]
    ex = {(4, "detection"): [Example("the Danube flows east", 1, "a", 0), Example("bake for ten minutes", 0, "b", 0),
                             Example("down the Rhine by boat", 1, "c", 0)],
          (4, "fuzzing"): [Example(highlight_tokens(words, [False, False, True, False, False]), 1, "a", 0),
                           Example(highlight_tokens(words, [True, False, False, False, True]), 0, "d", 0)]}
    buf = io.BytesIO()
    image = Image.new("RGB", (60, 44), (200, 30, 30))
    image.save(buf, "PNG")
    ex[(5, "detection")] = [Example(buf.getvalue(), 1, "img", -1)]
    tasks = [t for t in build_tasks([(4, "text", "names of rivers"), (5, "image", "something red")], ex, 0, mode="logprob")
             if t.messages is not None]
    scorer = _scorer(subject, tmp_path)
    df = pl.from_arrow(score_tasks(tasks, scorer))
    assert df["status"].to_list() == ["ok"] * len(tasks) and scorer.sent == len(tasks)
    assert scorer._prefix.ids, "text requests went through the prefix cache"
    for t, p in zip(tasks, df["probabilities"].to_list()):
        gap = _independent_logit_gap(subject, t.messages, [image] if t.modality == "image" else ())
        assert math.log(p[0] / (1 - p[0])) == pytest.approx(gap, abs=2e-4)
        assert p[0] == pytest.approx(1 / (1 + math.exp(-gap)), abs=1e-5)


def test_default_config_scores_every_request_in_logprob_mode(subject, tmp_path):
    """The default config (config.yaml over the schema's defaults) scores with the local model's
    logits: no malformed or no_logprobs row, pooled balanced accuracy and AUROC for real and shuffled
    explanations; a rerun is answered from the cache without loading the model; a server's cached
    answer to the same request is never taken for it."""
    import yaml
    from snakemake.utils import validate

    from mmsae.evaluate.forced_choice import uses_forced_choice
    from mmsae.evaluate.scoring import all_cached, logprob_sampling, score_tasks, summarise
    from mmsae.explain import EndpointConfig, endpoints

    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    validate(cfg, str(REPO / "config/schema.yaml"))  # fills the schema's defaults
    endpoint = endpoints.scorer(cfg, "results/models/demo")
    assert uses_forced_choice(endpoint, cfg["scoring"]["mode"])
    make_tables(tmp_path)
    tasks = load_tasks(tmp_path, mode=cfg["scoring"]["mode"])
    calls = []
    table = score_tasks(tasks, _scorer(subject, tmp_path, calls))
    df = pl.from_arrow(table)
    assert df["status"].to_list() == ["ok"] * len(tasks) and len(tasks) >= 4 * 2 * 2 * 4  # 4 features, each example
    summary = summarise(table)
    for g in summary["overall"]:
        assert g["n_failed"] == 0 and g["pooled_balanced_accuracy"] is not None and g["pooled_auroc"] is not None
    assert {g["explanation_kind"] for g in summary["overall"]} == {"real", "shuffled"}
    again = _scorer(subject, tmp_path, calls)
    assert pl.from_arrow(score_tasks(tasks, again))["cached"].all() and len(calls) == 1
    unique = {json.dumps(t.messages) for t in tasks}  # identical requests are answered once
    assert again.summary()["n_answers"] == len(unique) and again.summary()["n_computed"] == 0
    served = EndpointConfig(base_url=None, model="/models/scorer", max_tokens=1, extra_body=logprob_sampling(5))
    assert not all_cached(tasks, again.cache, served)
    src = (REPO / "workflow_scripts/score_explanations.py").read_text()
    assert "uses_forced_choice(endpoint, p[\"mode\"])" in src and "ForcedChoiceScorer.for_directory(" in src


@pytest.mark.slow
def test_demo_model_answers_one_or_zero_and_the_forced_choice_keeps_its_mass(demo_subject, tmp_path):
    """On the demo model (SmolLM2-135M-Instruct) the default prompts' text requests put most of the
    next-token probability on 1 or 0, so the forced choice is close to what the model would answer."""
    from mmsae.evaluate.scoring import score_tasks

    make_tables(tmp_path)
    tasks = [t for t in load_tasks(tmp_path, mode="logprob") if t.messages is not None and t.feature == 1]
    scorer = _scorer(demo_subject, tmp_path)
    df = pl.from_arrow(score_tasks(tasks, scorer))
    assert (df["status"] == "ok").all()
    assert scorer.summary()["answer_mass_median"] > 0.5


def test_report_names_the_forced_choice_and_shows_pooled_scores_with_auroc_beside_the_baseline():
    """The scoring section says where P("1") came from and gives, for real and shuffled
    explanations, pooled balanced accuracy and AUROC from the summary."""
    import pyarrow as pa

    from mmsae.evaluate.scoring import SCORING_SCHEMA, summarise
    from mmsae.report.page import ENV
    from mmsae.report.scoring import scoring_view

    def row(f, kind, label, p):
        return {"feature": f, "modality": "text", "category": None, "method": "detection", "explanation_kind": kind,
                "explanation": "x", "explanation_of": f, "mode": "logprob", "batch": 0, "examples": [], "n_examples": 1,
                "n_activating": label, "n_predicted": 1, "balanced_accuracy": None, "labels": [label],
                "predictions": [int(p >= 0.5)], "probabilities": [p], "status": "ok", "error": None, "raw_response": "0",
                "cached": False, "latency_s": None, "prompt_tokens": None, "completion_tokens": None,
                "scorer_model": "m", "prompt_version": "v2", "prompts": "ours"}
    rows = [row(1, "real", 1, 0.45), row(1, "real", 0, 0.40), row(1, "real", 1, 0.30), row(1, "real", 0, 0.20),
            row(1, "shuffled", 1, 0.30), row(1, "shuffled", 0, 0.45), row(1, "shuffled", 1, 0.20), row(1, "shuffled", 0, 0.40)]
    summary = summarise(pa.Table.from_pylist(rows, schema=SCORING_SCHEMA), scorer_model="results/models/demo")
    summary["forced_choice"] = {"method": "softmax", "n_answers": 8, "n_computed": 8, "answer_mass_median": 0.91,
                                "answer_mass_min": 0.8}
    html = ENV.get_template("scoring.html.j2").render(scoring=scoring_view(summary))
    assert "on the local scorer's own logits (results/models/demo; logprob mode" in html and "median 0.91" in html
    assert "0.500 · 0.500 · AUROC 0.750" in html  # real: pairs (0.45>0.40, 0.45>0.20, 0.30<0.40, 0.30>0.20)
    assert "0.500 · 0.500 · AUROC 0.000" in html  # shuffled: every activating example below every other
    assert "on our endpoint" not in html
    del summary["forced_choice"]
    assert "on our endpoint (results/models/demo" in ENV.get_template("scoring.html.j2").render(scoring=scoring_view(summary))

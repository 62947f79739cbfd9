"""scoring_summary.json names the scorer as the config does (#28.9), not as a local server reports
it (the absolute path of this machine's model directory)."""

import pyarrow as pa
from helpers import REPO

from mmsae.evaluate.scoring import SCORING_SCHEMA, configured_scorer, summarise


def _table(model: str) -> pa.Table:
    row = {"feature": 1, "modality": "text", "category": None, "method": "detection", "explanation_kind": "real",
           "explanation": "x", "explanation_of": 1, "mode": "batch", "batch": 0, "examples": [], "n_examples": 2,
           "n_activating": 1, "n_predicted": 2, "balanced_accuracy": 1.0, "labels": [1, 0], "predictions": [1, 0],
           "probabilities": None, "status": "ok", "error": None, "raw_response": None, "cached": False,
           "latency_s": None, "prompt_tokens": None, "completion_tokens": None, "scorer_model": model,
           "prompt_version": "v", "prompts": "ours"}
    return pa.Table.from_pylist([row], schema=SCORING_SCHEMA)


def test_summary_stores_the_configured_scorer():
    local = {"server": "local", "local_model": "results/models/demo", "model": "served-name"}
    remote = {"server": "remote", "model": "meta-llama/Llama-3.1-8B-Instruct", "local_model": None}
    assert configured_scorer(local) == "results/models/demo"
    assert configured_scorer(remote) == "meta-llama/Llama-3.1-8B-Instruct"
    absolute = str((REPO / "results/models/demo").resolve())  # what a local server reports as its model
    summary = summarise(_table(absolute), scorer_model=configured_scorer(local))
    assert summary["scorer_model"] == "results/models/demo"
    assert summarise(_table("m"))["scorer_model"] == "m"  # without a name: the rows' own


def test_the_rule_script_passes_the_configured_name():
    src = (REPO / "workflow_scripts/score_explanations.py").read_text()
    assert "summarise(table, scorer_model=configured_scorer(endpoint))" in src

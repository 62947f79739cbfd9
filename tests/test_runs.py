"""Two SAEs over one extraction: results that depend on the SAE live in results/runs/<run_name>/, so a
second SAE (sae.k 8, then 4) trains and interprets beside the first instead of overwriting it, and the
activations are extracted once."""

import json
import os
import shutil

import pytest
import yaml
from helpers import REPO, TINY, dry_run, fake_complete_tree, jobs, run_dir_for, smk, workdir_with

from mmsae.workflow.run_name import run_name

pytestmark = pytest.mark.workflow

# TINY without the stages that do not bear on this (explanations, steering, attribution, neurons, ...)
LEAN = {**TINY, "explain": {**TINY["explain"], "enabled": False}, "steer": {**TINY["steer"], "enabled": False},
        "attribution": {**TINY["attribution"], "enabled": False}, "neurons": {**TINY["neurons"], "enabled": False},
        "loss_recovered": {"enabled": False}, "features": {**TINY["features"], "crossmodal": {"enabled": False}},
        "export": {"enabled": False}, "extract": {**TINY["extract"], "parts": 1}}
K4 = {**LEAN, "sae": {**LEAN["sae"], "k": 4}}


def test_run_name_follows_the_sae_not_what_comes_after():
    a, b = run_dir_for(LEAN), run_dir_for(K4)
    assert a != b and a.startswith("results/runs/default-k8-") and b.startswith("results/runs/default-k4-")
    later = {**LEAN, "features": {**LEAN["features"], "top_n": 2}, "explain": {"max_tokens": 9}}
    assert run_dir_for(later) == a  # settings downstream of the SAE rerun inside the same folder
    assert run_dir_for({**LEAN, "sae": {**LEAN["sae"], "checkpoint_every": 5}}) == a  # how it trains, not what
    assert run_dir_for({**LEAN, "model": {**LEAN["model"], "hook_point": "model.language_model.layers.5"}}) != a
    assert run_dir_for({**LEAN, "run_name": "mine"}) == "results/runs/mine"
    with pytest.raises(ValueError, match="run_name '../x'"):
        run_name({"run_name": "../x"})


def test_a_second_sae_adds_a_run_and_keeps_the_first(tmp_path):
    """On a complete (touched) tree of the k=8 run, the k=4 config reruns the SAE and everything after
    it in its own folder, never extraction, and leaves the k=8 folder's files where they are."""
    wd = workdir_with(tmp_path, LEAN)
    fake_complete_tree(wd, REPO / "Snakefile")
    first = sorted(str(p.relative_to(wd)) for p in (wd / run_dir_for(LEAN)).rglob("*"))
    (wd / "config.yaml").write_text(yaml.safe_dump(K4))
    dag = dry_run(wd, REPO / "Snakefile")
    assert "train_sae" in dag.rerun and not dag.rerun & {"extract", "merge_activations"}
    second = run_dir_for(K4)
    new = [p for p in dag.outputs if not p.startswith("results/activations") and not p.startswith("results/models")]
    assert new and all(p.startswith(second + "/") for p in new)
    assert sorted(str(p.relative_to(wd)) for p in (wd / run_dir_for(LEAN)).rglob("*")) == first


@pytest.mark.slow
def test_two_saes_over_one_extraction(tmp_path, demo_model_dir):
    wd = workdir_with(tmp_path, LEAN)
    shutil.copytree(demo_model_dir, wd / "results/models/demo", copy_function=os.link)
    smk(wd, "--cores", "2")
    first = wd / run_dir_for(LEAN) / "report/index.html"
    before = (first.read_text(), first.stat().st_mtime_ns)
    shard_times = {p: p.stat().st_mtime_ns for p in (wd / "results/activations").rglob("*.parquet")}

    (wd / "config.yaml").write_text(yaml.safe_dump(K4))
    dry = smk(wd, "-n")
    planned = jobs(dry)
    assert "train_sae" in planned and "extract" not in planned and "merge_activations" not in planned, dry.stdout[-4000:]
    smk(wd, "--cores", "2")
    second = wd / run_dir_for(K4) / "report/index.html"
    assert {p: p.stat().st_mtime_ns for p in (wd / "results/activations").rglob("*.parquet")} == shard_times
    assert (first.read_text(), first.stat().st_mtime_ns) == before  # the k=8 report untouched
    assert second.read_text() != before[0]
    k_of = {r: json.loads((wd / run_dir_for(c) / "sae/cfg.json").read_text())["k"] for r, c in (("a", LEAN), ("b", K4))}
    assert k_of == {"a": 8, "b": 4}
    effective = yaml.safe_load((wd / run_dir_for(K4) / "config.effective.yaml").read_text())
    assert effective["sae"]["k"] == 4

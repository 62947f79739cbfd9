"""The run configuration a command gets is what the files it names say, plus the schema's defaults.

Every documented command is loaded through Snakemake's own API (its config-file merge, its schema
validation, the Snakefile's checks) and the loaded ``workflow.config`` is compared leaf by leaf
with the named file(s) validated alone: a leaf that equals neither is a value leaked from a file
the command does not name (before, ``--configfile config/llava-next-8b.yaml`` merged over the demo's
config.yaml). Also: ``--config`` values typed by the schema, the load-time model-presence gate
(``evaluate.require_models``) and the effective config written beside the results.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import REPO

pytestmark = pytest.mark.workflow  # loads the workflow through Snakemake's API (a few seconds each)

PAPER = REPO / "config/llava-next-8b.yaml"
EVAL_MODELS = ("IDEA-Research/grounding-dino-base", "facebook/sam-vit-huge", "openai/clip-vit-base-patch32")


# ---- helpers -------------------------------------------------------------------------------------

def load_workflow_config(workdir: Path, configfiles=(), config_args=(), snakefile: Path = REPO / "Snakefile") -> dict:
    """``workflow.config`` after Snakemake loads ``snakefile`` in ``workdir`` as the CLI would for
    ``--configfile *configfiles --config *config_args`` (the arguments parsed by Snakemake's own parser)."""
    from snakemake.api import SnakemakeApi
    from snakemake.cli import parse_config
    from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings, StorageSettings

    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                          config_settings=ConfigSettings(config=parse_config(list(config_args)),
                                                         configfiles=[Path(f).absolute() for f in configfiles]),
                          storage_settings=StorageSettings(), snakefile=snakefile, workdir=workdir)
        return copy.deepcopy(dict(wf._workflow.config))


def with_schema_defaults(*files: Path, schema: Path = REPO / "config/schema.yaml") -> dict:
    """The named files merged (Snakemake's own update_config, as for several ``--configfile``) and
    validated alone against the schema, which fills in its defaults: what the run should get."""
    from snakemake.utils import update_config, validate

    from mmsae.workflow.config_check import normalise_corpus

    cfg: dict = {}
    for f in files:
        update_config(cfg, yaml.safe_load(Path(f).read_text()))
    normalise_corpus(cfg)
    validate(cfg, str(schema))
    return cfg


def leaves(cfg, prefix: str = "") -> dict:
    """{dotted key: value} for every leaf (a non-dict value or an empty dict) of a nested config."""
    if isinstance(cfg, dict) and cfg:
        out = {}
        for k, v in cfg.items():
            out.update(leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: cfg}


def leaked(effective: dict, expected: dict) -> dict:
    """{key: (effective value, expected value)} for every leaf on which the two differ."""
    a, b = leaves(effective), leaves(expected)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")}


def fake_hf_cache(root: Path, repo_ids, files=("config.json", "preprocessor_config.json", "model.safetensors")) -> Path:
    """A Hugging Face hub cache (``models--org--name/{refs/main,snapshots/<rev>/...}``) holding
    ``files`` (empty) for each of ``repo_ids``."""
    rev = "0" * 40
    for repo_id in repo_ids:
        d = root / f"models--{repo_id.replace('/', '--')}"
        (d / "refs").mkdir(parents=True, exist_ok=True)
        (d / "refs/main").write_text(rev)
        for f in files:
            (d / "snapshots" / rev).mkdir(parents=True, exist_ok=True)
            (d / "snapshots" / rev / f).write_text("{}")
    return root


def paper_workdir(tmp_path: Path) -> Path:
    """A working directory in which config/llava-next-8b.yaml's corpus paths exist, with the demo's
    config.yaml beside them (as in the checkout)."""
    wd = tmp_path / "run"
    (wd / "data/llava-next-data").mkdir(parents=True)
    (wd / "data/llava-next-data/llava_next_data.json").write_text("[]")
    (wd / "data/interpret-images").mkdir(parents=True)
    shutil.copy2(REPO / "config.yaml", wd / "config.yaml")
    return wd


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """HF_HUB_CACHE pointing at a fake cache with the paper config's evaluation models."""
    cache = fake_hf_cache(tmp_path / "hub", EVAL_MODELS)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


# ---- the documented commands ---------------------------------------------------------------------

def test_default_command_is_config_yaml_plus_defaults(tmp_path):
    """``snakemake --cores all``: config.yaml, nothing else."""
    wd = tmp_path / "run"
    wd.mkdir()
    shutil.copy2(REPO / "config.yaml", wd / "config.yaml")
    effective = load_workflow_config(wd)
    assert leaked(effective, with_schema_defaults(REPO / "config.yaml")) == {}


def test_paper_command_gets_only_the_paper_file(tmp_path, hf_cache):
    """``snakemake --cores all --resources gpu=8 --configfile config/llava-next-8b.yaml`` (README,
    the file's header): no leaf of the demo's config.yaml reaches the paper run."""
    wd = paper_workdir(tmp_path)
    effective = load_workflow_config(wd, configfiles=[PAPER])
    diff = leaked(effective, with_schema_defaults(PAPER))
    assert diff == {}, "leaked from config.yaml:\n" + "\n".join(f"  {k}: {a!r} (the file + defaults: {b!r})"
                                                                 for k, (a, b) in diff.items())


def test_named_files_layer_in_order_and_config_values_on_top(tmp_path, hf_cache):
    """``--configfile config.yaml mine.yaml`` (the documented way to layer on the demo) merges the two in
    order; ``--config`` goes over the named files and nothing else."""
    wd = paper_workdir(tmp_path)
    mine = tmp_path / "mine.yaml"
    mine.write_text("sae: {k: 8}\n")
    effective = load_workflow_config(wd, configfiles=[REPO / "config.yaml", mine])
    assert leaked(effective, with_schema_defaults(REPO / "config.yaml", mine)) == {}
    effective = load_workflow_config(wd, configfiles=[PAPER], config_args=["sae={k: 64}"])
    expected = with_schema_defaults(PAPER)
    expected["sae"]["k"] = 64
    assert leaked(effective, expected) == {}


def test_effective_config_is_written_beside_the_results(tmp_path, hf_cache):
    from mmsae.workflow.config_load import EFFECTIVE_CONFIG_NAME
    from mmsae.workflow.run_name import run_dir

    wd = paper_workdir(tmp_path)
    effective = load_workflow_config(wd, configfiles=[PAPER])
    EFFECTIVE_CONFIG = f"{run_dir(effective)}/{EFFECTIVE_CONFIG_NAME}"  # in the paper run's own folder
    text = (wd / EFFECTIVE_CONFIG).read_text()
    assert yaml.safe_load(text) == effective
    header = text.splitlines()[0]
    assert "config/llava-next-8b.yaml" in header and "config.yaml +" not in header
    mtime = (wd / EFFECTIVE_CONFIG).stat().st_mtime_ns
    load_workflow_config(wd, configfiles=[PAPER])  # the same config: the file is left as it is
    assert (wd / EFFECTIVE_CONFIG).stat().st_mtime_ns == mtime
    demo = load_workflow_config(wd)  # the demo run: its own folder, the paper run's file stays
    assert yaml.safe_load((wd / run_dir(demo) / EFFECTIVE_CONFIG_NAME).read_text())["model"]["source"] == "demo"
    assert (wd / EFFECTIVE_CONFIG).stat().st_mtime_ns == mtime


# ---- --config values typed by the schema ---------------------------------------------------------

def test_config_value_from_the_command_line_is_typed(tmp_path):
    """``--config 'sae={k: 64}'`` arrives from Snakemake's parser as the string "64"; it loads as int 64."""
    from snakemake.cli import parse_config

    assert parse_config(["sae={k: 64}"]) == {"sae": {"k": "64"}}  # what Snakemake itself hands over
    wd = tmp_path / "run"
    wd.mkdir()
    shutil.copy2(REPO / "config.yaml", wd / "config.yaml")
    effective = load_workflow_config(wd, config_args=["sae={k: 64}"])
    assert effective["sae"]["k"] == 64 and type(effective["sae"]["k"]) is int
    expected = with_schema_defaults(REPO / "config.yaml")
    expected["sae"]["k"] = 64
    assert leaked(effective, expected) == {}


def test_config_value_of_the_wrong_type_names_key_and_type(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    shutil.copy2(REPO / "config.yaml", wd / "config.yaml")
    with pytest.raises(Exception) as info:
        load_workflow_config(wd, config_args=["sae={k: abc}"])
    text = str(info.value) + str(info.value.__cause__ or "") + "".join(map(str, getattr(info.value, "args", ())))
    assert "sae.k" in text and "integer" in text and "config.yaml + --config sae" in text
    assert not (wd / "results").exists()


def test_coerce_to_schema_walks_objects_lists_refs_and_alternatives():
    from mmsae.workflow.config_load import coerce_to_schema, load_schema

    schema = load_schema(REPO / "config/schema.yaml")
    cfg = {"sae": {"k": "64", "lr": "1e-4", "k_aux": "null", "exclude_special_tokens": "false", "name": "7"},
           "extract": {"token_fraction": "0.1"},
           "steer": {"values": ["1", "2.5"], "prompts": [{"prompt": "12"}]},
           "features": {"select": {"ids": ["3", "4"]}},
           "corpus": {"train": {"max_images": "2", "text_source": {"name": "python-topics", "max_tokens": "500"}}}}
    assert coerce_to_schema(cfg, schema) == []
    assert cfg["sae"] == {"k": 64, "lr": 1e-4, "k_aux": None, "exclude_special_tokens": False, "name": "7"}
    assert cfg["extract"]["token_fraction"] == 0.1 and cfg["steer"]["values"] == [1, 2.5]
    assert cfg["steer"]["prompts"] == [{"prompt": "12"}] and cfg["features"]["select"]["ids"] == [3, 4]
    assert cfg["corpus"]["train"]["max_images"] == 2 and cfg["corpus"]["train"]["text_source"]["max_tokens"] == 500
    bad = {"sae": {"k": "abc", "lr": "fast"}, "explain": {"enabled": "maybe"}, "steer": {"values": ["x"]}}
    assert coerce_to_schema(bad, schema) == ["sae.k='abc': expected integer", "sae.lr='fast': expected number or null",
                                             "explain.enabled='maybe': expected boolean",
                                             "steer.values[0]='x': expected number"]


# ---- evaluate.require_models ---------------------------------------------------------------------

def test_require_models_stops_the_load_naming_every_missing_model(tmp_path, monkeypatch):
    wd = paper_workdir(tmp_path)
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    with pytest.raises(Exception) as info:
        load_workflow_config(wd, configfiles=[PAPER])
    text = str(info.value) + str(info.value.__cause__ or "")
    for repo_id in EVAL_MODELS:
        assert f"huggingface-cli download {repo_id}" in text and f"hf download {repo_id}" in text
    assert "evaluate.require_models" in text and "config/llava-next-8b.yaml" in text
    # the demo config does not require them
    assert load_workflow_config(wd)["evaluate"]["require_models"] is False


def test_missing_models_reads_only_the_local_cache(tmp_path):
    from mmsae.workflow.config_load import missing_models

    cfg = with_schema_defaults(PAPER)
    assert missing_models(cfg, tmp_path / "none") == list(EVAL_MODELS)
    cache = fake_hf_cache(tmp_path / "hub", EVAL_MODELS[:2])
    fake_hf_cache(cache, EVAL_MODELS[2:], files=("config.json",))  # a config without weights is not a model
    assert missing_models(cfg, cache) == [EVAL_MODELS[2]]
    fake_hf_cache(cache, EVAL_MODELS[2:], files=("pytorch_model.bin",))
    assert missing_models(cfg, cache) == []
    local = tmp_path / "my-clip"
    local.mkdir()
    assert missing_models({"evaluate": {**cfg["evaluate"], "clip": str(local)}}, tmp_path / "none") == list(EVAL_MODELS[:2])


# ---- #33.3 a path with a source that takes none; #33.4 messages name the files ------------------

def test_a_path_with_skimage_is_an_error_at_load(tmp_path):
    from mmsae.workflow.config_check import corpus_errors

    errors = corpus_errors({"source": "skimage", "path": "/somewhere"}, "corpus.train")
    assert len(errors) == 1 and "corpus.train.path='/somewhere'" in errors[0] and "'skimage'" in errors[0]
    errors = corpus_errors({"source": "skimage", "text_source": {"name": "python-topics", "path": "t.txt"}}, "corpus.interpret")
    assert len(errors) == 1 and "corpus.interpret.text_source.path='t.txt'" in errors[0] and "python-topics" in errors[0]
    wd = tmp_path / "run"
    wd.mkdir()
    shutil.copy2(REPO / "config.yaml", wd / "config.yaml")
    with pytest.raises(Exception) as info:
        load_workflow_config(wd, config_args=["corpus={train: {path: /somewhere}}"])
    assert "corpus.train.path='/somewhere'" in str(info.value) + str(info.value.__cause__ or "")


def test_config_errors_name_the_merged_files(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    shutil.copy2(REPO / "config.yaml", wd / "config.yaml")
    overlay = tmp_path / "big-k.yaml"
    overlay.write_text("sae: {k: 4096, d_sae: 64}\n")
    with pytest.raises(Exception) as info:
        load_workflow_config(wd, configfiles=[overlay])
    text = str(info.value) + str(info.value.__cause__ or "")
    assert "sae.k=4096" in text and str(overlay) in text and "config.yaml:" not in text
    overlay.write_text("sae: {k: 0}\n")  # refused by the schema: the message names the file too
    with pytest.raises(Exception) as info:
        load_workflow_config(wd, configfiles=[overlay])
    assert str(overlay) in str(info.value) + str(info.value.__cause__ or "")


def test_config_value_and_overlay_file_give_the_same_params(tmp_path):
    """``--config 'sae={k: 64}'`` and an overlay file with ``sae: {k: 64}`` give every job the same
    params (so they rerun the same rules: those whose params include sae.k, and what follows)."""
    from snakemake.api import SnakemakeApi
    from snakemake.cli import parse_config
    from snakemake.settings.types import (ConfigSettings, DAGSettings, OutputSettings, Quietness, ResourceSettings,
                                          StorageSettings)

    wd = tmp_path / "run"
    wd.mkdir()
    shutil.copy2(REPO / "config.yaml", wd / "config.yaml")
    overlay = tmp_path / "k64.yaml"
    overlay.write_text("sae: {k: 64}\n")

    def params(configfiles=(), config_args=()):
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                              config_settings=ConfigSettings(config=parse_config(list(config_args)),
                                                             configfiles=[Path(f) for f in configfiles]),
                              storage_settings=StorageSettings(), snakefile=REPO / "Snakefile", workdir=wd)
            wf.dag(DAGSettings()).execute_workflow(executor="dryrun")
            # (without the code hash `script`: other modules may be edited between the three DAGs; the run
            # folder's name, which k changes, is masked in path params such as the explanation cache)
            return {j.rule.name: re.sub(r"results/runs/[^/'\"]+", "results/runs/<run>",
                                        repr(sorted((k, v) for k, v in j.params.items() if k != "script")))
                    for j in wf._workflow.dag.jobs}

    by_value, by_file, demo = params(config_args=["sae={k: 64}"]), params([REPO / "config.yaml", overlay]), params()
    assert by_value == by_file
    assert {r for r in demo if demo[r] != by_value[r]} == {"train_sae"}  # the only rule with sae.k among its params
    # config.yaml's own value on the command line changes no params (Snakemake compares their repr, key order included)
    assert params(config_args=["sae={k: 16}"]) == demo

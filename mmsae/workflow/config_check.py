"""Checks of a validated run configuration that JSON Schema cannot express: cross-field rules,
paths that must exist, and the hook point against the model's own ``config.json``. Run when the
Snakefile loads, so a bad config stops before any job (the schema itself is checked by Snakemake's
``validate`` just before)."""

from __future__ import annotations

import copy
import glob
import json
import os
import re
from pathlib import Path

CORPUS_ROLES = ("train", "interpret")
DEMO_TEXT_LAYERS = 30  # the demo's language model is SmolLM2-135M-Instruct: 30 decoder layers
LAYER_RE = re.compile(r"(?:^|\.)language_model\.(?:model\.)?layers\.(\d+)$")


def normalise_corpus(config: dict) -> str | None:
    """Turn a single (legacy) ``corpus`` section into the two roles, in place.

    A config whose ``corpus`` has role keys directly (``source``, ``names``, ``path``, ``prompts``...),
    as configs had before the two corpora, gets that section as both ``corpus.train`` and
    ``corpus.interpret``: the whole section replaces both roles (a ``--configfile`` merges over
    config.yaml's two roles, whose keys must not leak into the legacy corpus). Run before the schema
    is validated (so the schema's defaults then fill both roles).

    Returns:
        A one-line note saying what was done and what to change, or None when ``corpus`` already has
        only the roles (nothing is changed).
    """
    corpus = config.get("corpus")
    if not isinstance(corpus, dict):
        return None
    legacy = {k: v for k, v in corpus.items() if k not in CORPUS_ROLES}
    if not legacy:
        return None
    config["corpus"] = {role: copy.deepcopy(legacy) for role in CORPUS_ROLES}
    return (f"config: the single corpus section (keys {', '.join(sorted(legacy))}) is used for both corpus.train and "
            "corpus.interpret; write it as corpus: {train: {...}, interpret: {...}} to give each role its own corpus")


def config_errors(config: dict, base_dir: str | os.PathLike = ".") -> list[str]:
    """Every problem found in ``config`` (empty when there is none), each naming its field and value.

    Args:
        config: the run configuration with the schema's defaults filled in.
        base_dir: relative paths (``corpus.<role>.path``, ``corpus.<role>.text_source.path``, a local ``model.source``) are resolved against it.
    """
    errors = []
    sae = config["sae"]
    if sae["k"] > sae["d_sae"]:
        errors.append(f"sae.k={sae['k']} is larger than sae.d_sae={sae['d_sae']}")
    if sae.get("k_aux") is not None and sae["k_aux"] > sae["d_sae"]:
        errors.append(f"sae.k_aux={sae['k_aux']} is larger than sae.d_sae={sae['d_sae']}")
    prefixes = [m for m in sae.get("matryoshka_prefixes") or [] if m != sae["d_sae"]]  # mmsae.sae.batchtopk.matryoshka_prefixes
    if any(m >= sae["d_sae"] for m in prefixes) or any(a >= b for a, b in zip(prefixes, prefixes[1:])):
        errors.append(f"sae.matryoshka_prefixes={sae['matryoshka_prefixes']} must be strictly increasing lengths below "
                      f"sae.d_sae={sae['d_sae']}")
    if sae.get("source") == "online" and sae.get("gpus", 1) > 1:
        errors.append(f"sae.source='online' trains in one process: set sae.gpus to 1 (is {sae['gpus']})")
    for role in CORPUS_ROLES:
        errors += corpus_errors(config["corpus"][role], f"corpus.{role}", base_dir)
    explain = config.get("explain", {})
    if explain.get("enabled") and explain.get("server") == "remote" and not explain.get("base_url"):
        errors.append("explain.base_url is required when explain.server is 'remote'")
    scorer = (config.get("scoring") or {}).get("scorer") or {}
    if (explain.get("enabled") and (config.get("scoring") or {}).get("enabled") and
            (scorer.get("server") or explain.get("server")) == "remote" and not (scorer.get("base_url") or explain.get("base_url"))):
        errors.append("scoring.scorer.base_url (or explain.base_url) is required when the scorer's server is 'remote'")
    sel = config.get("features", {}).get("select", {})
    if sel.get("mode") == "list" and not sel.get("ids"):
        errors.append("features.select.ids is empty but features.select.mode is 'list'")
    errors += hook_point_errors(config["model"], base_dir)
    return errors


def corpus_errors(corpus: dict, name: str, base_dir: str | os.PathLike = ".") -> list[str]:
    """A folder or table corpus needs a ``path`` that exists, and so does a ``text_source`` file; a source
    that takes no path (``skimage``, text source ``python-topics``) must not be given one (it would be
    ignored in silence). Messages name the field as ``{name}.path`` / ``{name}.text_source.path``."""
    return _image_source_errors(corpus, name, base_dir) + _text_source_errors(corpus.get("text_source") or {}, name, base_dir)


def _text_source_errors(text_source: dict, name: str, base_dir) -> list[str]:
    if text_source.get("name") != "file":
        if text_source.get("path"):  # python-topics reads CPython's own help text: a path would be ignored
            return [f"{name}.text_source.path={text_source['path']!r} is set but {name}.text_source.name is "
                    f"{text_source['name']!r}, which takes no path: set {name}.text_source.name to 'file' or remove the path"]
        return []
    if not text_source.get("path"):
        return [f"{name}.text_source.path is required when {name}.text_source.name is 'file'"]
    if not Path(base_dir, text_source["path"]).is_file():
        return [f"{name}.text_source.path={text_source['path']!r}: no such file"]
    return []


def _image_source_errors(corpus: dict, name: str, base_dir) -> list[str]:
    if corpus["source"] not in ("folder", "table"):
        if corpus.get("path"):  # skimage reads the photos inside scikit-image's wheel: a path would be ignored
            return [f"{name}.path={corpus['path']!r} is set but {name}.source is {corpus['source']!r}, which takes "
                    f"no path: set {name}.source to 'folder' or 'table', or remove {name}.path"]
        return []
    if not corpus.get("path"):
        return [f"{name}.path is required when {name}.source is {corpus['source']!r}"]
    p = Path(base_dir, corpus["path"])
    if corpus["source"] == "folder" and not p.is_dir():
        return [f"{name}.path={corpus['path']!r}: no such folder ({name}.source is 'folder')"]
    if corpus["source"] == "table" and not (p.is_file() or p.is_dir() or glob.glob(str(p))):  # mmsae.data.tables.table_files
        return [f"{name}.path={corpus['path']!r}: no such file, directory or glob match ({name}.source is 'table')"]
    return []


def model_config(source: str, base_dir: str | os.PathLike = ".") -> dict | None:
    """The ``config.json`` of a local model directory or of a hub id in the local Hugging Face cache;
    None when neither is on this machine (the check is then left to the extraction job)."""
    local = Path(base_dir, source)
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text())
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub")
    snaps = sorted((hub / f"models--{source.replace('/', '--')}" / "snapshots").glob("*/config.json"))
    return json.loads(snaps[-1].read_text()) if snaps else None


def hook_point_errors(model: dict, base_dir: str | os.PathLike = ".") -> list[str]:
    """A ``...language_model.layers.N`` hook point must name one of the language model's layers."""
    m = LAYER_RE.search(model["hook_point"])
    if not m:
        return []
    if model["source"] == "demo":
        n_layers = DEMO_TEXT_LAYERS
    else:
        cfg = model_config(model["source"], base_dir)
        if cfg is None:
            return []
        text = cfg.get("text_config") or cfg
        n_layers = text.get("num_hidden_layers")
        if n_layers is None:
            return []
    if int(m.group(1)) >= n_layers:
        return [f"model.hook_point={model['hook_point']!r}: the language model of {model['source']!r} has "
                f"{n_layers} layers (0..{n_layers - 1})"]
    return []

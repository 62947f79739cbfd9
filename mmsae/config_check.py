"""Checks of a validated run configuration that JSON Schema cannot express: cross-field rules,
paths that must exist, and the hook point against the model's own ``config.json``. Run when the
Snakefile loads, so a bad config stops before any job (the schema itself is checked by Snakemake's
``validate`` just before)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

DEMO_TEXT_LAYERS = 30  # the demo's language model is SmolLM2-135M-Instruct: 30 decoder layers
LAYER_RE = re.compile(r"(?:^|\.)language_model\.(?:model\.)?layers\.(\d+)$")


def config_errors(config: dict, base_dir: str | os.PathLike = ".") -> list[str]:
    """Every problem found in ``config`` (empty when there is none), each naming its field and value.

    Args:
        config: the run configuration with the schema's defaults filled in.
        base_dir: relative paths (``corpus.path``, a local ``model.source``) are resolved against it.
    """
    errors = []
    sae, corpus = config["sae"], config["corpus"]
    if sae["k"] > sae["d_sae"]:
        errors.append(f"sae.k={sae['k']} is larger than sae.d_sae={sae['d_sae']}")
    if sae.get("k_aux") is not None and sae["k_aux"] > sae["d_sae"]:
        errors.append(f"sae.k_aux={sae['k_aux']} is larger than sae.d_sae={sae['d_sae']}")
    if sae.get("source") == "online" and sae.get("gpus", 1) > 1:
        errors.append(f"sae.source='online' trains in one process: set sae.gpus to 1 (is {sae['gpus']})")
    if corpus["source"] in ("folder", "table"):
        if not corpus.get("path"):
            errors.append(f"corpus.path is required when corpus.source is {corpus['source']!r}")
        else:
            p = Path(base_dir, corpus["path"])
            if corpus["source"] == "folder" and not p.is_dir():
                errors.append(f"corpus.path={corpus['path']!r}: no such folder (corpus.source is 'folder')")
            if corpus["source"] == "table" and not p.is_file():
                errors.append(f"corpus.path={corpus['path']!r}: no such file (corpus.source is 'table')")
    explain = config.get("explain", {})
    if explain.get("enabled") and explain.get("server") == "remote" and not explain.get("base_url"):
        errors.append("explain.base_url is required when explain.server is 'remote'")
    sel = config.get("features", {}).get("select", {})
    if sel.get("mode") == "list" and not sel.get("ids"):
        errors.append("features.select.ids is empty but features.select.mode is 'list'")
    errors += hook_point_errors(config["model"], base_dir)
    return errors


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

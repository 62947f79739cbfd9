"""Which folder a run's SAE-dependent results go to: ``results/runs/<run_name>/``.

The model, the corpora and the activations do not depend on the SAE, so they stay shared under
``results/`` (``models/``, ``corpus/``, ``activations/``, ``neurons/``). Everything that does — the SAE
itself, its codes, features, explanations, evaluation, steering, attribution, exports, the report and
those rules' logs — goes under one folder per SAE, so training a second SAE (``sae.k`` 32 then 64)
over the same activations keeps both interpretations instead of overwriting the first.

Used only by the Snakefile (no job imports it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping

RUNS_ROOT = "results/runs"
# sae keys that change how training runs, not the SAE it produces (train_sae's params leave them out too)
SAE_KEYS_NOT_IN_RESULT = ("name", "gpus", "checkpoint_every")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def sae_settings(config: Mapping) -> dict:
    """The ``sae`` section without :data:`SAE_KEYS_NOT_IN_RESULT`: what the trained SAE depends on
    besides its activations (``train_sae``'s ``sae`` param)."""
    return {k: v for k, v in config["sae"].items() if k not in SAE_KEYS_NOT_IN_RESULT}


def run_name(config: Mapping) -> str:
    """The run's folder name under :data:`RUNS_ROOT`.

    ``config["run_name"]`` when set; otherwise ``<sae.name>-k<sae.k>-<8 hex>``, the hex digits a
    SHA-256 of the SAE's settings (:func:`sae_settings`) with ``model.source`` and ``model.hook_point``
    (canonical JSON). So two configs that train different SAEs (any ``sae`` key, another model or
    layer) get different folders, and settings downstream of the SAE (features, explain, evaluate, ...)
    rerun inside the same folder. A release that adds an ``sae`` key with a default renames the
    default folder once (the old one is left as it was).

    Args:
        config: the validated configuration (schema defaults filled in).

    Raises:
        ValueError: an explicit ``run_name`` that is not a plain folder name (:data:`NAME_PATTERN`).
    """
    explicit = config.get("run_name")
    if explicit:
        if not re.match(NAME_PATTERN, str(explicit)):
            raise ValueError(f"run_name {explicit!r}: use letters, digits, '.', '_' and '-' (one folder name, "
                             "not a path)")
        return str(explicit)
    identity = {"sae": sae_settings(config), "model": config["model"]["source"],
                "hook_point": config["model"]["hook_point"]}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{config['sae']['name']}-k{config['sae']['k']}-{digest}"


def run_dir(config: Mapping) -> str:
    """``results/runs/<run_name>`` (relative to the working directory)."""
    return f"{RUNS_ROOT}/{run_name(config)}"

"""How the Snakefile turns the files and values a command names into the run configuration.

- Which files: ``config.yaml`` (the demo run) when the command names no ``--configfile``; otherwise
  only the named files (merged in order by Snakemake) and ``--config`` values, so no demo value leaks
  into, e.g., ``config/llava-next-8b.yaml``'s run. :func:`describe_sources` names them for messages.
- Types: ``--config 'sae={k: 64}'`` reaches the workflow as the string ``"64"`` (Snakemake parses
  nested values with YAML's base loader); :func:`coerce_to_schema` types such strings by the schema
  before it is validated.
- Models: :func:`missing_models` lists the evaluation's models (GroundingDINO, SAM, CLIP) that the
  local Hugging Face cache lacks, for ``evaluate.require_models``.
- :func:`write_effective_config`: the configuration a run got, beside its results.

Used only by the Snakefile (no job imports it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from mmsae.core.io import atomic_path

EFFECTIVE_CONFIG_NAME = "config.effective.yaml"  # in the run folder, results/runs/<run_name>/
NULL_STRINGS = ("null", "Null", "NULL", "~", "")
# a model folder in the hub cache is usable when it has its config and one weights file
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def describe_sources(configfiles: Iterable[str | os.PathLike], cli_config: Mapping | None = None,
                     cwd: str | os.PathLike | None = None) -> str:
    """One phrase naming where a configuration came from, for messages and the effective config's header.

    Args:
        configfiles: the files merged, in order (Snakemake's ``workflow.configfiles``); shown relative
            to ``cwd`` (default: the working directory) when inside it.
        cli_config: the ``--config`` values (``workflow.config_settings.config``); their top-level keys are named.

    Returns:
        e.g. ``"config/llava-next-8b.yaml + --config sae"``; ``"no config file"`` when there is nothing.
    """
    cwd = Path(cwd or os.getcwd()).resolve()
    parts = []
    for f in configfiles:
        p = Path(f)
        try:
            parts.append(str(p.resolve().relative_to(cwd)) if p.is_absolute() else str(p))
        except ValueError:
            parts.append(str(p))
    if cli_config:
        parts.append("--config " + ",".join(sorted(cli_config)))
    return " + ".join(parts) or "no config file"


def in_file_order(config: dict, configfile: str | os.PathLike, cli_config: Mapping | None) -> None:
    """Rebuild ``config`` in place as ``configfile`` with the ``--config`` values merged over it.

    With ``--config``, Snakemake starts from the command line's values and merges the Snakefile's
    ``configfile`` into them, so ``sae.k`` would come before the file's ``sae.name``. A rule's params
    are compared by their ``repr`` (key order included), so ``--config 'sae={k: 16}'`` (config.yaml's own
    value) would rerun training; this restores the order a file merge gives (``--configfile config.yaml
    mine.yaml``), leaving the values as they are.
    """
    if not cli_config:
        return
    from snakemake.common.configfile import load_configfile
    from snakemake.utils import update_config

    merged = load_configfile(str(configfile))
    update_config(merged, dict(cli_config))
    config.clear()
    config.update(merged)


def load_schema(path: str | os.PathLike) -> dict:
    """The run configuration's JSON Schema (config/schema.yaml) as a dict."""
    return yaml.safe_load(Path(path).read_text())


def _types(schema: dict) -> list[str]:
    t = schema.get("type", [])
    return t if isinstance(t, list) else [t]


def _resolve(schema: dict, root: dict) -> dict:
    """Follow a local ``$ref: "#/$defs/..."``; the referring node's own keys (default, description) win."""
    while "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def _parse_scalar(text: str, types: list[str]):
    """``text`` as the first of ``types`` (null, boolean, integer, number) it parses as; raises ValueError."""
    for t in ("null", "boolean", "integer", "number"):
        if t not in types:
            continue
        if t == "null" and text in NULL_STRINGS:
            return None
        if t == "boolean":
            value = yaml.safe_load(text) if text.strip() else None  # YAML's true/false/yes/no/on/off
            if isinstance(value, bool):
                return value
        if t == "integer":
            try:
                return int(text)
            except ValueError:
                pass
        if t == "number":
            try:
                return int(text) if text.strip().lstrip("+-").isdigit() else float(text)
            except ValueError:
                pass
    raise ValueError(text)


def coerce_to_schema(config: dict, schema: dict) -> list[str]:
    """Type string values that the schema wants as integer, number, boolean or null, in place.

    Snakemake's ``--config`` parses a nested value with YAML's base loader, so ``--config 'sae={k: 64}'``
    gives ``{"sae": {"k": "64"}}``; Snakemake's ``validate`` would then refuse ``"64"``. Each string
    at a key whose schema type does not include ``string`` is parsed as the schema's type (``null`` and
    ``~`` as null; YAML's booleans; integers; numbers). Objects (``properties``, a ``$ref``, an
    ``if``/``then`` object), arrays (``items``) and ``anyOf`` alternatives are walked; keys the schema does
    not know are left for the validation to refuse.

    Returns:
        One message per string that does not parse as its key's type, naming the dotted key path, the
        value and the expected type(s), e.g. ``sae.k='abc': expected integer``; empty when all are fine.
    """
    errors: list[str] = []

    def walk(value, node: dict, path: str):
        node = _resolve(node, schema)
        if isinstance(value, str):
            alternatives = [_resolve(a, schema) for a in node.get("anyOf", node.get("oneOf", []))] or [node]
            types = [t for a in alternatives for t in _types(a)]
            wanted = [t for t in ("null", "boolean", "integer", "number") if t in types]
            if "string" in types or not wanted:
                return value
            try:
                return _parse_scalar(value, wanted)
            except ValueError:
                errors.append(f"{path}={value!r}: expected {' or '.join(w for w in wanted if w != 'null')}"
                              + (" or null" if "null" in wanted else ""))
                return value
        if isinstance(value, dict):
            props = dict(node.get("properties", {}))
            if "then" in node:  # text_source: the object's keys are in if/then
                props.update(_resolve(node["then"], schema).get("properties", {}))
            for alt in node.get("anyOf", node.get("oneOf", [])):
                props.update(_resolve(alt, schema).get("properties", {}))
            for key in list(value):
                if key in props:
                    value[key] = walk(value[key], props[key], f"{path}.{key}" if path else key)
            return value
        if isinstance(value, list) and isinstance(node.get("items"), dict):
            return [walk(v, node["items"], f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    walk(config, schema, "")
    return errors


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it (HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub), read from the environment at each call."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache/huggingface") / "hub"


def evaluation_models(config: dict) -> list[tuple[str, tuple[str, ...]]]:
    """(hub id, weight file names) of each model the ``evaluate`` rule loads from the hub cache:
    ``evaluate.detector`` and ``evaluate.segmenter`` (mmsae.evaluate.backends.GroundedSegmenter) and
    ``evaluate.clip`` (ClipScorer; with ``clip_backend: open_clip`` only an ``hf-hub:<id>`` name is a hub
    id, other open_clip names are open_clip's own and not checked)."""
    ev = config["evaluate"]
    models = [(ev["detector"], WEIGHT_FILES), (ev["segmenter"], WEIGHT_FILES)]
    if ev.get("clip_backend", "transformers") == "transformers":
        models.append((ev["clip"], WEIGHT_FILES))
    elif ev["clip"].startswith("hf-hub:"):
        models.append((ev["clip"].removeprefix("hf-hub:"), OPEN_CLIP_WEIGHT_FILES))
    return models


def missing_models(config: dict, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The hub ids of :func:`evaluation_models` missing from the local cache (no network): a model is
    present when its ``main`` snapshot holds a ``config.json`` (not needed for open_clip) and one of its
    weight files (huggingface_hub's ``try_to_load_from_cache``). A local directory counts as present."""
    from huggingface_hub import try_to_load_from_cache

    cache = str(cache_dir or hub_cache_dir())
    missing = []
    for repo_id, weights in evaluation_models(config):
        if Path(repo_id).is_dir():
            continue

        def cached(name: str) -> bool:
            try:
                return isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache), str)
            except ValueError:  # not a valid repo id: it cannot be in the cache either
                return False

        has_config = weights is OPEN_CLIP_WEIGHT_FILES or cached("config.json")
        if not (has_config and any(cached(w) for w in weights)) and repo_id not in missing:
            missing.append(repo_id)
    return missing


def missing_models_message(missing: list[str], cache_dir: str | os.PathLike | None = None) -> str:
    """The load-time error for ``evaluate.require_models``: each missing id and how to download it."""
    cache = cache_dir or hub_cache_dir()
    lines = [f"evaluate.require_models is true but {len(missing)} model(s) of the evaluation (Table 1) are not "
             f"in the Hugging Face cache {cache}:"]
    lines += [f"  {m}: download it with  huggingface-cli download {m}   (or: hf download {m})" for m in missing]
    lines.append("or set evaluate.require_models: false to run with the missing scores left empty")
    return "\n".join(lines)


def _plain(obj: Any):
    """Snakemake's config values as plain YAML types (its Namedlists/Maps as dicts and lists)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def effective_config_text(config: Mapping, sources: str, schema: dict | None = None) -> str:
    """The YAML text of :func:`write_effective_config`: a two-line header naming the sources, then the
    configuration, its sections in the schema's order when ``schema`` is given (else the config's)."""
    plain = _plain(config)
    if schema:
        order = list(schema.get("properties", {}))
        plain = dict(sorted(plain.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    return (f"# The run configuration this workflow used: {sources}, with config/schema.yaml's defaults filled in.\n"
            "# Written by the Snakefile when it loads (mmsae.workflow.config_load).\n"
            + yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, width=120))


def write_effective_config(dest: str | os.PathLike, config: Mapping, sources: str, schema: dict | None = None) -> bool:
    """Write :func:`effective_config_text` to ``dest`` atomically, unless it already holds the same text
    (so its modification time changes only with the configuration or its sources).

    Returns:
        True when the file was (re)written.
    """
    text = effective_config_text(config, sources, schema)
    dest = Path(dest)
    if dest.is_file() and dest.read_text() == text:
        return False
    with atomic_path(dest, ".yaml") as tmp:
        tmp.write_text(text)
    return True


def check_config(config: dict, schema_path: str | os.PathLike, sources: str) -> dict:
    """Everything the Snakefile checks when it loads, in order: the ``--config`` values typed by the
    schema (:func:`coerce_to_schema`), Snakemake's schema validation (which fills the defaults), the
    checks the schema cannot express (:func:`mmsae.workflow.config_check.config_errors`), and, with
    ``evaluate.require_models``, the evaluation models in the local cache (:func:`missing_models`).

    Args:
        config: the merged config, changed in place (typed values, defaults).
        schema_path: ``config/schema.yaml``; sources: :func:`describe_sources`, named in every error.

    Returns:
        The parsed schema.

    Raises:
        ValueError: the first failing step, prefixed with ``config (<sources>)``.
    """
    from snakemake.utils import validate

    from mmsae.workflow.config_check import config_errors

    schema = load_schema(schema_path)
    errors = coerce_to_schema(config, schema)  # --config 'sae={k: abc}': typed before validation
    if not errors:
        try:
            validate(config, str(schema_path))
        except Exception as e:
            raise ValueError(f"config ({sources}) does not match config/schema.yaml: {e}") from e
        errors = config_errors(config)
    ev = config["evaluate"] if not errors else {}
    if ev.get("require_models") and ev.get("enabled") and config["explain"]["enabled"]:
        missing = missing_models(config)
        errors = [missing_models_message(missing)] if missing else []
    if errors:
        raise ValueError(f"config ({sources}): {'; '.join(errors)}")
    return schema

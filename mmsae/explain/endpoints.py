"""Which endpoint each model-calling rule talks to, resolved from the config: the explainer's
(``explain``), the refiner's (``evaluate.refiner``, inheriting the explainer's), the categorizer's
(``evaluate.categorizer``, inheriting the refiner's) and the scorer's (``scoring.scorer``, inheriting
the explainer's). Each is what the rule's answers depend on, so it is the rule's ``endpoint`` param:
a field changed anywhere up the chain reruns exactly the rules below it.

Secrets never appear here: ``api_key_env`` (the variable's name) and the other run-time settings
(:data:`mmsae.core.job.RUNTIME_ENDPOINT_KEYS`) are read by the jobs at run time, and rerun nothing.
"""

from __future__ import annotations

ANSWER_FIELDS = ("server", "temperature", "max_tokens", "extra_body")


def explainer_local_model(config: dict, model_dir: str) -> str:
    """The local server's model directory: ``explain.local_model``, else ``model_dir`` (the subject
    model's directory or hub id)."""
    return config["explain"]["local_model"] or model_dir


def _resolve(config: dict, base: dict, overrides: dict, model_dir: str) -> dict:
    """``base`` with the set (non-None) ``overrides`` applied, ``api_key_env`` left out; then only the
    fields of its server kind: ``local_model`` for a local server (the explainer's when none is set),
    else ``base_url`` and ``model`` (the explainer's when not set)."""
    e = config["explain"]
    out = dict(base)
    out.update({k: v for k, v in overrides.items() if v is not None and k != "api_key_env"})
    if out["server"] == "local":
        out["local_model"] = out.get("local_model") or explainer_local_model(config, model_dir)
        out.pop("base_url", None), out.pop("model", None)
    else:
        out.setdefault("base_url", e["base_url"]), out.setdefault("model", e["model"])
        out.pop("local_model", None)
    return out


def explainer(config: dict, model_dir: str) -> dict:
    """The explainer's endpoint: ``explain``'s answer-changing fields and where it is served."""
    return _resolve(config, {k: config["explain"][k] for k in ANSWER_FIELDS}, {}, model_dir)


def refiner(config: dict, model_dir: str) -> dict:
    """The explainer's endpoint, with the fields ``evaluate.refiner`` sets overriding it."""
    return _resolve(config, explainer(config, model_dir), config["evaluate"]["refiner"], model_dir)


def categorizer(config: dict, model_dir: str) -> dict:
    """The refiner's endpoint, with the fields ``evaluate.categorizer`` sets overriding it."""
    return _resolve(config, refiner(config, model_dir), config["evaluate"]["categorizer"], model_dir)


def scorer(config: dict, model_dir: str) -> dict:
    """The explainer's endpoint, with the fields ``scoring.scorer`` sets overriding it."""
    return _resolve(config, explainer(config, model_dir), config["scoring"]["scorer"], model_dir)


def uses_local_model(endpoint: dict, model_dir: str) -> bool:
    """Whether ``endpoint`` is a local server of ``model_dir`` (then the rule declares it as an input)."""
    return endpoint["server"] == "local" and endpoint.get("local_model") == model_dir

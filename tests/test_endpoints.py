"""mmsae.explain.endpoints: the inheritance explain -> refiner -> categorizer and explain -> scorer
that the rules' ``endpoint`` params carry, checked against hand-written expectations."""

import copy

import yaml
from snakemake.utils import validate

from mmsae.explain import endpoints

BASE = yaml.safe_load(open("config.yaml"))


def _config(**over):
    cfg = copy.deepcopy(BASE)
    validate(cfg, "config/schema.yaml")  # fills the defaults
    for section, values in over.items():
        head, _, sub = section.partition("__")
        (cfg[head][sub] if sub else cfg[head]).update(values)
    validate(cfg, "config/schema.yaml")
    return cfg


def test_each_endpoint_inherits_from_the_one_above_and_never_carries_the_key():
    cfg = _config(explain={"server": "remote", "base_url": "http://e/v1", "model": "big", "api_key_env": "E_KEY"},
                  evaluate__refiner={"model": "small", "api_key_env": "R_KEY"},
                  evaluate__categorizer={"max_tokens": 7},
                  scoring__scorer={"server": "local", "local_model": "/models/scorer"})
    e = endpoints.explainer(cfg, "results/models/demo")
    r = endpoints.refiner(cfg, "results/models/demo")
    c = endpoints.categorizer(cfg, "results/models/demo")
    s = endpoints.scorer(cfg, "results/models/demo")
    assert (e["base_url"], e["model"]) == ("http://e/v1", "big")
    assert (r["base_url"], r["model"]) == ("http://e/v1", "small")  # the refiner's model, the explainer's URL
    assert (c["model"], c["max_tokens"]) == ("small", 7)  # the categorizer inherits the refiner's, not the explainer's
    assert (s["server"], s["local_model"], s["temperature"]) == ("local", "/models/scorer", cfg["explain"]["temperature"])
    assert "base_url" not in s and "model" not in s  # a local server: no remote fields inherited
    for ep in (e, r, c, s):
        assert "api_key_env" not in ep and "E_KEY" not in str(ep) and "R_KEY" not in str(ep)


def test_a_local_server_without_a_model_serves_the_subject_model():
    cfg = _config(explain={"server": "local", "local_model": None})
    e = endpoints.explainer(cfg, "results/models/demo")
    assert e["local_model"] == "results/models/demo" and "base_url" not in e and "model" not in e
    assert endpoints.uses_local_model(e, "results/models/demo")
    assert endpoints.explainer(_config(explain={"server": "local", "local_model": "/m"}), "x")["local_model"] == "/m"

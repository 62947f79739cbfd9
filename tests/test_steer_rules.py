"""Steering and attribution logic on toy layers and toy data (no subject model): the released code's
steering hook, the success rule, 'toward the feature', the hook point travelling with the SAE."""

import pytest

from mmsae.steer import sae_hook_point


def test_hook_point_comes_from_the_sae_cfg():
    cfg = {"hook_name": "model.language_model.layers.15", "metadata": {"hook_name": "model.language_model.layers.15"}}
    assert sae_hook_point(cfg, "model.language_model.layers.15", "sae/cfg.json") == "model.language_model.layers.15"
    assert sae_hook_point({"metadata": {"hook_name": "a.b"}}, "a.b", "x") == "a.b"
    with pytest.raises(ValueError, match=r"sae/cfg.json.*'model.language_model.layers.15'.*model.hook_point is 'model.language_model.layers.3'"):
        sae_hook_point(cfg, "model.language_model.layers.3", "sae/cfg.json")
    assert sae_hook_point({}, "a.b", "x") == "a.b"  # an SAE without hook_name: nothing to disagree with

"""The paper config reproduces the released trainer's effective lr schedule and AuxK (#28.6).

The released trainer (EvolvingLMMs-Lab/multimodal-sae, EleutherAI's ``sae``) computes a linear
warm-up/decay horizon in micro-batches but steps the scheduler once per optimiser step with 4
accumulation steps: the effective horizon H is 4x the optimiser steps, and the lr at step t after
warm-up is lr * (H - t) / (H - warmup). Its ``auxk_alpha`` is 0.
"""


import pytest
import yaml
from helpers import REPO

from mmsae.sae.schedule import lr_at
from mmsae.sae.trainer import TrainConfig, cfg_lr_at


def _paper_sae() -> dict:
    """The paper run's sae section as Snakemake sees it: schema defaults < config.yaml < config/llava-next-8b.yaml."""
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text())["properties"]["sae"]["properties"]
    sae = {k: v["default"] for k, v in schema.items() if "default" in v}
    sae.update(yaml.safe_load((REPO / "config.yaml").read_text()).get("sae", {}))
    sae.update(yaml.safe_load((REPO / "config/llava-next-8b.yaml").read_text()).get("sae", {}))
    for key in ("name", "gpus", "source"):  # not TrainConfig fields (the rule drops them too)
        sae.pop(key, None)
    return sae


def test_paper_lr_at_last_step_is_the_released_value():
    sae = _paper_sae()
    cfg = TrainConfig(**sae)
    steps, warmup, peak = cfg.steps, cfg.warmup_steps, cfg.learning_rate()
    horizon = 4 * steps  # the released effective horizon, computed here independently of the config
    t = steps - 1
    released = peak * (horizon - t) / (horizon - warmup)
    assert cfg_lr_at(t, cfg) == pytest.approx(released, rel=1e-12)
    assert 0.74 < cfg_lr_at(t, cfg) / peak < 0.76


def test_paper_config_has_auxk_off_as_released():
    assert _paper_sae()["aux_coef"] == 0


def test_decay_steps_horizon_against_hand_values():
    lrs = [lr_at(s, base=1.0, steps=6, warmup_steps=2, schedule="linear_decay", decay_start=0.8, decay_steps=10)
           for s in range(6)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8])


def test_decay_steps_errors_are_named():
    with pytest.raises(ValueError, match="sae.lr_decay_steps: 10 is only used by lr_schedule linear_decay"):
        lr_at(3, base=1.0, steps=10, warmup_steps=2, schedule="flat_then_decay", decay_start=0.8, decay_steps=10)
    with pytest.raises(ValueError, match="must exceed sae.warmup_steps"):
        lr_at(3, base=1.0, steps=10, warmup_steps=2, schedule="linear_decay", decay_start=0.8, decay_steps=2)

"""Learning-rate schedules against hand-computed values (base 1.0, 10 steps, 2 warm-up steps)."""

import pytest

from mmsae.sae.schedule import lr_at


def _lrs(schedule, decay_start=0.8):
    return [lr_at(s, base=1.0, steps=10, warmup_steps=2, schedule=schedule, decay_start=decay_start) for s in range(10)]


def test_linear_decay_is_the_released_schedule():
    # warm-up (s+1)/2, then (10 - s) / (10 - 2) from the end of warm-up, as get_linear_schedule_with_warmup
    assert _lrs("linear_decay") == pytest.approx([0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])


def test_flat_then_decay():
    # flat until int(0.8 * 10) = 8, then (10 - s) / (10 - 8)
    assert _lrs("flat_then_decay") == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    assert _lrs("flat_then_decay", decay_start=0.5) == pytest.approx([0.5, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2])


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="sae.lr_schedule: 'cosine'"):
        lr_at(3, base=1.0, steps=10, warmup_steps=2, schedule="cosine", decay_start=0.8)

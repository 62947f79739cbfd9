"""Learning-rate schedules for SAE training (``sae.lr_schedule``).

Both start with a linear warm-up, ``lr = base * (step + 1) / warmup_steps`` for ``step <
warmup_steps`` (0-based steps, so the first step trains at ``base / warmup_steps`` rather than 0;
transformers' ``get_linear_schedule_with_warmup`` uses ``step / warmup_steps``), then:

- ``linear_decay`` - the released code's schedule (EvolvingLMMs-Lab/multimodal-sae,
  ``train/sae/sae/trainer.py``: ``get_linear_schedule_with_warmup(optimizer, lr_warmup_steps,
  num_examples // batch_size)``): linear decay from the end of warm-up to 0 at ``steps``,
  ``lr = base * (steps - step) / (steps - warmup_steps)``.
- ``flat_then_decay`` - constant ``base`` until ``decay_start * steps``, then linear decay to 0 at
  ``steps``, ``lr = base * (steps - step) / (steps - int(decay_start * steps))``.
"""

from __future__ import annotations

SCHEDULES = ("flat_then_decay", "linear_decay")


def lr_at(step: int, *, base: float, steps: int, warmup_steps: int, schedule: str, decay_start: float) -> float:
    """The learning rate of 0-based ``step`` (see the module docstring for the formulas).

    Args:
        step: optimiser step, 0 <= step < steps.
        base: peak learning rate.
        steps: total optimiser steps.
        warmup_steps: steps of linear warm-up.
        schedule: one of :data:`SCHEDULES`.
        decay_start: fraction of ``steps`` after which ``flat_then_decay`` decays (unused by
            ``linear_decay``).

    Raises:
        ValueError: ``schedule`` is not one of :data:`SCHEDULES`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"sae.lr_schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    start = warmup_steps if schedule == "linear_decay" else int(decay_start * steps)
    if step >= start and steps > start:
        return base * max(0.0, (steps - step) / (steps - start))
    return base

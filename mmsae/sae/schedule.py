"""Learning-rate schedules for SAE training (``sae.lr_schedule``).

Both start with a linear warm-up, ``lr = base * (step + 1) / warmup_steps`` for ``step <
warmup_steps`` (0-based steps, so the first step trains at ``base / warmup_steps`` rather than 0;
transformers' ``get_linear_schedule_with_warmup`` uses ``step / warmup_steps``), then:

- ``linear_decay`` - the released code's schedule (EvolvingLMMs-Lab/multimodal-sae,
  ``train/sae/sae/trainer.py``: ``get_linear_schedule_with_warmup(optimizer, lr_warmup_steps,
  num_examples // batch_size)``): linear decay from the end of warm-up to 0 at ``steps``,
  ``lr = base * (steps - step) / (steps - warmup_steps)``.

  ``decay_steps`` (``sae.lr_decay_steps``; None = ``steps``) sets the horizon H the decay is computed
  over: ``lr = base * (H - step) / (H - warmup_steps)``. The released trainer (EleutherAI's ``sae``
  fork) passes a horizon counted in micro-batches but steps the scheduler once per optimiser step with
  4 gradient-accumulation steps, so its effective horizon is 4x its optimiser steps and the lr at its
  last step is ~0.75x peak, not 0; ``config/llava-next-8b.yaml`` sets ``lr_decay_steps`` to 4x
  ``steps`` to reproduce that.
- ``flat_then_decay`` - constant ``base`` until ``decay_start * steps``, then linear decay to 0 at
  ``steps``, ``lr = base * (steps - step) / (steps - int(decay_start * steps))``.
"""

from __future__ import annotations

SCHEDULES = ("flat_then_decay", "linear_decay")


def lr_at(step: int, *, base: float, steps: int, warmup_steps: int, schedule: str, decay_start: float,
          decay_steps: int | None = None) -> float:
    """The learning rate of 0-based ``step`` (see the module docstring for the formulas).

    Args:
        step: optimiser step, 0 <= step < steps.
        base: peak learning rate.
        steps: total optimiser steps.
        warmup_steps: steps of linear warm-up.
        schedule: one of :data:`SCHEDULES`.
        decay_start: fraction of ``steps`` after which ``flat_then_decay`` decays (unused by
            ``linear_decay``).
        decay_steps: ``linear_decay`` only: the horizon the decay reaches 0 at (None = ``steps``).

    Raises:
        ValueError: ``schedule`` is not one of :data:`SCHEDULES`; ``decay_steps`` set with
            ``flat_then_decay`` or not above ``warmup_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"sae.lr_schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if decay_steps is not None:
        if schedule != "linear_decay":
            raise ValueError(f"sae.lr_decay_steps: {decay_steps} is only used by lr_schedule linear_decay, not {schedule!r}")
        if decay_steps <= warmup_steps:
            raise ValueError(f"sae.lr_decay_steps: {decay_steps} must exceed sae.warmup_steps ({warmup_steps})")
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    start = warmup_steps if schedule == "linear_decay" else int(decay_start * steps)
    horizon = decay_steps if decay_steps is not None else steps
    if step >= start and horizon > start:
        return base * max(0.0, (horizon - step) / (horizon - start))
    return base

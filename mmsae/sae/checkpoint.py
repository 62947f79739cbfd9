"""Training checkpoints that make a resumed run bit-identical to an uninterrupted one on CPU.

A checkpoint holds the SAE, the optimiser, the trainer's counters and log, and every random state
(torch CPU and CUDA, NumPy's and Python's global generators) plus the number of CPU threads: the
order of float reductions in torch's CPU kernels depends on the thread count, so a resumed run uses
the count of the run it resumes (with a warning when it differs from the current one). On CPU,
training runs under :func:`torch.use_deterministic_algorithms` (:func:`reproducible`): the backward
of the decoder-row gather (``W_dec[top_idx]``) otherwise accumulates in a thread-dependent order, so
two identical runs already differ in the last bit. The data stream's position is the step itself:
the stream is a deterministic function of its seed and is replayed up to that step (see
:meth:`mmsae.sae.data.ActivationStream.train_batches`).
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mmsae.core.io import atomic_path

log = logging.getLogger(__name__)


@contextmanager
def reproducible(device: torch.device) -> Iterator[None]:
    """On CPU, run the block with deterministic algorithms; afterwards restore the caller's setting and
    CPU thread count (:func:`restore_rng` may change it). On GPU, do nothing (CUDA's deterministic
    mode needs settings made before CUDA starts, and costs speed)."""
    threads = torch.get_num_threads()
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if device.type == "cpu":  # warn_only: an op without a deterministic kernel warns instead of failing training
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


def capture_rng() -> dict:
    """Every random state training may touch, and the CPU thread count."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "threads": torch.get_num_threads(),
    }


def restore_rng(state: dict, device: torch.device) -> None:
    """Restore what :func:`capture_rng` returned; on CPU also its thread count (with a warning if it
    differs from the current one)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cpu" and torch.get_num_threads() != state["threads"]:
        log.warning("resuming with %d CPU threads, as the checkpointed run (not %d), so that it stays bit-identical",
                    state["threads"], torch.get_num_threads())
        torch.set_num_threads(state["threads"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (with the random states added) to ``path`` atomically."""
    with atomic_path(path, ".pt") as tmp:
        torch.save({**state, "rng": capture_rng()}, tmp)


def load_checkpoint(path: Path, config_hash: str, device: torch.device) -> dict | None:
    """The checkpoint at ``path`` if it exists and was made with ``config_hash`` (random states restored),
    else None (a checkpoint of another config is logged and ignored)."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=False)
    if state.get("config_hash") != config_hash:
        log.info("ignoring %s: made with another config", path)
        return None
    restore_rng(state["rng"], device)
    log.info("resuming from %s at step %d", path, state["step"])
    return state

"""Helpers shared by the ``workflow_scripts/`` entry points (logging, threads)."""

from __future__ import annotations

import logging
import sys


_LEASE = None


def setup(log_path: str | None, threads: int = 1, gpus: int = 0) -> logging.Logger:
    """Log to ``log_path`` and stderr at INFO, give torch ``threads`` CPU threads, and lease ``gpus``
    devices for the rest of the process (see :mod:`mmsae.gpu`; a no-op without GPUs)."""
    global _LEASE
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True)
    try:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    except ImportError:
        pass
    if gpus and _LEASE is None:
        from mmsae.gpu import lease

        _LEASE = lease(int(gpus))
        _LEASE.__enter__()  # released when the process ends, however it ends
    return logging.getLogger("mmsae")

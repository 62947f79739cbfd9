"""Helpers shared by the ``workflow_scripts/`` entry points (logging, threads)."""

from __future__ import annotations

import logging
import sys


def setup(log_path: str | None, threads: int = 1) -> logging.Logger:
    """Log to ``log_path`` and stderr at INFO, and give torch ``threads`` CPU threads."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True)
    try:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    except ImportError:
        pass
    return logging.getLogger("mmsae")

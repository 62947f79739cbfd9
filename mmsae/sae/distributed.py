"""The few ``torch.distributed`` operations SAE training needs, as no-ops outside a process group.

With these, :func:`mmsae.sae.trainer.train` reads the same under ``torchrun`` and in one process:
gradients are averaged by :class:`~torch.nn.parallel.DistributedDataParallel` (nanoGPT's
``train.py``), the other statistics go through :func:`maybe_all_reduce` (sparsify's / the released
code's ``SaeTrainer.maybe_all_reduce``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

_OPS = ("sum", "mean", "max")


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside ``torch.distributed``."""
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if _active() else (0, 1)


def maybe_all_reduce(x: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """All-reduce ``x`` in place over the ranks (``sum``, ``mean`` or ``max``; ``max`` of 0/1 is "any")
    and return it; outside a process group, return ``x`` unchanged.

    Raises:
        ValueError: an unknown ``op``.
    """
    if op not in _OPS:
        raise ValueError(f"unknown reduction {op!r}; one of {', '.join(_OPS)}")
    if not _active():
        return x
    d = torch.distributed
    d.all_reduce(x, op=d.ReduceOp.MAX if op == "max" else d.ReduceOp.SUM)
    if op == "mean":
        x /= d.get_world_size()
    return x


def maybe_barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if _active():
        torch.distributed.barrier()


def maybe_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel (which broadcasts rank 0's parameters and averages
    gradients in ``backward``) under a process group, else ``module`` itself."""
    if not _active():
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

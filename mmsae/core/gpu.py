"""Give each GPU job its own devices: a lock-file lease over the machine's GPUs.

Snakemake's ``--resources gpu=8`` caps how many GPUs the running jobs ask for in total, but does
not say *which* device a job gets. :func:`lease` takes ``n`` free device indices by locking one
file per device in a shared directory (:func:`mmsae.core.locks.try_hold`), sets ``CUDA_VISIBLE_DEVICES`` to them, and releases them when
the block ends - also when the job fails or is killed (the kernel drops a dead process's locks).

Devices: the indices in ``CUDA_VISIBLE_DEVICES`` when it is set, else ``MMSAE_NUM_GPUS`` (set it
to simulate devices), else the GPUs the NVIDIA driver lists. No GPU: a no-op.

Under a scheduler that already assigned the job its devices (SLURM: ``SLURM_JOB_ID`` is set, or
``SLURM_JOB_GPUS``/``SLURM_STEP_GPUS`` say which GPUs it bound), no local lease is taken: two jobs on
one node that each see their own GPU as index 0 would otherwise both want ``gpu-0.lock`` and one
would wait (and after ``timeout_s`` fail) for a device it does not share. ``MMSAE_GPU_LEASE`` forces
the choice: ``1`` always leases (e.g. several jobs inside one allocation), ``0`` never does (another
scheduler that binds devices itself).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

from mmsae.core.locks import release, try_hold

log = logging.getLogger(__name__)


def visible_devices() -> list[str]:
    """The device ids jobs may lease (strings, as CUDA_VISIBLE_DEVICES holds them)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None and env.strip():
        return [d.strip() for d in env.split(",") if d.strip()]
    if os.environ.get("MMSAE_NUM_GPUS"):
        return [str(i) for i in range(int(os.environ["MMSAE_NUM_GPUS"]))]
    proc = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(proc.iterdir())))] if proc.is_dir() else []


SCHEDULER_VARS = ("SLURM_JOB_ID", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


def scheduler_assigned() -> str | None:
    """Why the devices are the scheduler's to assign (a short reason), or None when a local lease is needed.

    ``MMSAE_GPU_LEASE=1`` -> None (lease anyway); ``MMSAE_GPU_LEASE=0`` -> a reason (never lease);
    otherwise the first of :data:`SCHEDULER_VARS` that is set.

    Raises:
        ValueError: ``MMSAE_GPU_LEASE`` is set to something other than 0 or 1.
    """
    force = os.environ.get("MMSAE_GPU_LEASE", "").strip()
    if force not in ("", "0", "1"):
        raise ValueError(f"MMSAE_GPU_LEASE={force!r}: use 1 (always take a local GPU lease) or 0 (never)")
    if force:
        return None if force == "1" else "MMSAE_GPU_LEASE=0"
    for var in SCHEDULER_VARS:
        if os.environ.get(var, "").strip():
            return f"{var}={os.environ[var].strip()}"
    return None


def default_lock_dir() -> Path:
    return Path(os.environ.get("MMSAE_GPU_LOCK_DIR", Path(tempfile.gettempdir(), f"mmsae-gpu-locks-{os.getuid()}")))


@contextlib.contextmanager
def lease(n: int, lock_dir: str | os.PathLike | None = None, timeout_s: float = 3600.0, poll_s: float = 0.2):
    """Hold ``n`` free devices for the block; yields their ids and sets ``CUDA_VISIBLE_DEVICES``.

    When :func:`scheduler_assigned` says the scheduler bound the job's devices, nothing is locked:
    the first ``n`` of the visible ids (the scheduler's ``CUDA_VISIBLE_DEVICES``) are yielded and
    set, and one log line says so.

    Raises:
        ValueError: more devices asked for than there are.
        TimeoutError: not enough devices became free within ``timeout_s``.
    """
    devices = visible_devices()
    if n <= 0 or not devices:
        yield []
        return
    if n > len(devices):
        raise ValueError(f"resources.gpu: {n} GPUs asked for but {len(devices)} exist ({','.join(devices)})")
    why = scheduler_assigned()
    if why is not None:
        ids, old = devices[:n], os.environ.get("CUDA_VISIBLE_DEVICES")
        log.info("no local GPU lease: the scheduler assigned this job's devices (%s); using %s", why, ",".join(ids))
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        try:
            yield ids
        finally:
            if old is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = old
        return
    lock_dir = Path(lock_dir or default_lock_dir())
    lock_dir.mkdir(parents=True, exist_ok=True)
    paths = [lock_dir / f"gpu-{dev}.lock" for dev in devices]
    held = None
    deadline = time.monotonic() + timeout_s
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        while (held := try_hold(paths, n)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {n} free GPUs among {devices} after {timeout_s:.0f}s")
            time.sleep(poll_s)
        ids = [devices[i] for i in sorted(held)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        log.info("leased GPU(s) %s", ",".join(ids))
        yield ids
    finally:
        if held is not None:
            release(held.values())
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else is returned as is."""
    if device == "auto":
        try:
            import torch
        except ImportError:  # no torch, no CUDA
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device

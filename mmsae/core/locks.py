"""Cross-process "n of these" locks: one lock file per resource, held with :mod:`filelock`.

Used for the GPU leases (:mod:`mmsae.core.gpu`, one file per device) and the endpoint's request slots
(:mod:`mmsae.explain.client`, one file per slot). On POSIX a lock is an ``flock`` on the file, so
the kernel drops it when its process dies: a killed job never leaves a resource held.
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout


def try_hold(paths: list[str | os.PathLike], n: int) -> dict[int, FileLock] | None:
    """Take ``n`` of the lock files ``paths`` without waiting, in the given order; all or nothing.

    Returns:
        ``{index into paths: held lock}`` with ``n`` entries, or None (nothing held) when fewer than
        ``n`` were free. Holding all or nothing keeps two jobs that each wait for 2 of 3 resources
        from deadlocking.
    """
    held: dict[int, FileLock] = {}
    for i, p in enumerate(paths):
        if len(held) == n:
            break
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(p, thread_local=False)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            continue
        held[i] = lock
    if len(held) < n:
        release(held.values())
        return None
    return held


def release(locks) -> None:
    """Release held locks (an iterable of :class:`filelock.FileLock`)."""
    for lock in locks:
        lock.release()

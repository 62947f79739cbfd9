"""Keep freed host memory for reuse: glibc malloc tuning for the CPU training step.

A CPU training step allocates and frees the same few large tensors every step: the encoder's
pre-activations (batch x d_sae floats), the sparse weight gradients and Adam's temporaries
((d_sae, d_model) floats each, 268 MB at 32768 x 2048). glibc serves every block over its mmap
threshold (at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when freed, so each
step first-touches gigabytes of new pages: ``torch.profiler`` shows the time in the ``fill_``/``copy_``
that zero or write those tensors first (at d_model 2048, d_sae 32768, k 64 on 2 CPU cores the
backward took 0.81 s, of it 0.29 s such first touches). PyTorch's CPU performance guide
recommends a caching allocator (jemalloc or tcmalloc through ``LD_PRELOAD``) for this; the same
effect without a preload is glibc's own ``mallopt``: serve large blocks from the heap and keep
freed memory there, so the next step reuses already-mapped pages.

The cost: the process keeps its peak heap until it exits (no trimming), which for a training process
whose step allocates the same shapes every time is its steady state anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4


def keep_freed_memory(top_pad_mb: int = 64) -> bool:
    """Make glibc malloc reuse freed large blocks instead of unmapping them (process-wide).

    Sets ``M_MMAP_MAX`` = 0 (no block is served by its own ``mmap``), ``M_TRIM_THRESHOLD`` = 2 GiB - 1
    (freed memory at the top of the heap is kept), ``M_TOP_PAD`` = ``top_pad_mb`` MiB (the heap
    grows in steps that size). Equivalent to the environment ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=... MALLOC_TOP_PAD_=...``, applied at run time. Effect measured by
    ``bench/sae_throughput.py`` (``--glibc-default`` shows the step without it).

    Args:
        top_pad_mb: heap growth step in MiB.

    Returns:
        True when applied; False (and nothing changed) on a platform without glibc's ``mallopt``
        (macOS, musl, Windows), where the step runs with the platform's allocator as before.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, top_pad_mb << 20)))
    log.info("glibc malloc: large blocks kept for reuse (mmap off, no trim): %s", "applied" if ok else "refused")
    return ok

"""PLACEHOLDER for the "extract" engineer's ``mmsae/subsample.py`` (issue #18.2), written only so that
online training (:mod:`mmsae.sae.online`) can call and test the same function; at merge, their file
replaces this one (same signature).

A token is kept when a hash of (seed, sample id, position) falls below the fraction of its group:
``answer`` for assistant-turn tokens, else its modality (``image`` / ``text``).
"""

from __future__ import annotations

import zlib

import numpy as np

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 -> uint64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def token_keep_mask(sample_id: str, token_index: np.ndarray, modality: np.ndarray, role: np.ndarray,
                    fractions: dict, seed: int) -> np.ndarray:
    """Which of one sample's tokens a ``fractions`` subsample keeps: (n,) bool, a deterministic function of
    ``(seed, sample_id, token_index)`` only.

    Args:
        token_index: (n,) int positions; modality: (n,) 'image'/'text'; role: (n,) 'user'/'assistant'.
        fractions: ``{"image"|"text"|"answer": share kept in [0, 1]}``; a missing group keeps everything.
    """
    base = np.uint64((zlib.crc32(sample_id.encode()) << 32) ^ (seed & 0xFFFFFFFF))
    with np.errstate(over="ignore"):
        h = _mix(base + np.asarray(token_index, np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    group = np.where(np.asarray(role) == "assistant", "answer", np.asarray(modality))
    frac = np.array([float(fractions.get(g, 1.0)) for g in group.tolist()], np.float64) if len(group) else np.zeros(0)
    return u < frac

"""Deterministic token subsampling (``extract.token_fraction``), numpy only.

Whether a token is kept is a function of ``(seed, sample_id, token position)`` and the fraction of
its role, and of nothing else: not the batch it was run in, not the part of the corpus, not the order
of samples, not whether the run was resumed. So a killed and resumed extraction, or one split over
any number of ``extract.parts``, writes the same rows, and online training (which calls
:func:`token_keep_mask` on the same forward passes) sees the same tokens as cached training.

The draw: ``h = blake2b(f"{seed}:{sample_id}")`` (64 bits) seeds a SplitMix64 stream, whose value at
position ``p`` is ``u = splitmix64(h + (p + 1) * 0x9E3779B97F4A7C15) mod 2^64``; the token is kept when
``u < fraction * 2^64`` (fraction 1 keeps every token, 0 none). One uniform per token, compared with
its role's fraction, so raising a fraction only adds rows.

Roles (the keys of a fractions mapping): ``image`` (modality image: image patches and image-newline
tokens), ``text`` (text tokens of the user side: prompt, chat-template tokens), ``answer`` (text
tokens of an assistant turn, column ``role == "assistant"``).
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np

ROLES = ("image", "text", "answer")
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def fractions_of(token_fraction: float | Mapping[str, float]) -> dict[str, float]:
    """``extract.token_fraction`` as ``{image, text, answer: fraction}``.

    Args:
        token_fraction: one fraction in (0, 1] for every token, or a mapping with some of the keys
            ``image``, ``text``, ``answer`` (a missing key keeps every token of that role).

    Raises:
        ValueError: an unknown role, or a fraction outside [0, 1] (the message names it).
    """
    if isinstance(token_fraction, Mapping):
        unknown = set(token_fraction) - set(ROLES)
        if unknown:
            raise ValueError(f"extract.token_fraction: unknown role(s) {sorted(unknown)}; expected some of {list(ROLES)}")
        out = {r: float(token_fraction.get(r, 1.0)) for r in ROLES}
    else:
        out = {r: float(token_fraction) for r in ROLES}
    for r, f in out.items():
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"extract.token_fraction.{r} = {f}: a fraction must lie in [0, 1]")
    return out


def is_subsampling(fractions: Mapping[str, float]) -> bool:
    """True when some role keeps less than every token (then excluded special tokens are dropped too)."""
    return any(float(fractions[r]) < 1.0 for r in ROLES)


def token_roles3(modality: np.ndarray, role: np.ndarray) -> np.ndarray:
    """(n,) role names ``image`` / ``text`` / ``answer`` from per-token modality and role strings."""
    out = np.where(np.asarray(role) == "assistant", "answer", "text").astype(object)
    out[np.asarray(modality) == "image"] = "image"
    return out.astype(str)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def token_uniforms(sample_id: str, token_index: np.ndarray, seed: int) -> np.ndarray:
    """(n,) uint64: the token's draw ``u`` (see the module docstring), uniform over [0, 2^64)."""
    h = np.uint64(int.from_bytes(hashlib.blake2b(f"{int(seed)}:{sample_id}".encode(), digest_size=8).digest(), "little"))
    pos = np.asarray(token_index, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        return _splitmix64(h + (pos + np.uint64(1)) * _GAMMA)


def token_keep_mask(sample_id: str, token_index: np.ndarray, modality: np.ndarray, role: np.ndarray,
                    fractions: Mapping[str, float], seed: int) -> np.ndarray:
    """Which tokens of one sample to keep, deterministically.

    Args:
        sample_id: the sample's stable id (:class:`mmsae.data.Sample`).
        token_index: (n,) int, the tokens' positions in the sample's sequence.
        modality: (n,) ``"image"`` / ``"text"`` per token.
        role: (n,) ``"user"`` / ``"assistant"`` per token.
        fractions: ``{image, text, answer: fraction in [0, 1]}`` (:func:`fractions_of`).
        seed: ``extract.seed``.

    Returns:
        (n,) bool; ``True`` where ``u < fraction * 2^64`` for the token's role. Special tokens are not
        looked at here (extraction drops them separately when subsampling; see :mod:`mmsae.extract.run`).

    Raises:
        ValueError: arrays of different lengths, or a bad fractions mapping.
    """
    fr = fractions_of(fractions)
    token_index, modality, role = np.asarray(token_index), np.asarray(modality), np.asarray(role)
    if not len(token_index) == len(modality) == len(role):
        raise ValueError(f"{sample_id}: token_index, modality and role differ in length "
                         f"({len(token_index)}, {len(modality)}, {len(role)})")
    u = token_uniforms(sample_id, token_index, seed)
    keep = np.zeros(len(u), dtype=bool)
    roles = token_roles3(modality, role)
    for r in ROLES:
        sel = roles == r
        f = fr[r]
        if f >= 1.0:
            keep[sel] = True
        elif f > 0.0:
            keep[sel] = u[sel] < np.uint64(min(int(f * 2.0**64), 2**64 - 1))
    return keep

"""Each feature's running top-``keep`` samples, merged batch by batch in numpy (for
:class:`mmsae.codes.stats.CodeAggregate`).

All lists live in one flat array sorted by a 64-bit key, feature above and the score's float32
bits (inverted: best first) below. A merge sorts only the new candidates; the held entries are
already one sorted run, so a stable sort of the two runs is a linear merge (timsort), then each
feature keeps its first ``keep``. No per-row Python, no string keys. Order is the one
:func:`mmsae.codes.select.top_samples` promises: score descending, then sample id ascending; the
names are compared only where equal scores straddle a list's cut (rare), so which samples stay is
exact.
"""

from __future__ import annotations

import numpy as np

_LOW = 0x7FFFFFFF  # key = feature << 32 | (_LOW - score bits): ascending key = feature, then score descending


def runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal adjacent values in ``keys`` (n,): ``first`` (R,) where each starts, ``size``
    (R,) its length, ``pos`` (n,) each element's position within its run."""
    first = np.flatnonzero(np.append(True, keys[1:] != keys[:-1])) if len(keys) else np.zeros(0, np.int64)
    size = np.diff(np.append(first, len(keys)))
    return first, size, np.arange(len(keys)) - np.repeat(first, size)


def _distinct(order: np.ndarray, key: np.ndarray, sample: np.ndarray, token: np.ndarray, names: list[str]) -> np.ndarray:
    """``order`` (sorted by key) without the entries whose (key, token) an entry with a smaller
    name also has. Only runs of equal keys are looked at (rare but for shared contexts)."""
    ks = key[order]
    first, size, _ = runs(ks)
    drop = []
    for g0, n in zip(first[size > 1], size[size > 1]):
        seen = set()
        for i in sorted(order[g0:g0 + n], key=lambda i: names[sample[i]]):
            if token[i] in seen:
                drop.append(i)
            seen.add(token[i])
    return order[~np.isin(order, drop)] if drop else order


class TopLists:
    """Per feature, the ``keep`` best (sample, score) entries offered so far.

    Entries (flat, sorted by feature, then score descending): ``key`` int64, ``sample`` int64
    (an index into the caller's list of sample names), ``act`` float32 (the sample's largest
    activation), ``token`` int32 (its token). Scores are float32 >= 0. Offers wait in a queue
    and are merged in bulk (:meth:`flush`) once the queue holds ``max(pending, held / 2)``
    entries: a merge's cost grows with the entries held, a stale threshold only lets a few more
    offers in.

    With ``distinct_token``, entries of one feature with the same score and token are one entry
    (the one with the smallest name stands for them): for text, the same activation at the same
    position means the same prefix up to it under causal attention (e.g. a shared chat template),
    so the lists hold distinct contexts instead of ``keep`` copies of one.

    Args:
        keep: entries kept per feature (> 0).
        pending: offers queued before a merge, at least.
        distinct_token: keep one entry per (score, token) of a feature.
    """

    def __init__(self, keep: int, pending: int = 1 << 16, distinct_token: bool = False):
        self.keep, self.pending, self.distinct_token = keep, pending, distinct_token
        self.key = np.zeros(0, np.int64)
        self.sample = np.zeros(0, np.int64)
        self.act = np.zeros(0, np.float32)
        self.token = np.zeros(0, np.int32)
        self.threshold = np.full(0, -np.inf, np.float32)  # (D,) keep-th best score; -inf while fewer
        self.queue: list[tuple[np.ndarray, ...]] = []
        self.n_queued = 0

    def grow(self, d: int) -> None:
        """Make room for features ``0 .. d-1`` in :attr:`threshold`."""
        if d > len(self.threshold):
            self.threshold = np.concatenate([self.threshold, np.full(d - len(self.threshold), -np.inf, np.float32)])

    def offer(self, feature: np.ndarray, sample: np.ndarray, score: np.ndarray, act: np.ndarray,
              token: np.ndarray, names: list[str]) -> bool:
        """Queue candidates (a sample is offered to a feature at most once); merge when the queue
        is long enough. Returns whether it merged (then :attr:`threshold` may have risen).

        Args:
            feature, sample: (m,) int feature ids and sample indices (into ``names``).
            score, act: (m,) float32 >= 0: the ranking score and the sample's largest activation.
            token: (m,) int token of that activation.
            names: the sample names (ties at a list's cut rank by name).
        """
        if not len(feature):
            return False
        key = (feature.astype(np.int64) << 32) | (_LOW - score.astype(np.float32).view(np.int32).astype(np.int64))
        self.queue.append((key, sample.astype(np.int64), act.astype(np.float32), token.astype(np.int32)))
        self.n_queued += len(key)
        if self.n_queued < max(self.pending, len(self.key) // 2):
            return False
        self.flush(names)
        return True

    def flush(self, names: list[str]) -> None:
        """Merge the queued offers into the lists."""
        if not self.queue:
            return
        key, sample, act, token = (np.concatenate(c) for c in zip(*self.queue))
        self.queue, self.n_queued = [], 0
        new = np.argsort(key)
        key = np.concatenate([self.key, key[new]])
        order = np.argsort(key, kind="stable")  # two sorted runs: a linear merge
        sample = np.concatenate([self.sample, sample[new]])
        act, token = np.concatenate([self.act, act[new]]), np.concatenate([self.token, token[new]])
        if self.distinct_token:
            order = _distinct(order, key, sample, token, names)
        ks = key[order]
        f = ks >> 32
        first, size, pos = runs(f)
        long = np.flatnonzero(size > self.keep)
        for j in long[ks[first[long] + self.keep - 1] == ks[first[long] + self.keep]]:  # a tie across the cut
            g0, g1 = first[j], first[j] + size[j]
            order[g0:g1] = sorted(order[g0:g1], key=lambda i: (key[i], names[sample[i]]))  # names decide
        kept = order[pos < self.keep]
        self.key, self.sample, self.act, self.token = key[kept], sample[kept], act[kept], token[kept]
        self.grow(int(f[-1]) + 1)
        full = first[size >= self.keep] + self.keep - 1  # each full list's last entry, in ks
        self.threshold[f[full]] = (_LOW - (ks[full] & 0xFFFFFFFF)).astype(np.int32).view(np.float32)

    def ranked(self, names: list[str]) -> tuple[np.ndarray, ...]:
        """``(feature, sample, score, act, token)`` of every entry (after :meth:`flush`), by
        feature, score descending, then sample name."""
        order = np.arange(len(self.key))
        first, size, _ = runs(self.key)
        for g0, n in zip(first[size > 1], size[size > 1]):  # each run of equal keys: names decide
            order[g0:g0 + n] = sorted(order[g0:g0 + n], key=lambda i: names[self.sample[i]])
        key = self.key[order]
        score = (_LOW - (key & 0xFFFFFFFF)).astype(np.int32).view(np.float32)
        return key >> 32, self.sample[order], score, self.act[order], self.token[order]

"""One streaming pass over code rows (schema :data:`mmsae.codes.schema.CODE_SCHEMA`): per-feature
statistics and each feature's top samples, for :func:`mmsae.codes.select.stats_and_top_samples`.

Why not one polars query: a (feature, sample_id) group-by over all code rows (the previous
implementation) holds one row per active pair, so its memory grows with the rows (1.4 GB at 12.8M
rows, 7.7 GB at 1e8), and that string-keyed group-by was ~60% of its time (its sorts and a second pass for the tokens
the rest). Here the rows stream in
batches through numpy kernels that need no hash or sort over all rows, and the running top lists
are numpy arrays merged in bulk (:mod:`mmsae.codes.top_lists`; a polars merge with string sample ids
was most of the time before). Figures: ``bench/select_top.py``.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from mmsae.codes.top_lists import TopLists, runs

_KIND_BASE, _KIND_IMAGE, _KIND_TEXT = 1, 2, 3  # code row kinds (0: neither image nor text)
_BATCH_ROWS = 1 << 18  # code rows per streamed batch
_CELLS = 1 << 20  # dense (sample, feature) cells per aggregation group; bounds memory with the batch
_PENDING_ROWS = 1 << 16  # offers queued before a merge into the top lists, at least
_NO_ROW = -1  # packed value of a (sample, feature) cell without a row of that kind
_NEVER = np.iinfo(np.int32).max  # threshold bits no activation reaches


def code_batches(codes: pl.LazyFrame):
    """The code rows (:data:`mmsae.codes.schema.CODE_SCHEMA`) in file order, as an iterator of polars frames
    of about ``_BATCH_ROWS`` rows with columns sample_id (str), feature (int32), activation
    (float32), token_index (int32) and ``kind`` (int8: 1 base-view image, 2 other image view,
    3 text, 0 neither): what :class:`CodeAggregate` reads, and the floor of its cost
    (``bench/select_top.py``'s ``iterate``)."""
    image, text = pl.col("modality") == "image", pl.col("modality") == "text"
    kind = (pl.when(image & (pl.col("view") == 0)).then(_KIND_BASE).when(image).then(_KIND_IMAGE)
            .when(text).then(_KIND_TEXT).otherwise(0).cast(pl.Int8).alias("kind"))
    return codes.select("sample_id", "feature", pl.col("activation").cast(pl.Float32), "token_index", kind).collect_batches(
        chunk_size=_BATCH_ROWS)


def _run_starts(sample_id: pl.Series) -> np.ndarray:
    """(R + 1,) int64: where each run of equal sample ids starts, then the length."""
    n, ids = len(sample_id), sample_id.cast(pl.Binary)  # bytes compare faster than strings
    change = (ids.slice(1).ne_missing(ids.slice(0, n - 1)).arg_true().to_numpy() + 1) if n > 1 else []
    return np.concatenate([[0], change, [n]]).astype(np.int64)


def _pack(a: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """(n,) float32 activations >= 0 and int32 token indices -> (n,) int64 whose maximum is the
    largest activation and, among equal ones, the lowest token: the float32 bits above,
    2^31 - 1 - token below."""
    return (a.view(np.int32).astype(np.int64) << 32) | (0x7FFFFFFF - tok.astype(np.int64))


def _unpack(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_pack`: (activation float32, token int32)."""
    return (packed >> 32).astype(np.int32).view(np.float32), (0x7FFFFFFF - (packed & 0xFFFFFFFF)).astype(np.int32)


def _bits(score: np.ndarray) -> np.ndarray:
    """float32 thresholds (``-inf``: none yet) as the bits of activations >= 0."""
    return np.where(np.isfinite(score), score.view(np.int32), 0)


def _grow(arr: np.ndarray, size: int, fill) -> np.ndarray:
    if len(arr) >= size:
        return arr
    out = np.full((size, *arr.shape[1:]), fill, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out


class CodeAggregate:
    """One streaming pass over the code rows: per-feature statistics and each feature's running
    top samples (image and text), in memory independent of the number of rows.

    A sample's rows are contiguous in the code shards (extraction writes whole samples, encoding
    keeps row order; checked), so batches are cut at sample boundaries and no hash or sort runs over
    all rows: per-feature counts, sums and maxima are ``bincount``/``maximum.at`` over the rows;
    n_samples counts the hit cells of dense (feature, sample) blocks of at most ``_CELLS`` cells.
    Top samples (:class:`mmsae.codes.top_lists.TopLists`, one per modality): each (feature, sample)
    cell's largest base-view image / text activation is packed with its token (lowest index on
    ties) into one int64 (the float32 bits of a non-negative activation order as integers). Ranked by
    the largest activation (text always, base-view images with ``rank_by="max"``) only rows at or
    above their feature's current list threshold are looked at (after the first batches few
    pass); with ``"mean"`` the image cells of the dense blocks are scored. An image file counts
    once: the image lists keep ``n`` times the most samples sharing a file, which hold the ``n``
    best distinct files; :meth:`top` keeps each file's best sample. A text context counts once: the text lists
    keep one sample per (score, token) (:class:`mmsae.codes.top_lists.TopLists` ``distinct_token``).

    Memory: one batch of rows, one dense block, the lists (``d_sae`` x ``n`` x per-file entries),
    and the names of the samples seen; flat in the number of rows.

    Args:
        base_view_tokens: ``(sample_id, n_base, image_path)`` (:func:`mmsae.codes.select.base_view_counts`);
            None = statistics only.
        n: top samples kept per feature and modality.
        rank_by: ``max`` or ``mean`` (see :func:`mmsae.codes.select.top_samples`).

    Raises:
        ValueError: ``rank_by`` is not ``max`` or ``mean``.
    """

    def __init__(self, base_view_tokens: pl.DataFrame | None, n: int, rank_by: str):
        if rank_by not in ("max", "mean"):
            raise ValueError(f"features.rank_by: {rank_by!r} is not one of max, mean")
        self.n, self.rank_by, self.tops = n, rank_by, base_view_tokens is not None and n > 0
        self.base = {} if base_view_tokens is None else {  # sample -> (n_base, image file), samples with base-view tokens
            x: (nb, path) for x, nb, path in base_view_tokens.select("sample_id", "n_base", "image_path").iter_rows() if nb and nb > 0}
        self.counts = np.zeros((0, 4), np.int64)  # rows per (feature, kind)
        self.sums = np.zeros(0, np.float64)
        self.maxs = np.zeros(0, np.float32)
        self.n_samples = np.zeros(0, np.int64)
        # most samples sharing one image file (a feature's top n images lie in its n * per_file best samples)
        per_file = 1 if base_view_tokens is None else int(base_view_tokens.group_by("image_path").len()["len"].max() or 1)
        self.lists = {"image": TopLists(max(n, 1) * per_file, _PENDING_ROWS), "text": TopLists(max(n, 1), _PENDING_ROWS, distinct_token=True)}
        self.thr4 = np.zeros(0, np.int32)  # (4 * D,) per (feature, kind): bits an activation must reach to be offered
        self.names: list[str] = []  # every sample seen, in file order (the lists index it)
        self.seen: set[str] = set()

    def run(self, codes: pl.LazyFrame) -> "CodeAggregate":
        """Aggregate all rows of ``codes`` (streamed in file order); returns self.

        Raises:
            ValueError: a sample's rows are not contiguous; an activation is negative, infinite or NaN;
                a sample has base-view image rows but no positive ``n_base`` in ``base_view_tokens``.
        """
        carry, carry_id = None, None  # the rows of the last sample seen, which may go on in the next batch
        for batch in code_batches(codes):
            if not batch.height:
                continue
            cols = [batch[c].to_numpy() for c in ("feature", "activation", "kind", "token_index")]
            starts = _run_starts(batch["sample_id"])
            ids = batch["sample_id"].gather(starts[:-1]).to_list()
            if carry is not None and ids[0] == carry_id:  # the carried sample goes on
                carry = [np.concatenate([c, x[: starts[1]]]) for c, x in zip(carry, cols)]
                starts, ids = starts[1:], ids[1:]
                if not ids:
                    continue
            if carry is not None:
                self._add(carry, np.array([0, len(carry[0])]), [carry_id])
            self._add([x[starts[0]: starts[-2]] for x in cols], starts[:-1] - starts[0], ids[:-1])
            carry, carry_id = [x[starts[-2]:] for x in cols], ids[-1]
        if carry is not None:
            self._add(carry, np.array([0, len(carry[0])]), [carry_id])
        for lists in self.lists.values():
            lists.flush(self.names)
        return self

    def _add(self, cols: list[np.ndarray], starts: np.ndarray, names: list[str]) -> None:
        """Aggregate the rows of whole samples: ``cols`` = feature, activation, kind, token (n,);
        ``starts`` (R + 1,) bound each sample's rows; ``names`` (R,) their ids."""
        if not names:
            return
        f, a, kind, tok = cols
        f = f.astype(np.int64)
        if not ((a >= 0) & (a < np.inf)).all():
            i = int(np.flatnonzero(~((a >= 0) & (a < np.inf)))[0])
            raise ValueError(f"codes: activation {a[i]} of sample {names[np.searchsorted(starts, i, 'right') - 1]!r} feature {f[i]} "
                             "is negative, infinite or NaN (codes hold ReLU'd TopK values)")
        a = a + np.float32(0)  # -0.0 -> +0.0: its float32 bits then order as the value
        if self.seen.intersection(names) or len(set(names)) < len(names):
            dup = next(x for i, x in enumerate(names) if x in self.seen or x in names[:i])
            raise ValueError(f"codes: the rows of sample {dup!r} are not contiguous (code shards hold each sample's rows "
                             "together, in one shard)")
        run = np.repeat(np.arange(len(names)), np.diff(starts))  # (rows,) the row's sample in this call
        if self.tops:  # a sample's base-view rows need its n_base and image file
            has_base = np.zeros(len(names), bool)
            has_base[run[kind == _KIND_BASE]] = True
            missing = [x for x, b in zip(names, has_base) if b and x not in self.base]
            if missing:
                raise ValueError(f"codes: sample {missing[0]!r} has base-view image rows but no base-view token count in the "
                                 "codes' samples table (n_base_tokens > 0): pass the samples.parquet written with these codes")
        first = len(self.names)
        self.seen.update(names)
        self.names += names
        self._grow(int(f.max()) + 1)
        D = len(self.maxs)
        key = f * 4 + kind
        self.counts += np.bincount(key, minlength=4 * D).reshape(D, 4)
        self.sums += np.bincount(f, weights=a, minlength=D)
        np.maximum.at(self.maxs, f, a)
        if self.tops:
            self._add_max(f, a, key, tok, run, first, len(names))
        per_group = max(1, _CELLS // D)
        for r0 in range(0, len(names), per_group):
            r1 = min(r0 + per_group, len(names))
            rows = slice(starts[r0], starts[r1])
            self._add_group(f[rows], a[rows], kind[rows], tok[rows], run[rows] - r0, first + r0, r1 - r0, D)

    def _grow(self, d: int) -> None:
        if d <= len(self.maxs):
            return
        self.counts, self.n_samples = _grow(self.counts, d, 0), _grow(self.n_samples, d, 0)
        self.sums, self.maxs = _grow(self.sums, d, 0.0), _grow(self.maxs, d, -np.inf)
        for lists in self.lists.values():
            lists.grow(d)
        self._thresholds()

    def _thresholds(self) -> None:
        """Rebuild ``thr4`` from the lists (kinds other than base-view image and text: never)."""
        thr = np.full((len(self.maxs), 4), _NEVER, np.int32)
        if self.rank_by == "max":  # with "mean", image cells are scored in dense blocks (_add_group)
            thr[:, _KIND_BASE] = _bits(self.lists["image"].threshold)
        thr[:, _KIND_TEXT] = _bits(self.lists["text"].threshold)
        self.thr4 = thr.reshape(-1)

    def _add_group(self, f, a, kind, tok, local, first, R, D) -> None:
        """n_samples over R samples; with ``rank_by="mean"`` their (feature, sample) image cells
        are scored (base-view sum / n_base) and offered."""
        cell = f * R + local  # (feature, sample) cells, feature-major
        hit = np.zeros(D * R, bool)
        hit[cell] = True
        self.n_samples += np.count_nonzero(hit.reshape(D, R), axis=1)
        if not self.tops or self.rank_by == "max":
            return
        base = kind == _KIND_BASE
        best = np.full(D * R, _NO_ROW, np.int64)
        np.maximum.at(best, cell[base], _pack(a[base], tok[base]))
        best = best.reshape(D, R)
        n_base = np.array([self.base.get(x, (np.nan,))[0] for x in self.names[first: first + R]], np.float64)
        score = (np.bincount(cell[base], weights=a[base], minlength=D * R).reshape(D, R) / n_base[None, :]).astype(np.float32)
        score[best == _NO_ROW] = -np.inf
        lists = self.lists["image"]
        cut = lists.threshold[:D]
        if R > lists.keep:
            cut = np.maximum(cut, np.partition(score, R - lists.keep, axis=1)[:, R - lists.keep])
        c, r = np.nonzero((score >= cut[:, None]) & np.isfinite(score))
        act, token = _unpack(best[c, r])
        lists.offer(c, first + r, score[c, r], act, token, self.names)

    def _add_max(self, f, a, key, tok, run, first, R) -> None:
        """Top samples by the largest activation (text always; base-view images with
        ``rank_by="max"``), sparse: only rows at or above their feature's list threshold can
        enter; each (feature, sample, modality)'s largest of those is offered."""
        sel = np.flatnonzero(a.view(np.int32) >= self.thr4[key])
        if not len(sel):
            return
        slot = (f[sel] * R + run[sel]) * 2 + (key[sel] & 3 == _KIND_TEXT)  # (cell, image|text)
        packed = _pack(a[sel], tok[sel])
        n_slots = 2 * len(self.maxs) * R
        if len(sel) * 16 > n_slots:  # dense: each slot's largest packed value by scatter
            best = np.full(n_slots, _NO_ROW, np.int64)
            np.maximum.at(best, slot, packed)
            slot = np.flatnonzero(best != _NO_ROW)
            best = best[slot]
        else:  # sparse: sort the few selected rows by slot
            order = np.argsort(slot)
            slot, packed = slot[order], packed[order]
            head = runs(slot)[0]
            slot, best = slot[head], np.maximum.reduceat(packed, head)
        merged, text = False, (slot & 1).astype(bool)
        for modality, pick in (("image", ~text), ("text", text)):
            cell, top = slot[pick] >> 1, best[pick]
            act, token = _unpack(top)
            merged |= self.lists[modality].offer(cell // R, first + cell % R, act, act, token, self.names)
        if merged:
            self._thresholds()

    def stats(self, n_tokens: int, n_image_tokens: int, n_text_tokens: int) -> pl.DataFrame:
        """The feature-stats table (:func:`mmsae.codes.select.feature_stats`), features sorted."""
        n = self.counts.sum(1)
        alive = np.flatnonzero(n)
        c = self.counts[alive]
        return pl.DataFrame({
            "feature": alive.astype(np.int32),
            "n_tokens_active": n[alive].astype(np.int64),
            "max_activation": self.maxs[alive],
            "mean_activation": (self.sums[alive] / n[alive]).astype(np.float32),
            "n_image": c[:, _KIND_BASE] + c[:, _KIND_IMAGE],
            "n_text": c[:, _KIND_TEXT],
            "n_samples": self.n_samples[alive].astype(np.int64),
        }).select(
            "feature", "n_tokens_active",
            (pl.col("n_tokens_active") / max(n_tokens, 1)).alias("frequency"),
            "max_activation", "mean_activation",
            (pl.col("n_image") / max(n_image_tokens, 1)).alias("frequency_image"),
            (pl.col("n_text") / max(n_text_tokens, 1)).alias("frequency_text"),
            "n_samples",
        )

    def top(self) -> pl.DataFrame:
        """The top-samples table (:func:`mmsae.codes.select.top_samples`)."""
        names = pl.Series(self.names, dtype=pl.String)
        path_of = {}
        path = np.array([path_of.setdefault(self.base.get(x, (None, None))[1], len(path_of)) for x in self.names], np.int64)
        parts = []
        for modality in ("image", "text"):
            lists = self.lists[modality]  # flushed at the end of run()
            c, sample, score, act, token = lists.ranked(self.names) if self.tops else [np.zeros(0, np.int64)] * 5
            if modality == "image" and lists.keep > self.n:  # an image file counts once: its best sample stands for it
                once = np.sort(np.unique(c * len(path_of) + path[sample], return_index=True)[1])
                c, sample, score, act, token = (x[once] for x in (c, sample, score, act, token))
            rank = runs(c)[2]
            top = rank < self.n
            parts.append(pl.DataFrame({
                "feature": c[top].astype(np.int32), "modality": pl.Series([modality] * int(top.sum()), dtype=pl.String),
                "rank": rank[top].astype(np.int16), "sample_id": names.gather(sample[top]), "score": score[top].astype(np.float32),
                "max_activation": act[top].astype(np.float32), "token_index": token[top].astype(np.int32)}))
        return pl.concat(parts).sort("feature", "modality", "rank")

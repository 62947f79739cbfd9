"""One streaming pass over code rows (schema :data:`mmsae.features.CODE_SCHEMA`): per-feature
statistics and each feature's top samples, for :func:`mmsae.features.stats_and_top_samples`.

Why not one polars query: a (feature, sample_id) group-by over all code rows (the previous
implementation) holds one row per active pair, so its memory grows with the rows (1.4 GB at 12.8M
rows, 7.7 GB at 1e8), and that string-keyed group-by was ~60% of its time (its sorts and a second pass for the tokens
the rest). Here the rows stream in
batches through numpy kernels that need no hash or sort over all rows (``bench/select_top.py``).
"""

from __future__ import annotations

import numpy as np
import polars as pl

_KIND_BASE, _KIND_IMAGE, _KIND_TEXT = 1, 2, 3  # code row kinds (0: neither image nor text)
_BATCH_ROWS = 1 << 20  # code rows per streamed batch
_CELLS = 1 << 20  # dense (sample, feature) cells per aggregation group; bounds memory with the batch
_PENDING_ROWS = 1 << 16  # candidate rows queued before a merge (frequent merges raise the thresholds sooner)
_NO_ROW = -1  # packed value of a (sample, feature) cell without a row of that kind


def _code_batches(codes: pl.LazyFrame):
    """The code rows in file order, in batches of ~_BATCH_ROWS, with a small-int ``kind``."""
    image, text = pl.col("modality") == "image", pl.col("modality") == "text"
    kind = (pl.when(image & (pl.col("view") == 0)).then(_KIND_BASE).when(image).then(_KIND_IMAGE)
            .when(text).then(_KIND_TEXT).otherwise(0).cast(pl.Int8).alias("kind"))
    return codes.select("sample_id", "feature", pl.col("activation").cast(pl.Float32), "token_index", kind).collect_batches(
        chunk_size=_BATCH_ROWS)


def _pack(a: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """(n,) float32 activations >= 0 and int32 token indices -> (n,) int64 whose maximum is the
    largest activation and, among equal ones, the lowest token: the float32 bits above,
    2^31 - 1 - token below."""
    return (a.view(np.int32).astype(np.int64) << 32) | (0x7FFFFFFF - tok.astype(np.int64))


def _grow(arr: np.ndarray, size: int, fill) -> np.ndarray:
    if len(arr) >= size:
        return arr
    out = np.full((size, *arr.shape[1:]), fill, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out


class CodeAggregate:
    """One streaming pass over the code rows: per-feature statistics and each feature's running
    top-``n`` samples (image and text), in memory independent of the number of rows.

    A sample's rows are contiguous in the code shards (extraction writes whole samples, encoding
    keeps row order; checked), so batches are cut at sample boundaries and no hash or sort runs over
    all rows: per-feature counts, sums and maxima are ``bincount``/``maximum.at`` over the rows;
    n_samples counts the non-empty cells of dense (feature, sample) blocks of at most ``_CELLS``
    cells. Top samples: each (feature, sample) cell's largest base-view image / text activation is
    packed with its token (lowest index on ties) into one int64 (the float32 bits of a non-negative
    activation order as integers). With ``rank_by="max"`` only rows at or above their feature's
    current n-th best score are kept (a sparse filter: after the first batches almost none pass);
    with ``"mean"`` the cells of the dense blocks are scored. Candidates are merged into running top
    lists (polars sort by score, then sample id); an image file keeps only its best sample.

    Memory: one batch of rows, one dense block, the running lists (2 * n rows per feature) and the
    set of sample ids seen; flat in the number of rows.

    Args:
        base_view_tokens: ``(sample_id, n_base, image_path)`` (:func:`mmsae.features.base_view_counts`);
            None = statistics only.
        n: top samples kept per feature and modality.
        rank_by: ``max`` or ``mean`` (see :func:`mmsae.features.top_samples`).

    Raises:
        ValueError: ``rank_by`` is not ``max`` or ``mean``.
    """

    def __init__(self, base_view_tokens: pl.DataFrame | None, n: int, rank_by: str):
        if rank_by not in ("max", "mean"):
            raise ValueError(f"features.rank_by: {rank_by!r} is not one of max, mean")
        self.n, self.rank_by, self.tops = n, rank_by, base_view_tokens is not None and n > 0
        self.base = {} if base_view_tokens is None else dict(
            zip(base_view_tokens["sample_id"].to_list(), zip(base_view_tokens["n_base"].to_list(), base_view_tokens["image_path"].to_list())))
        self.counts = np.zeros((0, 4), np.int64)  # rows per (feature, kind)
        self.sums = np.zeros(0, np.float64)
        self.maxs = np.zeros(0, np.float32)
        self.n_samples = np.zeros(0, np.int64)
        self.thr = {"image": np.zeros(0), "text": np.zeros(0)}  # each feature's n-th best score so far
        empty = {"feature": pl.Int32, "sample_id": pl.String, "score": pl.Float64, "max_activation": pl.Float32, "token_index": pl.Int32}
        self.best = {"image": pl.DataFrame(schema={**empty, "image_path": pl.String}), "text": pl.DataFrame(schema=empty)}
        self.seen: set[str] = set()
        self.pending: dict[str, list[pl.DataFrame]] = {"image": [], "text": []}
        self.n_pending = {"image": 0, "text": 0}
        # most samples sharing one image file (a feature's top n images lie in its n * per_file best samples)
        self.per_file = 1 if base_view_tokens is None else int(base_view_tokens.group_by("image_path").len()["len"].max() or 1)

    def run(self, codes: pl.LazyFrame) -> "CodeAggregate":
        """Aggregate all rows of ``codes`` (streamed in file order); returns self.

        Raises:
            ValueError: a sample's rows are not contiguous, or an activation is negative or NaN.
        """
        carry = None
        for batch in _code_batches(codes):
            if carry is not None:
                batch = pl.concat([carry, batch])
            run = batch["sample_id"].rle_id().to_numpy()
            last = int(np.searchsorted(run, run[-1])) if len(run) else 0  # the last sample may go on
            if last > 0:
                self._add(batch.slice(0, last), run[:last])
            carry = batch.slice(last)
        if carry is not None and carry.height:
            self._add(carry, carry["sample_id"].rle_id().to_numpy())
        return self

    def _add(self, b: pl.DataFrame, run: np.ndarray) -> None:
        f = b["feature"].to_numpy().astype(np.int64)
        a = b["activation"].to_numpy()
        kind = b["kind"].to_numpy()
        if not (a >= 0).all():
            bad = b.filter(~(pl.col("activation") >= 0)).row(0, named=True)
            raise ValueError(f"codes: activation {bad['activation']} of sample {bad['sample_id']!r} feature {bad['feature']} "
                             "is negative or NaN (codes hold ReLU'd TopK values)")
        starts = np.concatenate([[0], np.flatnonzero(np.diff(run)) + 1, [len(run)]])
        names = b["sample_id"].gather(starts[:-1]).to_list()
        if self.seen.intersection(names) or len(set(names)) < len(names):
            dup = next(x for i, x in enumerate(names) if x in self.seen or x in names[:i])
            raise ValueError(f"codes: the rows of sample {dup!r} are not contiguous (code shards hold each sample's rows "
                             "together, in one shard)")
        self.seen.update(names)
        D = int(f.max()) + 1
        self.counts = _grow(self.counts, D, 0)
        self.sums, self.maxs = _grow(self.sums, D, 0.0), _grow(self.maxs, D, -np.inf)
        self.n_samples = _grow(self.n_samples, D, 0)
        for m in self.thr:
            self.thr[m] = _grow(self.thr[m], D, -np.inf)
        self.counts[:D] += np.bincount(f * 4 + kind, minlength=4 * D).reshape(D, 4)
        self.sums[:D] += np.bincount(f, weights=a, minlength=D)
        np.maximum.at(self.maxs, f, a)
        tok = b["token_index"].to_numpy()
        if self.tops and self.rank_by == "max":
            self._add_max(f, a, kind, tok, run - run[0], names)
        packed = _pack(a, tok) if self.tops and self.rank_by == "mean" else None
        per_group = max(1, _CELLS // D)
        for r0 in range(0, len(names), per_group):
            r1 = min(r0 + per_group, len(names))
            rows = slice(starts[r0], starts[r1])
            self._add_group(f[rows], a[rows], kind[rows], None if packed is None else packed[rows],
                            (run[rows] - run[starts[r0]]).astype(np.int64),
                            names[r0:r1], D)

    def _add_group(self, f, a, kind, packed, local, names, D) -> None:
        R = len(names)
        cell = f * R + local  # (feature, sample) cells, feature-major: a feature's samples are contiguous
        self.n_samples[:D] += (np.bincount(cell, minlength=D * R).reshape(D, R) > 0).sum(1)
        if not self.tops or self.rank_by == "max":
            return
        base, text = kind == _KIND_BASE, kind == _KIND_TEXT
        slot = np.where(base, cell * 2, np.where(text, cell * 2 + 1, 2 * R * D))  # (cell, image|text), else a spare slot
        best = np.full(2 * R * D + 1, _NO_ROW, np.int64)
        np.maximum.at(best, slot, packed)
        best = best[:-1].reshape(D, R, 2)
        info = [self.base.get(x, (None, None)) for x in names]
        for i, modality in enumerate(("image", "text")):
            cells = best[..., i]
            keep = self.n * (self.per_file if modality == "image" else 1)  # a feature's top n lie in its best `keep` cells
            thr = self.thr[modality][:D]
            if modality == "image" and self.rank_by == "mean":
                n_base = np.array([np.nan if nb is None else nb for nb, _ in info], np.float64)
                score = np.bincount(cell[base], weights=a[base], minlength=D * R).reshape(D, R) / n_base[None, :]
                score[cells == _NO_ROW] = -np.inf
                cut = thr if R <= keep else np.maximum(thr, np.partition(score, R - keep, axis=1)[:, R - keep])
                c, r = np.nonzero(score >= np.maximum(cut, np.finfo(np.float64).min)[:, None])
            else:  # rank by the largest activation: compare its float32 bits (-1 where no row), ties kept
                hi = cells >> 32
                cut = np.where(np.isfinite(thr), thr.astype(np.float32).view(np.int32), 0).astype(np.int64)
                if R > keep:
                    cut = np.maximum(cut, np.partition(hi, R - keep, axis=1)[:, R - keep])
                c, r = np.nonzero(hi >= cut[:, None])
                score = None
            if len(r):
                top = cells[c, r]
                top_act = (top >> 32).astype(np.int32).view(np.float32)
                sc = top_act.astype(np.float64) if score is None else score[c, r]
                self._offer(modality, r, c, sc, top_act, 0x7FFFFFFF - (top & 0xFFFFFFFF), names, info)

    def _add_max(self, f, a, kind, tok, run, names) -> None:
        """Top samples by the largest activation, sparse: only rows at or above their feature's
        current n-th best score can matter; the largest per (feature, sample) of those are offered."""
        n_runs = len(names)
        bits = a.view(np.int32)  # the activation's float32 bits (ordered as a for a >= 0)
        for modality, k in (("image", _KIND_BASE), ("text", _KIND_TEXT)):
            thr = self.thr[modality]
            thr_bits = np.where(np.isfinite(thr), thr.astype(np.float32).view(np.int32), 0)
            sel = np.flatnonzero((bits >= thr_bits[f]) & (kind == k))
            if not len(sel):
                continue
            cell, best = f[sel] * n_runs + run[sel], _pack(a[sel], tok[sel])
            order = np.argsort(cell)
            cell, best = cell[order], best[order]
            first = np.flatnonzero(np.append(True, cell[1:] != cell[:-1]))
            cell, best = cell[first], np.maximum.reduceat(best, first)  # each cell's largest packed value
            cell, best = self._tighten(modality, cell, best, n_runs)
            top_act = (best >> 32).astype(np.int32).view(np.float32)
            self._offer(modality, cell % n_runs, cell // n_runs, top_act.astype(np.float64), top_act,
                        0x7FFFFFFF - (best & 0xFFFFFFFF), names, [self.base.get(x, (None, None)) for x in names])

    def _tighten(self, modality, cell, best, n_runs):
        """Raise each feature's threshold to the ``keep``-th best of these (distinct-sample) cells
        (n of them, times per_file for images: they cover n distinct images), and keep the cells
        at or above it (ties kept)."""
        keep = self.n * (self.per_file if modality == "image" else 1)
        feat, bits = cell // n_runs, best >> 32
        order = np.lexsort((-bits, feat))  # by feature, then value descending
        feat_s, bits_s = feat[order], bits[order]
        first = np.flatnonzero(np.append(True, feat_s[1:] != feat_s[:-1]))
        size = np.diff(np.append(first, len(feat_s)))
        full = size >= keep
        kth = bits_s[first[full] + keep - 1]
        thr = self.thr[modality]
        thr[feat_s[first[full]]] = np.maximum(thr[feat_s[first[full]]], kth.astype(np.int32).view(np.float32))
        cut = np.where(np.isfinite(thr), thr.astype(np.float32).view(np.int32), 0).astype(np.int64)
        ok = bits >= cut[feat]
        return cell[ok], best[ok]

    def _offer(self, modality, r, c, score, top_act, token, names, info) -> None:
        """Queue candidate cells (sample r, feature c); merged into the top lists in bulk."""
        cand = {"feature": c.astype(np.int32), "sample_id": pl.Series(names, dtype=pl.String).gather(r), "score": score,
                "max_activation": top_act, "token_index": token.astype(np.int32)}
        if modality == "image":
            cand["image_path"] = pl.Series([p for _, p in info], dtype=pl.String).gather(r)
        self.pending[modality].append(pl.DataFrame(cand))
        self.n_pending[modality] += len(r)
        if self.n_pending[modality] >= _PENDING_ROWS:
            self._merge(modality)

    def _merge(self, modality) -> None:
        """Merge the queued candidates into the running top lists of their features (then the
        thresholds rise: a feature's n-th best score so far)."""
        if not self.pending[modality]:
            return
        cand = pl.concat(self.pending[modality])
        self.pending[modality], self.n_pending[modality] = [], 0
        hit = pl.col("feature").is_in(cand["feature"].unique().implode())
        merged = pl.concat([self.best[modality].filter(hit), cand]).sort(
            ["feature", "score", "sample_id"], descending=[False, True, False])
        if modality == "image":  # an image file counts once: its best sample stands for it
            merged = merged.unique(subset=["feature", "image_path"], keep="first", maintain_order=True)
        merged = merged.filter(pl.int_range(pl.len()).over("feature") < self.n)
        self.best[modality] = pl.concat([self.best[modality].filter(~hit), merged])
        full = merged.group_by("feature").agg(pl.len(), pl.col("score").last()).filter(pl.col("len") == self.n)
        self.thr[modality][full["feature"].to_numpy()] = full["score"].to_numpy()

    def stats(self, n_tokens: int, n_image_tokens: int, n_text_tokens: int) -> pl.DataFrame:
        """The feature-stats table (:func:`mmsae.features.feature_stats`), features sorted."""
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
        """The top-samples table (:func:`mmsae.features.top_samples`)."""
        for m in self.pending:
            self._merge(m)
        parts = [self.best[m].select("feature", pl.lit(m).alias("modality"), pl.int_range(pl.len()).over("feature").alias("rank"),
                                     "sample_id", "score", "max_activation", "token_index") for m in ("image", "text")]
        return pl.concat(parts).select(
            pl.col("feature").cast(pl.Int32), "modality", pl.col("rank").cast(pl.Int16), "sample_id",
            pl.col("score").cast(pl.Float32), pl.col("max_activation").cast(pl.Float32), pl.col("token_index").cast(pl.Int32),
        ).sort("feature", "modality", "rank")

"""Shuffled, streamed batches of activations from Parquet shards, with a held-out split.

Memory is bounded by the shuffle buffer (``buffer_tokens`` rows) plus one Parquet record batch,
whatever the number of shards. The stream is a deterministic function of the seed, so a resumed
run can skip exactly the batches it has already trained on.

The held-out split is by image, and by prompt for text-only samples (:func:`heldout_sample_ids`): the
image tokens of one image are identical under every prompt, so splitting by sample would put the
same tokens on both sides.
"""

from __future__ import annotations

import zlib
from collections import Counter
from pathlib import Path, PurePath
from typing import Collection, Iterator

import numpy as np
import pyarrow as pa
import torch

from mmsae.core.io import config_hash
from mmsae.sae.norms import row_norms
from mmsae.core.shards import iter_activations

COLUMNS = ("sample_id", "modality", "token_id")


def member_of(ids: np.ndarray, id_set: Collection[str]) -> np.ndarray:
    """(n,) bool: which of ``ids`` ((n,) object array of sample ids) are in ``id_set`` (a set).

    One set lookup per run of equal ids (a sample's rows are contiguous in a shard, so a read batch
    holds a few runs), not ``np.isin`` over object arrays, which sorts both sides with Python
    comparisons per batch and grew with the held-out set: 30 of 52 s of a 3*10^6-row training run.
    Correct for any order of ids.
    """
    if not len(ids):
        return np.zeros(0, dtype=bool)
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    hit = np.fromiter((ids[i] in id_set for i in starts), dtype=bool, count=len(starts))
    return np.repeat(hit, np.diff(np.append(starts, len(ids))))


def heldout_sample_ids(samples: pa.Table, fraction: float) -> list[str]:
    """The ids of the held-out samples, sorted: every sample of an image whose file name hashes
    (CRC32) below ``fraction`` of the range, and every text-only sample whose prompt does (or, when
    several text-only samples share a prompt, e.g. passages given as answers to one prompt, whose
    sample id does: each is its own text).

    The file name, not the full path, is hashed so the split does not depend on where the images
    are installed (``image_path`` is absolute); images of the same name in different folders fall
    on the same side, which only makes the split coarser.

    Args:
        samples: the activations' samples table (``samples.parquet``) with columns ``sample_id``,
            ``image_path`` (null for text-only samples) and ``prompt``.
        fraction: expected share of images (and of distinct text prompts) held out, in [0, 1).

    Raises:
        ValueError: a column is missing.
    """
    missing = {"sample_id", "image_path", "prompt"} - set(samples.column_names)
    if missing:
        raise ValueError(f"samples table: missing column(s) {sorted(missing)}")
    if fraction <= 0:
        return []
    ids, images, prompts = (samples.column(c).to_pylist() for c in ("sample_id", "image_path", "prompt"))
    shared = Counter(p for p, image in zip(prompts, images) if image is None)
    held = set()
    for sid, image, prompt in zip(ids, images, prompts):
        if image is not None:
            key = f"image:{PurePath(image).name}"
        else:  # a prompt shared by text-only samples (passages answering one prompt) does not identify one text
            key = f"prompt:{prompt}" if shared[prompt] == 1 else f"sample:{sid}"
        if zlib.crc32(key.encode()) / 2**32 < fraction:
            held.add(sid)
    return sorted(held)


class ShuffledStream:
    """The shuffle buffer shared by every source of training rows (activation shards, or the model's
    forward passes in :mod:`mmsae.sae.online`): subclasses set ``batch_size``, ``seed`` and
    ``buffer_tokens`` and implement :meth:`_epoch`, the training rows of one pass over the data in an
    order drawn from the stream's generator."""

    batch_size: int
    seed: int
    buffer_tokens: int

    def _epoch(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(x (n, d_model) float32, is_image (n,) bool)`` chunks of one epoch's training rows."""
        raise NotImplementedError

    def _drain(self, buf_x, buf_m, rng, keep_fraction: float):
        """Shuffle the buffer, return (batches to emit, remaining x, remaining m)."""
        x_all, m_all = np.concatenate(buf_x), np.concatenate(buf_m)
        perm = rng.permutation(len(x_all))
        x_all, m_all = x_all[perm], m_all[perm]
        n_out = int(len(x_all) * (1 - keep_fraction)) // self.batch_size * self.batch_size
        out = [
            (torch.from_numpy(x_all[i : i + self.batch_size]), torch.from_numpy(m_all[i : i + self.batch_size]))
            for i in range(0, n_out, self.batch_size)
        ]
        return out, x_all[n_out:], m_all[n_out:]

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless training batches ``(x (batch_size, d_model) float32, is_image (batch_size,) bool)``,
        epoch after epoch, deterministic for a given seed (and deterministic rows).

        Rows enter a shuffle buffer; when it holds ``buffer_tokens`` rows, half of it is emitted
        in shuffled batches and the rest stays to mix with later rows. At the end of each epoch
        the buffer is emitted in full batches; what is left (less than a batch) mixes into the next
        epoch, which reads the data again in a new order.

        Raises:
            ValueError: an epoch yields no training row.
        """
        rng = np.random.default_rng(self.seed)
        buf_x: list[np.ndarray] = []
        buf_m: list[np.ndarray] = []
        n = 0
        while True:
            produced = False
            for x, m in self._epoch(rng):
                produced = True
                buf_x.append(x)
                buf_m.append(m)
                n += len(x)
                if n >= self.buffer_tokens:
                    out, rest_x, rest_m = self._drain(buf_x, buf_m, rng, keep_fraction=0.5)
                    yield from out
                    buf_x, buf_m, n = [rest_x], [rest_m], len(rest_x)
            if not produced:
                raise ValueError("the training split is empty (all samples held out or excluded)")
            out, rest_x, rest_m = self._drain(buf_x, buf_m, rng, keep_fraction=0.0)
            yield from out
            buf_x, buf_m, n = [rest_x], [rest_m], len(rest_x)


class ActivationStream(ShuffledStream):
    """Batches ``(x (batch, d_model) float32, is_image (batch,) bool)`` from activation shards.

    Args:
        paths: shard files.
        batch_size: rows per batch.
        seed: shuffling seed (shard order per epoch and the buffer permutation).
        buffer_tokens: shuffle-buffer size in rows (>= batch_size).
        heldout_ids: sample ids kept out of training (see :func:`heldout_sample_ids`).
        exclude_token_ids: token ids (e.g. BOS and other special tokens) left out of training.
        max_norm: training tokens with a larger L2 norm are left out (``sae.exclude_norm_above``);
            None keeps all.
        scale: training rows (:meth:`train_batches`, :meth:`sample`) are multiplied by this
            (``sae.normalize_activations``); :meth:`heldout` and :meth:`train_norms` stay raw.
        read_rows: rows per Parquet read.
    """

    def __init__(
        self,
        paths: list[Path],
        batch_size: int,
        seed: int,
        buffer_tokens: int,
        heldout_ids: Collection[str],
        exclude_token_ids: list[int] | None = None,
        max_norm: float | None = None,
        scale: float = 1.0,
        read_rows: int = 4096,
    ):
        if not paths:
            raise ValueError("no activation shards to train on")
        self.paths, self.batch_size, self.seed = list(paths), batch_size, seed
        self.buffer_tokens = max(buffer_tokens, 2 * batch_size)
        self.heldout_ids = frozenset(heldout_ids)
        self.exclude = np.array(sorted(set(exclude_token_ids or [])), dtype=np.int64)
        self.max_norm, self.scale = max_norm, scale
        self.read_rows = read_rows

    def identity(self) -> dict:
        """What the stream's content depends on (file names, sizes and mtimes, split, exclusions, seed)."""
        files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in map(Path, self.paths)]
        return {
            "files": files,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "buffer_tokens": self.buffer_tokens,
            "heldout_ids": config_hash(sorted(self.heldout_ids)),
            "exclude": self.exclude.tolist(),
            "max_norm": self.max_norm,
            "scale": self.scale,
        }

    def _rows(self, paths: list[Path], heldout: bool, train: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x, is_image) of one split without excluded token ids; ``train``: also without outliers, scaled."""
        for x, cols in iter_activations(paths, self.read_rows, COLUMNS):
            keep = member_of(cols["sample_id"], self.heldout_ids) == heldout
            if len(self.exclude):
                keep &= ~np.isin(cols["token_id"], self.exclude)
            if train and self.max_norm is not None:
                keep &= row_norms(x) <= self.max_norm
            if keep.any():
                x, m = x[keep], cols["modality"][keep] == "image"
                yield (x * np.float32(self.scale) if train and self.scale != 1.0 else x), m

    def train_norms(self) -> tuple[np.ndarray, np.ndarray]:
        """L2 norms (float64) and is_image of every training token before the outlier rule and scaling,
        in shard order: one pass over the data, 9 bytes a token."""
        norms, image = [], []
        for x, m in self._rows(self.paths, heldout=False):
            norms.append(row_norms(x))
            image.append(m)
        if not norms:
            raise ValueError("the training split is empty (all samples held out or excluded)")
        return np.concatenate(norms), np.concatenate(image)

    def _epoch(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch: the shards in an order drawn from ``rng``, training rows only (outliers out, scaled)."""
        order = rng.permutation(len(self.paths))
        yield from self._rows([self.paths[i] for i in order], heldout=False, train=True)

    def heldout(self, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out tokens (at most ``max_tokens``, in shard order, outliers included, unscaled) as
        ``(x, is_image)``."""
        xs, ms, n = [], [], 0
        for x, m in self._rows(self.paths, heldout=True):
            xs.append(x[: max_tokens - n])
            ms.append(m[: max_tokens - n])
            n += len(xs[-1])
            if n >= max_tokens:
                break
        if not xs:
            return torch.empty(0), torch.empty(0, dtype=torch.bool)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ms))

    def sample(self, n: int) -> torch.Tensor:
        """The first ``n`` training rows (for initialising b_dec)."""
        xs, got = [], 0
        for x, _ in self._rows(self.paths, heldout=False, train=True):
            xs.append(x[: n - got])
            got += len(xs[-1])
            if got >= n:
                break
        return torch.from_numpy(np.concatenate(xs))

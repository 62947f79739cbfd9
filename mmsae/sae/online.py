"""Online SAE training (``sae.source: online``): training rows come straight from the subject model's
forward passes over the training corpus (:func:`mmsae.extract.forward.forward_batches`), through the same
shuffle buffer (:class:`mmsae.sae.data.ShuffledStream`) and trainer (:func:`mmsae.sae.trainer.train`)
as cached training, and no activation is ever written to disk. This is how the paper's released code
trains (activations generated on the fly and buffered, never cached).

What is the same as ``sae.source: cache``:

* the held-out split (:func:`mmsae.sae.data.heldout_sample_ids` over the corpus's samples: same ids);
  held-out samples are never trained on, and the held-out metrics come from their activations;
* special tokens (``sae.exclude_special_tokens``; the same ids extraction records in its manifest) and
  the token subsample (``extract.token_fraction``, :func:`mmsae.extract.subsample.token_keep_mask`, a function of
  sample id and position) are left out of training and of the held-out metrics;
* epochs: when the steps need more rows than one pass gives, the corpus is read again in a new order,
  with the buffer's remainder carried over (:meth:`ShuffledStream.train_batches`); the unit whose
  order is drawn is a sample here, a shard there;
* b_dec is initialised from the first ``b_dec_init_tokens`` training rows in corpus order (the cached
  path's first rows in shard order are the same rows);
* the outputs: ``cfg.json``, weights, ``metrics.json`` (with ``source: online``), ``heldout.json``,
  ``log.parquet``.

What differs: the cached path makes one pass over all training tokens before training for their norm
statistics, the ``sae.exclude_norm_above`` threshold and the ``sae.normalize_activations`` scale.
Online, one pass costs a full forward over the corpus, so these come from the **first buffer fill**:
the first ``sae.buffer_tokens`` training rows of epoch 0, in the epoch's order (its samples are drawn
at random, so the fill mixes images and text prompts); ``metrics.json`` records how many rows
(``token_norms_from``).

Resume: a killed online run resumes from its checkpoint (the trainer's); the trainer replays the
stream up to the checkpoint's step, which online means forwarding the model again over the data
already seen (no SAE work). The resumed run trains on the same batches when the model's forward is
deterministic (CPU, same threads); on GPU the replayed activations may differ in the last bits, so a
resumed online run is not guaranteed to be bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Collection, Iterator

import numpy as np
import pyarrow as pa
import torch

from mmsae.data.corpus import Sample
from mmsae.extract.forward import forward_batches
from mmsae.core.io import config_hash
from mmsae.models import SubjectModel
from mmsae.sae.data import ShuffledStream, heldout_sample_ids
from mmsae.sae.norms import norm_stats, row_norms, scaling_factor
from mmsae.sae.run import NormPass, TrainedOn, finish_training
from mmsae.sae.trainer import TrainConfig, train
from mmsae.extract.storage import stored_rows
from mmsae.extract.subsample import fractions_of, is_subsampling

log = logging.getLogger(__name__)


def token_fractions(value: float | dict | None) -> dict | None:
    """``extract.token_fraction`` as ``{"image"|"text"|"answer": share}`` (:func:`mmsae.extract.subsample.fractions_of`),
    or None when every token is kept.

    Raises:
        ValueError: a share outside [0, 1] or an unknown role.
    """
    if value is None:
        return None
    fr = fractions_of(value)
    return fr if is_subsampling(fr) else None


def samples_table(samples: list[Sample]) -> pa.Table:
    """``sample_id``, ``image_path``, ``prompt`` of ``samples`` (what :func:`heldout_sample_ids` reads)."""
    return pa.table({"sample_id": pa.array([s.sample_id for s in samples], pa.string()),
                     "image_path": pa.array([s.image_path for s in samples], pa.string()),
                     "prompt": pa.array([s.prompt for s in samples], pa.string())})


@dataclass
class ModelSource:
    """Where online rows come from.

    Attributes:
        subject: the loaded model (:func:`mmsae.models.load_subject_model`).
        samples: the training corpus (held-out samples included; the split is made here).
        hook_point: module path whose output is trained on.
        batch_size: samples per forward pass (``extract.batch_size``).
        max_image_pixels: larger images are skipped (``extract.max_image_pixels``).
        fractions: token subsample (:func:`token_fractions`), None = every token.
        subsample_seed: seed of :func:`mmsae.extract.subsample.token_keep_mask`.
        identity: what the activations depend on (model, dtype, hook point, corpus and extract keys),
            hashed into the checkpoint.
        stop_at_hook: end each forward at the hooked layer.
    """

    subject: SubjectModel
    samples: list[Sample]
    hook_point: str
    batch_size: int
    max_image_pixels: int | None
    fractions: dict | None
    subsample_seed: int
    identity: dict
    stop_at_hook: bool = True

    @property
    def d_model(self) -> int:
        return self.subject.model.config.get_text_config().hidden_size


@dataclass
class _Seen:
    """Counts over the samples forwarded at least once (for ``metrics.json``'s ``data``)."""

    tokens: dict = field(default_factory=dict)  # sample id -> (n tokens, n image tokens)
    skipped: dict = field(default_factory=dict)  # sample id -> skip record
    forwarded: int = 0  # tokens forwarded, every pass counted
    epochs: int = 0


class OnlineStream(ShuffledStream):
    """Batches ``(x (batch, d_model) float32, is_image (batch,) bool)`` from the model's forward passes,
    with the interface of :class:`mmsae.sae.data.ActivationStream` that the trainer uses.

    Args:
        source: the model and corpus.
        batch_size: rows per training batch.
        seed: shuffling seed (sample order per epoch and the buffer permutation).
        buffer_tokens: shuffle-buffer size in rows (>= 2 x batch_size).
        heldout_ids: sample ids kept out of training.
        exclude_token_ids: token ids left out of training and held-out rows.
        max_norm: training rows with a larger L2 norm are left out; None keeps all.
        scale: training rows are multiplied by this; held-out rows stay raw.

    Raises:
        ValueError: the training split is empty.
    """

    def __init__(self, source: ModelSource, batch_size: int, seed: int, buffer_tokens: int, heldout_ids: Collection[str],
                 exclude_token_ids: list[int] | None = None, max_norm: float | None = None, scale: float = 1.0):
        held = set(heldout_ids)
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.buffer_tokens = max(buffer_tokens, 2 * batch_size)
        self.train_samples = [s for s in source.samples if s.sample_id not in held]
        self.heldout_samples = [s for s in source.samples if s.sample_id in held]
        if not self.train_samples:
            raise ValueError("the training split is empty (all samples held out)")
        self.heldout_ids = sorted(held)
        self.exclude = np.array(sorted(set(exclude_token_ids or [])), dtype=np.int64)
        self.max_norm, self.scale = max_norm, scale
        self.seen = _Seen()
        self._open: list = []

    def identity(self) -> dict:
        """What the stream's content depends on (hashed into the trainer's checkpoint)."""
        return {"online": self.source.identity, "train_samples": config_hash([s.sample_id for s in self.train_samples]),
                "batch_size": self.batch_size, "seed": self.seed, "buffer_tokens": self.buffer_tokens,
                "heldout_ids": config_hash(self.heldout_ids), "exclude": self.exclude.tolist(),
                "max_norm": self.max_norm, "scale": self.scale, "fractions": self.source.fractions,
                "subsample_seed": self.source.subsample_seed}

    def _rows(self, samples: list[Sample], train: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per sample ``(x, is_image)`` of its kept tokens, float32 on the CPU; ``train``: outliers out, scaled.

        The subsample (and, when subsampling, the special tokens dropped with it) is extraction's own
        selection (:func:`mmsae.extract.storage.stored_rows`), so online and cached training see the same rows."""
        src = self.source
        fractions = src.fractions or fractions_of(1.0)
        drop = np.array(src.subject.special_token_ids if src.fractions is not None else [], dtype=np.int64)
        skipped = []
        try:
            for fb in self._forward(samples, skipped):
                for st, cols, _ in stored_rows(fb, fractions, src.subsample_seed, drop, "float32"):
                    self.seen.tokens.setdefault(st.sample.sample_id, (st.n, int((st.layout["modality"] == "image").sum())))
                    self.seen.forwarded += st.n
                    x, is_image = cols["activation"], cols["modality"] == "image"
                    keep = ~np.isin(cols["token_id"], self.exclude)
                    if train and self.max_norm is not None:
                        keep &= row_norms(x) <= self.max_norm
                    if keep.any():
                        x = x[keep]  # a copy: the buffer never holds a view of the model's output
                        yield (x * np.float32(self.scale) if train and self.scale != 1.0 else x), is_image[keep]
        finally:
            for s in skipped:
                self.seen.skipped.setdefault(s["sample_id"], s)

    def _forward(self, samples: list[Sample], skipped: list[dict]) -> Iterator:
        """:func:`forward_batches` over ``samples`` in their order: it puts image samples first, so it is
        called once per run of consecutive image (or text) samples."""
        src, start = self.source, 0
        while start < len(samples):
            end = start + 1
            while end < len(samples) and (samples[end].image_path is None) == (samples[start].image_path is None):
                end += 1
            yield from forward_batches(src.subject, samples[start:end], src.hook_point, src.batch_size, src.max_image_pixels,
                                       skipped, src.stop_at_hook)
            start = end

    def _epoch(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One pass over the training samples in an order drawn from ``rng``."""
        self.seen.epochs += 1
        order = rng.permutation(len(self.train_samples))
        yield from self._rows([self.train_samples[i] for i in order], train=True)

    def train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`ShuffledStream.train_batches`, remembered so that :meth:`heldout` can stop it first: a
        suspended forward loop keeps its hook on the model (which would end the next forward early)."""
        gen = super().train_batches()
        self._open.append(gen)
        return gen

    def _take(self, rows: Iterator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` rows of ``rows`` (stops forwarding once it has them)."""
        xs, ms, got = [], [], 0
        try:
            for x, m in rows:
                xs.append(x[: n - got])
                ms.append(m[: n - got])
                got += len(xs[-1])
                if got >= n:
                    break
        finally:
            rows.close()  # stops the forward loop (and its image-loader thread) now
        if not xs:
            return np.zeros((0, self.source.d_model), np.float32), np.zeros(0, bool)
        return np.concatenate(xs), np.concatenate(ms)

    def first_fill(self) -> tuple[np.ndarray, np.ndarray]:
        """L2 norms (float64) and is_image of the first buffer fill: the first ``buffer_tokens`` training
        rows of epoch 0 in its order, before the outlier rule and scaling."""
        order = np.random.default_rng(self.seed).permutation(len(self.train_samples))  # train_batches' first draw
        rows = self._rows([self.train_samples[i] for i in order], train=False)
        x, m = self._take(rows, self.buffer_tokens)
        if not len(x):
            raise ValueError("the training split is empty (all samples held out or excluded)")
        return row_norms(x), m

    def sample(self, n: int) -> torch.Tensor:
        """The first ``n`` training rows in corpus order (for initialising b_dec), outliers out, scaled."""
        return torch.from_numpy(self._take(self._rows(self.train_samples, train=True), n)[0])

    def heldout(self, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out rows (at most ``max_tokens``, corpus order, outliers included, unscaled) as ``(x, is_image)``."""
        while self._open:
            self._open.pop().close()
        x, m = self._take(self._rows(self.heldout_samples, train=False), max_tokens)
        if not len(x):
            return torch.empty(0), torch.empty(0, dtype=torch.bool)
        return torch.from_numpy(x), torch.from_numpy(m)

    def data_facts(self) -> dict:
        """Counts over the samples forwarded at least once, in the activation manifest's field names."""
        n = np.array(list(self.seen.tokens.values()), np.int64).reshape(-1, 2)
        subject = self.source.subject
        return {"model": subject.name, "hook_point": self.source.hook_point, "d_model": self.source.d_model,
                "n_samples": len(n), "n_tokens": int(n[:, 0].sum()), "n_image_tokens": int(n[:, 1].sum()),
                "n_text_tokens": int(n[:, 0].sum() - n[:, 1].sum()), "n_images_skipped": len(self.seen.skipped),
                "skipped": list(self.seen.skipped.values()), "special_token_ids": subject.special_token_ids,
                "n_shards": 0, "epochs_started": self.seen.epochs, "tokens_forwarded": self.seen.forwarded}


def train_online(source: ModelSource, opts: dict, device: str, ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 log_path: str | os.PathLike | None = None) -> dict:
    """Train the SAE from the model's forward passes and write the outputs of
    :func:`mmsae.sae.run.train_from_manifest` (``metrics.json`` gains ``source: online`` and ``data``,
    the manifest-like counts of what was forwarded).

    Args:
        source: the model and the training corpus.
        opts: the ``sae`` section of the config without ``name``, ``gpus`` and ``source``.
        device: the resolved torch device the SAE trains on (the model stays on its own).

    Raises:
        ValueError: the training split is empty.
    """
    cfg = TrainConfig(**opts, device=device)
    exclude = source.subject.special_token_ids if cfg.exclude_special_tokens else None
    held = heldout_sample_ids(samples_table(source.samples), cfg.heldout_fraction)

    def stream(max_norm=None, scale=1.0) -> OnlineStream:
        return OnlineStream(source, cfg.batch_size, cfg.seed, cfg.buffer_tokens, held, exclude, max_norm, scale)

    norms, is_image = stream().first_fill()
    token_norms = norm_stats(norms, is_image)
    max_norm = cfg.exclude_norm_above * token_norms["all"]["median"] if cfg.exclude_norm_above is not None else None
    kept = norms <= max_norm if max_norm is not None else slice(None)
    scale = scaling_factor(norms[kept], source.d_model) if cfg.normalize_activations == "expected_average_only_in" else 1.0
    log.info("online: %d training and %d held-out samples; statistics from the first buffer fill (%d rows)",
             len(source.samples) - len(held), len(held), len(norms))
    s = stream(max_norm, scale)
    sae, rows, fires = train(s, source.d_model, cfg, ckpt_dir)
    excluded = int((norms > max_norm).sum()) if max_norm is not None else None
    heldout = s.heldout(cfg.heldout_max_tokens)
    extra = {"source": "online", "token_norms_from": {"rows": len(norms), "what": "the first buffer fill of training"},
             "data": s.data_facts()}
    data = TrainedOn(source.d_model, source.subject.name, source.hook_point, held, extra)
    return finish_training(sae, rows, fires, cfg, opts, data, NormPass(token_norms, max_norm, scale, excluded), heldout, out_dir, log_path)

"""What extraction stores of a forward batch: the kept tokens (:mod:`mmsae.extract.subsample`), cast to the
storage type on the model's device, with the counts the manifest reports.

float16: a finite value beyond +-65504 (which the cast would make +-inf) is clamped to +-65504 and
counted (``n_float16_overflow``), as most tools do; a nonzero value that becomes 0 is counted
(``n_float16_underflow``); an inf or NaN that the model itself produced is kept as it is. bfloat16:
the raw 2-byte patterns as uint16 (read back by :func:`mmsae.core.shards.decode_activations`).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from mmsae.extract.forward import ForwardBatch
from mmsae.extract.subsample import ROLES, token_keep_mask, token_roles3

COUNTS = ("n_special_dropped", "n_float16_overflow", "n_float16_underflow")
F16_MAX = 65504.0


def stored_rows(fb: ForwardBatch, fractions: dict, seed: int, drop: np.ndarray, dtype: str) -> Iterator[tuple]:
    """What extraction writes of one forward batch: per sample, its kept tokens cast to the storage type.

    Args:
        fb: a forward batch (:func:`mmsae.extract.forward.forward_batches`).
        fractions: ``{image, text, answer}`` fractions (:func:`mmsae.extract.subsample.token_keep_mask`).
        seed: ``extract.seed``.
        drop: token ids never written (the special tokens when subsampling; empty otherwise).
        dtype: storage type (:func:`to_storage`).

    Yields:
        ``(SampleTokens, columns, counts)``: ``columns`` the shard columns of the kept tokens
        (``activation`` (n_kept, d_model) as stored), ``counts`` the sample's ``seen_<role>``,
        ``written_<role>`` and :data:`COUNTS`.
    """
    keep = torch.zeros(fb.acts.shape[:2], dtype=torch.bool)
    cols, roles = [], []
    for b, st in enumerate(fb.samples):
        c = st.columns()
        drawn = token_keep_mask(st.sample.sample_id, c["token_index"], c["modality"], c["role"], fractions, seed)
        special = np.isin(st.token_ids, drop)
        k = drawn & ~special
        keep[b, :st.n] = torch.from_numpy(k)
        cols.append({name: (v[k] if isinstance(v, np.ndarray) else v) for name, v in c.items()})
        roles.append((token_roles3(c["modality"], c["role"]), k, int((drawn & special).sum())))
    values, over, under = to_storage(fb.acts[keep.to(fb.acts.device)], dtype)
    start = 0
    for st, c, (r, k, n_dropped) in zip(fb.samples, cols, roles):
        n = int(k.sum())
        counts = {"n_special_dropped": n_dropped, "n_float16_overflow": over[start:start + n].sum(),
                  "n_float16_underflow": under[start:start + n].sum()}
        for role in ROLES:
            counts[f"seen_{role}"] = int((r == role).sum())
            counts[f"written_{role}"] = int((r[k] == role).sum())
        yield st, {**c, "activation": values[start:start + n]}, counts
        start += n


def to_storage(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, d_model) activations on the device -> (values as stored, float16 overflows per row, underflows per row).

    float16: a finite value that would become +-inf is clamped to +-65504 and counted; a nonzero value
    that becomes 0 is counted. bfloat16: the raw uint16 bit patterns. The cast runs on the device (half
    the transfer for 2-byte types).
    """
    zeros = np.zeros(len(x), dtype=np.int64)
    if dtype == "float16":
        y = x.to(torch.float16)
        over = torch.isinf(y) & torch.isfinite(x)
        under = (y == 0) & (x != 0)
        y = torch.where(over, torch.full_like(y, F16_MAX).copysign(y), y)
        return y.cpu().numpy(), over.sum(1).cpu().numpy(), under.sum(1).cpu().numpy()
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16), zeros, zeros
    return x.to(torch.float32).cpu().numpy(), zeros, zeros

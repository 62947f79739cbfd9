"""Paper step 3, first half: sparse codes per token.

:func:`code_table` turns the SAE encoder's top-k output for a batch of tokens into code rows (only
the nonzero latents, schema :data:`mmsae.codes.schema.CODE_SCHEMA`, ``codes`` in docs/development.md, 'Table schemas');
both encoders use it: :func:`encode_shards` here (from dense activation shards, e.g. to encode
cached training activations) and :func:`mmsae.codes.encode.encode_corpus` (from the model's forward
passes, what rule ``encode`` runs). This module needs torch but not transformers; the statistics
over the codes (:mod:`mmsae.codes.select`) need neither.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from mmsae.codes.schema import CODE_SCHEMA, META_COLS
from mmsae.core.io import write_json, write_parquet
from mmsae.sae.model import TopKSAE
from mmsae.core.shards import activation_dtype, decode_activations, iter_batches

CODE_ROW_GROUP = 65536


def code_table(vals: np.ndarray, idx: np.ndarray, meta: pa.Table | pa.RecordBatch) -> pa.Table:
    """Code rows of ``n`` tokens: one row ``(token metadata, feature, activation)`` per nonzero latent.

    Args:
        vals: (n, k) float latent values from :meth:`TopKSAE.encode` (post-ReLU, so >= 0).
        idx: (n, k) int latent ids.
        meta: n rows holding :data:`mmsae.codes.schema.META_COLS` (``modality`` plain or dictionary string).

    Returns:
        A table with :data:`~mmsae.codes.schema.CODE_SCHEMA`, tokens in order, each token's latents in
        top-k order; zero latents (a ReLU'd top-k value) are dropped.
    """
    keep = vals > 0
    tok = np.nonzero(keep)[0]
    rows = meta.select(META_COLS).take(pa.array(tok))
    modality = rows.column("modality")
    if pa.types.is_dictionary(modality.type):
        modality = modality.cast(pa.string())
    return pa.table(
        {
            **{c: rows.column(c) for c in META_COLS if c != "modality"},
            "modality": modality,
            "feature": pa.array(idx[keep].astype(np.int32)),
            "activation": pa.array(vals[keep].astype(np.float32)),
        }
    ).select(CODE_SCHEMA.names).cast(CODE_SCHEMA)


@torch.no_grad()
def encode_shards(sae: TopKSAE, shards: list[Path], out_dir: str | os.PathLike, batch_rows: int = 4096, progress: bool = True,
                  exclude_token_ids: tuple[int, ...] = ()) -> dict:
    """Encode every activation shard into a code shard ``codes-NNNNN.parquet`` in ``out_dir``.

    Each token contributes up to k rows ``(…, feature, activation)``; zero activations are dropped,
    and so are tokens whose ``token_id`` is in ``exclude_token_ids`` (the special tokens the SAE was
    trained without, as :func:`mmsae.codes.encode.encode_corpus` leaves them out).
    Returns a manifest ``{"shards": [{"path", "n_rows", "n_tokens", "bytes"}], "n_tokens", "n_image_tokens",
    "n_text_tokens", "n_tokens_excluded"}`` (also written to ``out_dir/manifest.json``).

    Raises:
        mmsae.core.shards.ShardError: an activation shard is unreadable (named in the message).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = sae.W_enc.device
    entries, totals, n_excluded = [], {"image": 0, "text": 0}, 0
    for shard in tqdm(shards, desc="encode", unit="shard", disable=not progress):
        dtype = None
        parts = []
        n_tokens = 0
        for pf, rb in iter_batches(shard, batch_size=batch_rows, columns=META_COLS + ["token_id"] * bool(exclude_token_ids) + ["activation"]):
            dtype = dtype or activation_dtype(pf.schema_arrow, str(shard))
            if exclude_token_ids:
                drop = np.isin(rb.column("token_id").to_numpy(zero_copy_only=False), exclude_token_ids)
                n_excluded += int(drop.sum())
                rb = rb.filter(pa.array(~drop))
            x = torch.from_numpy(decode_activations(rb.column("activation"), dtype))
            vals, idx = sae.encode(x.to(device))
            parts.append(code_table(vals.cpu().numpy(), idx.cpu().numpy(), rb))
            n_tokens += rb.num_rows
            mods = rb.column("modality").to_pylist()
            totals["image"] += mods.count("image")
            totals["text"] += mods.count("text")
        name = "codes-" + shard.stem.split("-")[-1] + ".parquet"
        table = pa.concat_tables(parts) if parts else CODE_SCHEMA.empty_table()
        write_parquet(out_dir / name, table, row_group_size=CODE_ROW_GROUP)
        entries.append({"path": name, "n_rows": table.num_rows, "n_tokens": n_tokens, "bytes": (out_dir / name).stat().st_size})
    manifest = {
        "shards": entries,
        "n_tokens": sum(totals.values()),
        "n_image_tokens": totals["image"],
        "n_text_tokens": totals["text"],
        "n_tokens_excluded": n_excluded,
        "d_sae": sae.d_sae,
        "k": sae.k,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest

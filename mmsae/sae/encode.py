"""Paper step 3, first half: sparse codes per token.

:func:`encode_shards` writes, for every activation shard, a code shard with only the k nonzero
latents of each token (schema :data:`mmsae.features.CODE_SCHEMA`, ``codes`` in ``shared/DESIGN.md``).
It needs torch; the statistics over the codes (:mod:`mmsae.features`) do not.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mmsae.features import CODE_SCHEMA, META_COLS
from mmsae.io import write_json, write_parquet
from mmsae.sae.model import TopKSAE
from mmsae.shards import activation_dtype, decode_activations


@torch.no_grad()
def encode_shards(sae: TopKSAE, shards: list[Path], out_dir: str | os.PathLike, batch_rows: int = 4096, progress: bool = True) -> dict:
    """Encode every activation shard into a code shard ``codes-NNNNN.parquet`` in ``out_dir``.

    Each token contributes up to k rows ``(…, feature, activation)``; zero activations are dropped.
    Returns a manifest ``{"shards": [{"path", "n_rows", "n_tokens"}], "n_tokens", "n_image_tokens",
    "n_text_tokens"}`` (also written to ``out_dir/manifest.json``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = sae.W_enc.device
    entries, totals = [], {"image": 0, "text": 0}
    for shard in tqdm(shards, desc="encode", unit="shard", disable=not progress):
        pf = pq.ParquetFile(shard)
        dtype = activation_dtype(pf.schema_arrow, str(shard))
        parts = []
        n_tokens = 0
        for rb in pf.iter_batches(batch_size=batch_rows, columns=META_COLS + ["activation"]):
            x = torch.from_numpy(decode_activations(rb.column("activation"), dtype))
            vals, idx = sae.encode(x.to(device))
            vals, idx = vals.cpu().numpy(), idx.cpu().numpy()
            keep = vals > 0
            tok = np.nonzero(keep)[0]
            meta = rb.select(META_COLS).take(pa.array(tok))
            modality = meta.column("modality")
            if pa.types.is_dictionary(modality.type):
                modality = modality.cast(pa.string())
            parts.append(
                pa.table(
                    {
                        **{c: meta.column(c) for c in META_COLS if c != "modality"},
                        "modality": modality,
                        "feature": pa.array(idx[keep].astype(np.int32)),
                        "activation": pa.array(vals[keep].astype(np.float32)),
                    }
                ).select(CODE_SCHEMA.names).cast(CODE_SCHEMA)
            )
            n_tokens += rb.num_rows
            mods = rb.column("modality").to_pylist()
            totals["image"] += mods.count("image")
            totals["text"] += mods.count("text")
        name = "codes-" + shard.stem.split("-")[-1] + ".parquet"
        table = pa.concat_tables(parts) if parts else CODE_SCHEMA.empty_table()
        write_parquet(out_dir / name, table, row_group_size=65536)
        entries.append({"path": name, "n_rows": table.num_rows, "n_tokens": n_tokens})
    manifest = {
        "shards": entries,
        "n_tokens": sum(totals.values()),
        "n_image_tokens": totals["image"],
        "n_text_tokens": totals["text"],
        "d_sae": sae.d_sae,
        "k": sae.k,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest

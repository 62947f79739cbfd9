"""Paper step 3, first half, from the model: sparse codes of the interpretation corpus.

The paper's Figure 2 (released code: ``FeatureImageCache``): the interpretation images are forwarded
through the model with the SAE at the hook point and only each token's nonzero latents are kept. Here
the model runs over the samples through :func:`mmsae.extract.forward.forward_batches`, the SAE's encoder is
applied to the hooked layer's output on the model's device in float32, and a folder gets:

* ``codes-NNNNN.parquet``: the k nonzero latents of each token (:data:`mmsae.codes.schema.CODE_SCHEMA`,
  rows made by :func:`mmsae.codes.rows.code_table`, as :func:`~mmsae.codes.rows.encode_shards` makes
  them from dense shards);
* ``samples.parquet``: one row per sample, the columns of extraction's samples table
  (:data:`mmsae.extract.run.SAMPLES_SCHEMA`) plus ``n_base_tokens`` (the sample's base-view image
  tokens, what ``features.rank_by: mean`` divides by) and ``tokens`` (its token strings);
* ``manifest.json``: token counts, d_sae, k, grid side, model, hook point, skipped/converted images.

No dense activation is stored: that is what makes the interpretation side scale (at d_model 4096 a
dense token is 8 KB; its k codes are a few hundred bytes).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from mmsae.extract.run import SAMPLES_SCHEMA
from mmsae.extract.corpus_summary import image_summary, model_meta, vocab_table, with_token_strings
from mmsae.data.corpus import Sample
from mmsae.extract.forward import forward_batches
from mmsae.core.io import write_json, write_parquet
from mmsae.models import SubjectModel, resolve_hook_point
from mmsae.codes.rows import CODE_ROW_GROUP, code_table
from mmsae.sae.io import check_hook_point, trained_without_special_tokens
from mmsae.sae.model import TopKSAE

log = logging.getLogger(__name__)

CODE_SAMPLES_SCHEMA = SAMPLES_SCHEMA.append(pa.field("n_base_tokens", pa.int32()))


@dataclass
class EncodeConfig:
    """What the codes depend on besides the model, the SAE and the samples.

    Attributes:
        hook_point: module path whose output the SAE reads, e.g. ``model.language_model.layers.24``.
        batch_size: samples per forward pass (``encode.batch_size``).
        shard_tokens: a code shard is closed once it holds at least this many tokens (``encode.shard_tokens``).
        base_view_only: keep only base-view (view 0) image tokens and text tokens (``encode.base_view_only``).
        max_image_pixels: images with more pixels are skipped (``extract.max_image_pixels``); None =
            Pillow's limit.
        stop_at_hook: end each forward at the hooked layer.
    """

    hook_point: str
    batch_size: int
    shard_tokens: int
    base_view_only: bool
    max_image_pixels: int | None
    stop_at_hook: bool = True


def kept_tokens(layout: dict, base_view_only: bool) -> np.ndarray:
    """(n,) bool: the tokens whose codes are stored; with ``base_view_only`` only base-view image
    tokens (view 0) and text tokens (anyres tiles and image-newline tokens are left out)."""
    view = np.asarray(layout["view"])
    if not base_view_only:
        return np.ones(len(view), bool)
    return (view == 0) | (np.asarray(layout["modality"]) == "text")


def _meta(cols: dict, keep: np.ndarray) -> pa.Table:
    """The :data:`~mmsae.codes.schema.META_COLS` of a sample's kept tokens; patch coordinates are null
    off the image grid (view < 0), as in the activation shards."""
    view = np.asarray(cols["view"])[keep]
    null = view < 0
    return pa.table({
        "sample_id": pa.array([cols["sample_id"]] * int(keep.sum()), pa.string()),
        "token_index": pa.array(cols["token_index"][keep], pa.int32()),
        "modality": pa.array(np.asarray(cols["modality"])[keep].astype(str), pa.string()),
        "view": pa.array(view, pa.int16()),
        "patch_row": pa.array(np.asarray(cols["patch_row"])[keep], pa.int16(), mask=null),
        "patch_col": pa.array(np.asarray(cols["patch_col"])[keep], pa.int16(), mask=null),
    })


def check_sae(sae: TopKSAE, sae_cfg: dict, hook_point: str, d_model: int) -> None:
    """The SAE must read the hook point's residual stream.

    Raises:
        ValueError: the SAE's ``d_in`` is not the model's d_model, or its ``hook_name`` (top level or
            under ``metadata``; :func:`mmsae.sae.io.check_hook_point`) names another hook point.
    """
    if sae.d_model != d_model:
        raise ValueError(f"the SAE reads d_in={sae.d_model} but the model's hidden size at {hook_point} is {d_model}")
    check_hook_point(sae_cfg, hook_point, "the SAE's cfg.json")


@torch.no_grad()
def encode_corpus(subject: SubjectModel, sae: TopKSAE, sae_cfg: dict, samples: list[Sample], out_dir: str | os.PathLike,
                  cfg: EncodeConfig, config_hash: str, progress: bool = True) -> dict:
    """Run the model over ``samples`` and write their sparse codes, samples table and manifest to ``out_dir``.

    Args:
        subject: the loaded model (:func:`mmsae.models.load_subject_model`).
        sae: the trained SAE, on the model's device (its encoder runs in its own dtype, float32 as saved).
        sae_cfg: the SAE's ``cfg.json`` (checked against the hook point). When it says the SAE was
            trained without the model's special tokens (:func:`mmsae.sae.io.trained_without_special_tokens`),
            they get no codes, so the statistics and top contexts cover the tokens the SAE learned.
        samples: the corpus part to encode.
        out_dir: a fresh folder (files already there with the same names are overwritten).
        cfg: encoding settings.
        config_hash: identifies everything the codes depend on (kept in the manifest).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``): ``shards`` ({path, n_rows, n_tokens, bytes}),
        ``n_samples``, ``n_tokens`` / ``n_image_tokens`` / ``n_text_tokens`` (tokens encoded: after
        ``base_view_only`` and without the excluded special tokens, so feature frequencies are over what
        is stored), ``exclude_token_ids`` and ``n_tokens_excluded`` (tokens left out by id), ``d_sae``, ``k``,
        ``grid_side``, ``model``, ``hook_point``, ``layer``, ``d_model``, ``base_view_only``, the
        skipped and converted images.

    Raises:
        ValueError: bad hook point; the SAE does not fit the hook point; an image's token count
            disagrees with the model's layout.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = subject.model
    resolve_hook_point(model, cfg.hook_point)
    d_model = model.config.get_text_config().hidden_size
    check_sae(sae, sae_cfg, cfg.hook_point, d_model)
    meta = {
        **model_meta(subject, cfg.hook_point),
        "d_sae": sae.d_sae,
        "k": sae.k,
        "base_view_only": cfg.base_view_only,
        "config_hash": config_hash,
    }
    skipped: list[dict] = []
    sample_rows: list[dict] = []
    shards: list[dict] = []
    pending: list[pa.Table] = []
    pending_tokens = 0
    totals = {"image": 0, "text": 0}
    exclude = subject.special_token_ids if trained_without_special_tokens(sae_cfg) else []
    n_excluded = 0
    enc_device = sae.W_enc.device

    def flush() -> None:
        nonlocal pending, pending_tokens
        if not pending:
            return
        table = pa.concat_tables(pending)
        name = f"codes-{len(shards):05d}.parquet"
        write_parquet(out_dir / name, table, row_group_size=CODE_ROW_GROUP)
        shards.append({"path": name, "n_rows": table.num_rows, "n_tokens": pending_tokens,
                       "bytes": (out_dir / name).stat().st_size})  # checked by readers (mmsae.core.shards.shard_paths)
        log.info("wrote %s: %d tokens, %d code rows", name, pending_tokens, table.num_rows)
        pending, pending_tokens = [], 0

    bar = tqdm(total=len(samples), desc="encode", unit="sample", disable=not progress)
    try:
        for fb in forward_batches(subject, samples, cfg.hook_point, cfg.batch_size, cfg.max_image_pixels, skipped,
                                  cfg.stop_at_hook):
            xs, metas = [], []
            for b, st in enumerate(fb.samples):
                cols = st.columns()
                special = np.isin(st.token_ids, exclude)
                keep = kept_tokens(st.layout, cfg.base_view_only) & ~special
                n_excluded += int(special.sum())
                xs.append(fb.acts[b, :st.n][torch.from_numpy(keep).to(fb.acts.device)])
                metas.append(_meta(cols, keep))
                sample_rows.append({**st.sample_row(), "n_base_tokens": int((np.asarray(st.layout["view"]) == 0).sum())})
                mod = np.asarray(cols["modality"])[keep]
                totals["image"] += int((mod == "image").sum())
                totals["text"] += int((mod == "text").sum())
            x = torch.cat(xs).to(enc_device, torch.float32)  # the encoder runs in float32 on the SAE's (the model's) device
            vals, idx = sae.encode(x)
            pending.append(code_table(vals.cpu().numpy(), idx.cpu().numpy(), pa.concat_tables(metas)))
            pending_tokens += x.shape[0]
            if pending_tokens >= cfg.shard_tokens:
                flush()
            bar.update(len(fb.samples))
    finally:
        bar.close()
    flush()
    samples_table = pa.Table.from_pylist(sample_rows, schema=CODE_SAMPLES_SCHEMA)
    samples_table = with_token_strings(samples_table, vocab_table(samples_table, subject.tokenizer.batch_decode))
    write_parquet(out_dir / "samples.parquet", samples_table)
    manifest = {
        **meta,
        "shards": shards,
        "n_shards": len(shards),
        "n_samples": samples_table.num_rows,
        "n_tokens": sum(totals.values()),
        "n_image_tokens": totals["image"],
        "n_text_tokens": totals["text"],
        "exclude_token_ids": sorted(exclude),
        "n_tokens_excluded": n_excluded,
        **image_summary(samples_table),
        "n_images_skipped": len(skipped),
        "skipped": skipped,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


__all__ = ["CODE_SAMPLES_SCHEMA", "EncodeConfig", "check_sae", "encode_corpus", "kept_tokens"]

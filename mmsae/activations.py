"""Paper step 1: run the subject model over the corpus and store one layer's residual stream.

Writes Parquet shards ``shard-NNNNN.parquet`` (schema in ``shared/DESIGN.md``; one row per token,
``activation`` a ``fixed_size_list<float>[d_model]``), a ``samples-NNNNN.parquet`` beside each
(token ids and strings per sample, for reports), and a ``manifest.json`` once every sample is done.
Shards hold whole samples and are written atomically, so a killed run resumes by skipping the
samples already in shards made with the same config hash.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mmsae.data.corpus import Sample, load_image
from mmsae.io import write_json, write_parquet
from mmsae.models import (
    ActivationCapture, SubjectModel, image_token_coordinates, layer_index, prepare_inputs, resolve_hook_point, token_layout,
)
from mmsae.shards import activation_schema, read_shard_meta

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 2048


@dataclass
class ExtractConfig:
    """What extraction depends on (all of it goes into the shards' config hash).

    Attributes:
        hook_point: module path whose output is captured, e.g. ``model.language_model.layers.15``.
        batch_size: samples per forward pass (right-padded; padding tokens are dropped).
        shard_tokens: a shard is closed once it holds at least this many tokens.
        dtype: storage type of activations, ``float32`` or ``float16``.
        stop_at_hook: end each forward at the hooked layer (saves the layers above it).
    """

    hook_point: str
    batch_size: int = 4
    shard_tokens: int = 16384
    dtype: str = "float32"
    stop_at_hook: bool = True


class _ShardWriter:
    def __init__(self, out_dir: Path, schema: pa.Schema, meta: dict, shard_tokens: int, start_index: int):
        self.out_dir, self.meta, self.shard_tokens = out_dir, meta, shard_tokens
        self.schema = schema.with_metadata({"mmsae": json.dumps(meta)})
        self.index = start_index
        self.rows: list[dict] = []
        self.samples: list[dict] = []
        self.n = 0

    def add(self, cols: dict, sample_row: dict) -> None:
        self.rows.append(cols)
        self.samples.append(sample_row)
        self.n += len(cols["token_index"])
        if self.n >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        d = self.meta["d_model"]
        acts = np.concatenate([r["activation"] for r in self.rows]).reshape(-1)
        value_type = self.schema.field("activation").type.value_type
        arrays = {k: np.concatenate([r[k] for r in self.rows]) for k in self.rows[0] if k not in ("activation", "sample_id", "modality")}
        sample_ids = [s for r in self.rows for s in [r["sample_id"]] * len(r["token_index"])]
        modality = np.concatenate([r["modality"] for r in self.rows])
        null_patch = arrays["view"] < 0
        table = pa.table(
            {
                "sample_id": pa.array(sample_ids, pa.string()),
                "token_index": pa.array(arrays["token_index"], pa.int32()),
                "token_id": pa.array(arrays["token_id"], pa.int32()),
                "modality": pa.array(modality, pa.string()).dictionary_encode().cast(pa.dictionary(pa.int8(), pa.string())),
                "view": pa.array(arrays["view"], pa.int16()),
                "patch_row": pa.array(arrays["patch_row"], pa.int16(), mask=null_patch),
                "patch_col": pa.array(arrays["patch_col"], pa.int16(), mask=null_patch),
                "activation": pa.FixedSizeListArray.from_arrays(pa.array(acts, value_type), d),
            },
            schema=self.schema,
        )
        name = f"{self.index:05d}"
        write_parquet(self.out_dir / f"samples-{name}.parquet", pa.Table.from_pylist(self.samples, schema=SAMPLES_SCHEMA))
        write_parquet(self.out_dir / f"shard-{name}.parquet", table, row_group_size=ROW_GROUP_ROWS)
        log.info("wrote shard %s: %d tokens, %d samples", name, self.n, len(self.samples))
        self.index += 1
        self.rows, self.samples, self.n = [], [], 0


SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("prompt", pa.string()),
        ("image_path", pa.string()),
        ("image_status", pa.string()),
        ("image_height", pa.int32()),
        ("image_width", pa.int32()),
        ("n_tokens", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("tokens", pa.list_(pa.string())),
    ]
)


def _grid_side(model) -> int | None:
    vcfg = getattr(model.config, "vision_config", None)
    return vcfg.image_size // vcfg.patch_size if vcfg is not None else None


def _existing_shards(out_dir: Path, chash: str) -> tuple[set[str], int]:
    """Sample ids already stored under the same config hash; removes shards of other configs."""
    done: set[str] = set()
    last = -1
    for shard in sorted(out_dir.glob("shard-*.parquet")):
        idx = int(shard.stem.split("-")[1])
        samples = out_dir / f"samples-{shard.stem.split('-')[1]}.parquet"
        if read_shard_meta(shard).get("config_hash") != chash or not samples.exists():
            log.info("removing %s (made with another config)", shard)
            shard.unlink()
            samples.unlink(missing_ok=True)
            continue
        done.update(pq.read_table(samples, columns=["sample_id"]).column(0).to_pylist())
        last = max(last, idx)
    return done, last + 1


def extract(
    subject: SubjectModel,
    samples: list[Sample],
    out_dir: str | os.PathLike,
    cfg: ExtractConfig,
    config_hash: str,
    progress: bool = True,
) -> dict:
    """Run the model over ``samples`` and write activation shards and a manifest to ``out_dir``.

    Args:
        subject: the loaded model (see :func:`mmsae.models.load_subject_model`).
        samples: the corpus.
        out_dir: directory for shards; existing shards with the same ``config_hash`` are kept and
            their samples skipped (resume), others are deleted.
        cfg: extraction settings.
        config_hash: identifies everything the activations depend on.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``): shards, token counts by modality,
        skipped images with reasons, d_model, hook point.

    Raises:
        ValueError: bad hook point; an image's token count disagrees with the model's layout.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = subject.model
    module = resolve_hook_point(model, cfg.hook_point)
    done, next_index = _existing_shards(out_dir, config_hash)
    todo = [s for s in samples if s.sample_id not in done]
    log.info("%d samples, %d already extracted, %d to do", len(samples), len(samples) - len(todo), len(todo))

    d_model = model.config.get_text_config().hidden_size
    meta = {
        "model": subject.name,
        "revision": getattr(model.config, "_commit_hash", None),
        "hook_point": cfg.hook_point,
        "layer": layer_index(cfg.hook_point),
        "d_model": d_model,
        "dtype": cfg.dtype,
        "config_hash": config_hash,
        "grid_side": _grid_side(model),
    }
    writer = _ShardWriter(out_dir, activation_schema(d_model, cfg.dtype), meta, cfg.shard_tokens, next_index)
    skipped: list[dict] = []
    converted = 0
    np_dtype = np.float16 if cfg.dtype == "float16" else np.float32

    # Group image and text-only samples into separate batches (processors batch one kind at a time).
    ready: list[tuple[Sample, object]] = []
    loaded: list[tuple[Sample, object, str]] = []
    for s in todo:
        if s.image_path is None:
            loaded.append((s, None, ""))
            continue
        img, status = load_image(s.image_path)
        if img is None:
            skipped.append({"sample_id": s.sample_id, "image": s.image_path, "reason": status})
            log.warning("skipping %s (%s): %s", s.sample_id, s.image_path, status)
            continue
        converted += status.startswith("converted")
        loaded.append((s, img, status))
    batches = []
    for kind in (True, False):
        group = [x for x in loaded if (x[1] is not None) == kind]
        batches += [group[i : i + cfg.batch_size] for i in range(0, len(group), cfg.batch_size)]

    bar = tqdm(total=len(loaded), desc="extract", unit="sample", disable=not progress)
    with ActivationCapture(module, stop=cfg.stop_at_hook) as cap, torch.inference_mode():
        for batch in batches:
            inputs = prepare_inputs(subject, [(s, img) for s, img, _ in batch]).to(subject.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            acts = cap.run(model, **inputs).float().cpu().numpy()
            ids = inputs["input_ids"].cpu()
            lengths = inputs["attention_mask"].sum(1).tolist()
            coords = image_token_coordinates(model, inputs["image_sizes"].cpu()) if "image_sizes" in inputs else []
            for b, (s, img, status) in enumerate(batch):
                n = int(lengths[b])
                tok_ids = ids[b, :n]
                layout = token_layout(subject, tok_ids, coords[b] if img is not None else None, s.sample_id)
                writer.add(
                    {
                        "sample_id": s.sample_id,
                        "token_index": np.arange(n, dtype=np.int32),
                        "token_id": tok_ids.numpy().astype(np.int32),
                        **layout,
                        "activation": acts[b, :n].astype(np_dtype),
                    },
                    {
                        "sample_id": s.sample_id,
                        "prompt": s.prompt,
                        "image_path": s.image_path,
                        "image_status": status or None,
                        "image_height": img.size[1] if img is not None else None,
                        "image_width": img.size[0] if img is not None else None,
                        "n_tokens": n,
                        "input_ids": tok_ids.tolist(),
                        "tokens": subject.tokenizer.batch_decode([[i] for i in tok_ids.tolist()]),
                    },
                )
            bar.update(len(batch))
    writer.flush()
    bar.close()
    # Special tokens other than the image placeholder (e.g. <|im_start|>, an attention sink whose norm
    # can be 100x the median) may be left out of SAE training; they are always stored.
    special = [i for i in subject.tokenizer.all_special_ids if i != subject.image_token_id]
    return write_manifest(out_dir, meta, skipped, converted, special)


def write_manifest(out_dir: Path, meta: dict, skipped: list[dict], converted: int, special_ids: list[int]) -> dict:
    """Summarise every shard in ``out_dir`` into ``manifest.json`` (written atomically)."""
    shards = []
    totals = {"image": 0, "text": 0}
    for shard in sorted(out_dir.glob("shard-*.parquet")):
        mod = pq.read_table(shard, columns=["modality"]).column(0).to_pylist()
        counts = {m: mod.count(m) for m in totals}
        totals = {m: totals[m] + counts[m] for m in totals}
        shards.append({"path": shard.name, "n_tokens": len(mod), **{f"n_{m}_tokens": c for m, c in counts.items()}})
    samples = pq.read_table([str(p) for p in sorted(out_dir.glob("samples-*.parquet"))]) if shards else None
    manifest = {
        **meta,
        "shards": shards,
        "n_shards": len(shards),
        "n_samples": samples.num_rows if samples is not None else 0,
        "n_tokens": sum(totals.values()),
        "n_image_tokens": totals["image"],
        "n_text_tokens": totals["text"],
        "n_images_converted": converted,
        "n_images_skipped": len(skipped),
        "skipped": skipped,
        "special_token_ids": sorted(set(special_ids)),
    }
    if samples is not None:
        write_parquet(out_dir / "samples.parquet", samples)
    write_json(out_dir / "manifest.json", manifest)
    return manifest

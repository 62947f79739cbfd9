"""Paper step 1: run the subject model over the corpus and store one layer's residual stream.

Writes, per shard index N, a unit of two Parquet files: ``shard-N.parquet`` (schema in
docs/development.md, 'Table schemas'; one row per token, ``activation`` a ``fixed_size_list<float>[d_model]``) and
then ``samples-N.parquet`` (one row per sample of that shard: prompt, image, status, token ids).
The samples file is written last, so a unit is complete only when both files exist and carry the
run's config hash; its metadata (``mmsae_unit``) records the shard's bytes and rows, and a unit whose
files are unreadable or whose shard no longer has those bytes and rows (nor, when ``manifest.json``
is still there, the bytes and rows it lists for both files) counts as incomplete: it is removed and
its samples are extracted again, into the same shard index, so the result equals an undamaged run. Once every sample is done, ``manifest.json``, ``vocab.parquet`` (each token id
seen, decoded once) and ``samples.parquet`` (all samples, with their token strings for readers) are
written from the complete units only. A killed run resumes by skipping the samples of complete
units with the same config hash; everything else in the folder that extraction writes (units of
another config, half units, hidden temporary files) is removed first.

Token subsampling (``extract.token_fraction`` < 1, :mod:`mmsae.extract.subsample`): only the kept tokens of
each sample are written (a deterministic function of seed, sample id and position, so a resumed or
repartitioned run writes the same rows), and then special tokens other than the image placeholder
(``special_token_ids`` of the manifest, left out of SAE training by ``sae.exclude_special_tokens``) are
dropped before they are written; at fraction 1 everything is stored, as before. The samples tables
still list every token of a sample (``input_ids``), so contexts can be shown whole.

Storage types (``extract.dtype``): float32; float16, where values beyond +-65504 (which would become
inf) are clamped to +-65504 and values that flush to zero are counted (``n_float16_overflow``,
``n_float16_underflow`` in the manifest, per shard and in all; an inf or NaN the model itself produced
is kept as it is); bfloat16, stored as its raw 2-byte patterns (:data:`mmsae.core.shards.STORAGE`).

Before any forward pass the bytes to write are projected (:mod:`mmsae.extract.disk`) and the extraction is
refused when they do not fit in the free space of ``out_dir``'s filesystem (``extract.check_disk``).

Off the forward path: images are decoded one batch ahead in a thread (:mod:`mmsae.extract.forward`), and
shards are encoded and written in another (one shard in flight at most, so memory stays bounded).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from mmsae.extract.corpus_summary import image_summary, model_meta, vocab_table, with_token_strings
from mmsae.data.corpus import Sample
from mmsae.extract.disk import check_free_space, expected_tokens, project_extraction_bytes
from mmsae.extract.forward import forward_batches
from mmsae.core.io import write_json, write_parquet
from mmsae.models import SubjectModel, resolve_hook_point
from mmsae.core.shards import ShardError, check_shard, read_shard_meta, shard_schema
from mmsae.extract.storage import COUNTS, stored_rows
from mmsae.extract.subsample import ROLES, fractions_of, is_subsampling

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 2048
UNIT = re.compile(r"^(shard|samples)-(\d+)\.parquet$")
COUNTS_KEY = "mmsae_counts"  # per-shard counts (tokens seen/written, float16 clamps) in the shard's schema metadata
UNIT_KEY = "mmsae_unit"  # the shard's bytes and rows, in its samples file's schema metadata
# Hidden temporary files of io.atomic_path for what extraction writes (left behind by a kill).
TEMP = re.compile(r"^\.(shard-\d+|samples-\d+|samples|manifest|vocab)\.")
SUMMARY = ("manifest.json", "samples.parquet", "vocab.parquet")


@dataclass
class ExtractConfig:
    """What extraction depends on (all of it goes into the shards' config hash).

    Defaults are those of ``config/schema.yaml`` (section ``extract``).

    Attributes:
        hook_point: module path whose output is captured, e.g. ``model.language_model.layers.15``.
        batch_size: samples per forward pass (right-padded; padding tokens are dropped).
        shard_tokens: a shard is closed once it holds at least this many tokens.
        dtype: storage type of activations, ``float32``, ``float16`` (clamped to +-65504, counted) or
            ``bfloat16`` (raw 2-byte values, see :mod:`mmsae.core.shards`).
        max_image_pixels: images with more pixels (width x height) are skipped as decompression
            bombs; None = Pillow's default limit.
        stop_at_hook: end each forward at the hooked layer (saves the layers above it).
        token_fraction: fraction of tokens kept, one number or ``{image, text, answer}`` (:mod:`mmsae.extract.subsample`).
        seed: seed of the token subsample.
    """

    hook_point: str
    batch_size: int = 1
    shard_tokens: int = 16384
    dtype: str = "float32"
    max_image_pixels: int | None = None
    stop_at_hook: bool = True
    token_fraction: float | dict = 1.0
    seed: int = 0


SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("prompt", pa.string()),
        ("image_path", pa.string()),
        ("image_key", pa.string()),
        ("image_status", pa.string()),
        ("image_height", pa.int32()),
        ("image_width", pa.int32()),
        ("n_tokens", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
    ]
)


class _ShardWriter:
    """Collects whole samples; each full shard is encoded and written (shard, then samples) in a thread."""

    def __init__(self, out_dir: Path, schema: pa.Schema, meta: dict, shard_tokens: int, indices: Iterator[int]):
        self.out_dir, self.meta, self.shard_tokens = out_dir, meta, shard_tokens
        self.schema = schema.with_metadata({"mmsae": json.dumps(meta)})
        self.samples_schema = SAMPLES_SCHEMA.with_metadata({"mmsae": json.dumps(meta)})
        self.indices = indices  # free shard indices, in order (clean_outdated)
        self.index = next(indices)
        self.rows: list[dict] = []
        self.samples: list[dict] = []
        self.n = 0
        self.counts: dict = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: Future | None = None

    def add(self, cols: dict, sample_row: dict, counts: dict) -> None:
        self.rows.append(cols)
        self.samples.append(sample_row)
        self.n += len(cols["token_index"])
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + int(v)
        if self.n >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.wait()
        self._pending = self._pool.submit(self._write, self.index, self.rows, self.samples, self.n, self.counts)
        self.index = next(self.indices)
        self.rows, self.samples, self.n, self.counts = [], [], 0, {}

    def wait(self) -> None:
        """Block until the shard in flight is on disk (re-raising its error)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self.flush()
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def _write(self, index: int, rows: list[dict], samples: list[dict], n: int, counts: dict) -> None:
        d = self.meta["d_model"]
        acts = np.concatenate([r["activation"] for r in rows]).reshape(-1)
        value_type = self.schema.field("activation").type.value_type
        arrays = {k: np.concatenate([r[k] for r in rows]) for k in ("token_index", "token_id", "view", "patch_row", "patch_col")}
        lengths = [len(r["token_index"]) for r in rows]
        sample_ids = pa.DictionaryArray.from_arrays(np.repeat(np.arange(len(rows), dtype=np.int32), lengths),
                                                    pa.array([r["sample_id"] for r in rows], pa.string())).cast(pa.string())
        modality = np.concatenate([r["modality"] for r in rows]) == "image"
        assistant = np.concatenate([r["role"] for r in rows]) == "assistant"
        null_patch = arrays["view"] < 0
        table = pa.table(
            {
                "sample_id": sample_ids,
                "token_index": pa.array(arrays["token_index"], pa.int32()),
                "token_id": pa.array(arrays["token_id"], pa.int32()),
                "modality": pa.DictionaryArray.from_arrays(pa.array(modality.astype(np.int8)), pa.array(["text", "image"])),
                "view": pa.array(arrays["view"], pa.int16()),
                "patch_row": pa.array(arrays["patch_row"], pa.int16(), mask=null_patch),
                "patch_col": pa.array(arrays["patch_col"], pa.int16(), mask=null_patch),
                "activation": pa.FixedSizeListArray.from_arrays(pa.array(acts, value_type), d),
                "role": pa.DictionaryArray.from_arrays(pa.array(assistant.astype(np.int8)), pa.array(["user", "assistant"])),
            },
            schema=self.schema.with_metadata({**self.schema.metadata, COUNTS_KEY: json.dumps(counts)}),
        )
        name = f"{index:05d}"
        # activations: byte-stream-split, no dictionary (measured on the demo model's shards: 30% smaller for
        # float32, 14% for float16 and bfloat16 than the default dictionary encoding, and faster to write and read)
        write_parquet(self.out_dir / f"shard-{name}.parquet", table, row_group_size=ROW_GROUP_ROWS,
                      use_dictionary=[n for n in table.column_names if n != "activation"],
                      use_byte_stream_split=["activation.list.element"])
        shard = self.out_dir / f"shard-{name}.parquet"
        unit = {"shard_bytes": shard.stat().st_size, "shard_rows": table.num_rows}
        schema = self.samples_schema.with_metadata({**self.samples_schema.metadata, UNIT_KEY: json.dumps(unit)})
        write_parquet(self.out_dir / f"samples-{name}.parquet", pa.Table.from_pylist(samples, schema=schema))
        log.info("wrote shard %s: %d tokens, %d samples", name, n, len(samples))


def _unit_problem(shard: Path, samples: Path, chash: str | None, entry: dict | None) -> str | None:
    """Why the unit ``(shard, samples)`` is not complete and sound, or None when it is."""
    if not samples.exists():
        return "no samples file"
    try:
        shard_md = check_shard(shard, entry and {"bytes": entry.get("bytes"), "n_rows": entry.get("n_tokens")})
        check_shard(samples, entry and {"bytes": entry.get("samples_bytes"), "n_rows": entry.get("samples_rows")})
        if chash is not None and (read_shard_meta(shard).get("config_hash") != chash
                                  or read_shard_meta(samples).get("config_hash") != chash):
            return "another config"
        unit = json.loads((pq.read_schema(samples).metadata or {}).get(UNIT_KEY.encode(), b"{}"))
    except ShardError as exc:
        return str(exc)
    if unit and (shard.stat().st_size != unit["shard_bytes"] or shard_md.num_rows != unit["shard_rows"]):
        return (f"{shard}: {shard.stat().st_size} bytes and {shard_md.num_rows} rows, but its samples file recorded "
                f"{unit['shard_bytes']} and {unit['shard_rows']}")
    return None


def _manifest_entries(out_dir: Path) -> dict[str, dict]:
    """The shard entries of ``out_dir/manifest.json`` by file name ({} when missing or unreadable)."""
    try:
        return {e["path"]: e for e in json.loads((out_dir / "manifest.json").read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def complete_units(out_dir: Path, chash: str | None = None, entries: dict[str, dict] | None = None) -> list[tuple[Path, Path]]:
    """``(shard, samples)`` pairs in ``out_dir`` that are complete and sound (and made with
    ``chash``, if given): both files readable, the shard with the bytes and rows its samples file
    recorded, and, for a shard in ``entries`` (a manifest's entries by name), both files with the
    bytes and rows listed there. Damaged units are logged (naming the file) and left out."""
    units = []
    for shard in sorted(out_dir.glob("shard-*.parquet")):
        samples = out_dir / shard.name.replace("shard-", "samples-")
        problem = _unit_problem(shard, samples, chash, (entries or {}).get(shard.name))
        if problem is None:
            units.append((shard, samples))
        elif problem not in ("no samples file", "another config"):
            log.warning("unit %s is damaged, its samples will be extracted again: %s", shard.name, problem)
    return units


def clean_outdated(out_dir: Path, chash: str) -> tuple[set[str], Iterator[int]]:
    """Keep only complete, sound units made with ``chash``; remove every other file extraction writes.

    Removed: units of another config hash, a shard without its samples file (or the reverse),
    damaged units (:func:`complete_units`, checked also against ``manifest.json`` when it is
    there), hidden temporary files left by a kill, and the summary files (rewritten at the end).

    Returns:
        (sample ids already extracted, the free shard indices in order: the gaps left by removed
        units first, so redone samples land where they were, then those after the last kept unit).
    """
    keep = complete_units(out_dir, chash, _manifest_entries(out_dir))
    kept = {p.name for unit in keep for p in unit}
    done: set[str] = set()
    for shard, samples in keep:
        try:
            ids = pq.read_table(samples, columns=["sample_id"]).column(0).to_pylist()
            in_shard = pc.unique(pq.read_table(shard, columns=["sample_id"]).column(0)).to_pylist()
        except (OSError, ValueError, pa.ArrowException) as exc:
            log.warning("unit %s is damaged, its samples will be extracted again: %s: %s", shard.name, shard, exc)
            kept -= {shard.name, samples.name}
            continue
        if not set(in_shard) <= set(ids):  # cannot happen with files written here; be safe (a subsample may write no row of a sample)
            log.warning("removing %s: its samples file disagrees with it", shard.name)
            kept -= {shard.name, samples.name}
            continue
        done.update(ids)
    used = set()
    for path in sorted(out_dir.iterdir()):
        name = path.name
        if name in kept:
            used.add(int(UNIT.match(name).group(2)))
        elif UNIT.match(name) or TEMP.match(name) or name in SUMMARY:
            log.info("removing %s (another config, an unfinished or damaged unit, or a summary to rewrite)", name)
            path.unlink()
    last = max(used, default=-1)
    free = itertools.chain((i for i in range(last) if i not in used), itertools.count(last + 1))
    return done, free


def extract(
    subject: SubjectModel,
    samples: list[Sample],
    out_dir: str | os.PathLike,
    cfg: ExtractConfig,
    config_hash: str,
    progress: bool = True,
    check_disk: bool = True,
    disk_parts: int = 1,
) -> dict:
    """Run the model over ``samples`` and write activation shards and a manifest to ``out_dir``.

    Args:
        subject: the loaded model (see :func:`mmsae.models.load_subject_model`).
        samples: the corpus.
        out_dir: directory for shards; complete units with the same ``config_hash`` are kept and
            their samples skipped (resume), every other file extraction writes is deleted.
        cfg: extraction settings.
        config_hash: identifies everything the activations depend on.
        check_disk: ``extract.check_disk``: refuse before any forward pass when the projected bytes of
            the samples still to do, times ``disk_parts``, exceed the free space of ``out_dir`` (less 5%).
        disk_parts: parts of the corpus that may be extracted at once onto the same disk (``extract.parts``).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``): shards, token counts by modality,
        skipped images with reasons, d_model, hook point, tokens seen and written per role, float16
        clamps, projected and actual bytes.

    Raises:
        ValueError: bad hook point; an image's token count disagrees with the model's layout; bad
            token fractions.
        mmsae.extract.disk.DiskSpaceError: the projection does not fit (``check_disk``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = subject.model
    resolve_hook_point(model, cfg.hook_point)  # a bad hook point fails before any file is touched
    done, free_indices = clean_outdated(out_dir, config_hash)
    todo = [s for s in samples if s.sample_id not in done]
    log.info("%d samples, %d already extracted, %d to do", len(samples), len(samples) - len(todo), len(todo))

    d_model = model.config.get_text_config().hidden_size
    fractions = fractions_of(cfg.token_fraction)
    est = expected_tokens(subject, samples)
    proj = {"text_tokens": est["text_tokens"], "image_tokens": est["image_tokens"], "d_model": d_model, "dtype": cfg.dtype,
            "fraction": fractions}
    projected = project_extraction_bytes(est["n_image_samples"], est["n_text_samples"], **proj)
    n_todo_image = sum(s.image_path is not None for s in todo)
    needed = project_extraction_bytes(n_todo_image, len(todo) - n_todo_image, **proj) * disk_parts
    if check_disk and todo:
        free = check_free_space(needed, out_dir)
        log.info("disk: about %d bytes to write (x%d parts), %d free", needed, disk_parts, free)
    meta = {
        **model_meta(subject, cfg.hook_point),
        "dtype": cfg.dtype,
        "config_hash": config_hash,
        "token_fraction": fractions,
        "seed": cfg.seed,
    }
    writer = _ShardWriter(out_dir, shard_schema(d_model, cfg.dtype), meta, cfg.shard_tokens, free_indices)
    skipped: list[dict] = []

    # Special tokens other than the image placeholder (e.g. <|im_start|>, an attention sink whose norm
    # can be 100x the median) may be left out of SAE training; they are stored unless subsampling.
    special = subject.special_token_ids
    drop = np.array(special if is_subsampling(fractions) else [], dtype=np.int64)
    bar = tqdm(total=len(todo), desc="extract", unit="sample", disable=not progress)
    try:
        for fb in forward_batches(subject, todo, cfg.hook_point, cfg.batch_size, cfg.max_image_pixels, skipped,
                                  cfg.stop_at_hook):
            for st, cols, counts in stored_rows(fb, fractions, cfg.seed, drop, cfg.dtype):
                writer.add(cols, st.sample_row(), counts)
            bar.update(len(fb.samples))
    finally:
        bar.close()
    writer.close()
    extra = {"projected_bytes": projected}
    return write_manifest(out_dir, meta, skipped, special, subject.tokenizer.batch_decode, extra)


def write_manifest(out_dir: Path, meta: dict, skipped: list[dict], special_ids: list[int], decode,
                   extra: dict | None = None) -> dict:
    """Summarise the complete units in ``out_dir`` into ``manifest.json``, ``vocab.parquet`` and ``samples.parquet``.

    Every count comes from the stored tables (so a resumed run counts what an uninterrupted one
    would). ``vocab.parquet`` maps each token id seen to its string, decoded once; ``samples.parquet``
    gets a ``tokens`` column (list of strings per sample) built from it for readers.

    Args:
        decode: ``tokenizer.batch_decode``, called once on every distinct token id.
        extra: further manifest fields (e.g. ``projected_bytes``); ``actual_bytes`` (every file in
            ``out_dir`` but the manifest) is added here.
    """
    units = complete_units(out_dir, meta["config_hash"])
    shards = []
    totals = {"image": 0, "text": 0}
    seen, written, counted = dict.fromkeys(ROLES, 0), dict.fromkeys(ROLES, 0), dict.fromkeys(COUNTS, 0)
    for shard, samples_file in units:
        unit = json.loads((pq.read_schema(shard).metadata or {}).get(COUNTS_KEY.encode(), b"{}"))
        for r in ROLES:
            seen[r] += unit.get(f"seen_{r}", 0)
            written[r] += unit.get(f"written_{r}", 0)
        for k in COUNTS:
            counted[k] += unit.get(k, 0)
        mod = pq.read_table(shard, columns=["modality"]).column(0)
        counts = pc.value_counts(mod.combine_chunks().cast(pa.string()))
        counts = {c["values"].as_py(): c["counts"].as_py() for c in counts}
        counts = {m: counts.get(m, 0) for m in totals}
        totals = {m: totals[m] + counts[m] for m in totals}
        shards.append({"path": shard.name, "n_tokens": len(mod), **{f"n_{m}_tokens": c for m, c in counts.items()},
                       **{k: unit.get(k, 0) for k in COUNTS if k.startswith("n_float16")},
                       "bytes": shard.stat().st_size, "samples_bytes": samples_file.stat().st_size,
                       "samples_rows": pq.read_metadata(samples_file).num_rows})
    samples = pa.concat_tables([pq.read_table(s).replace_schema_metadata() for _, s in units]) if units else \
        SAMPLES_SCHEMA.empty_table()
    manifest = {
        **meta,
        "shards": shards,
        "n_shards": len(shards),
        "n_samples": samples.num_rows,
        "n_tokens": sum(totals.values()),
        "n_image_tokens": totals["image"],
        "n_text_tokens": totals["text"],
        **image_summary(samples),
        "n_images_skipped": len(skipped),
        "skipped": skipped,
        "special_token_ids": sorted(set(special_ids)),
        "tokens_seen": seen,
        "tokens_written": written,
        **counted,
        **(extra or {}),
    }
    vocab = vocab_table(samples, decode)
    write_parquet(out_dir / "vocab.parquet", vocab)
    write_parquet(out_dir / "samples.parquet", with_token_strings(samples, vocab))
    manifest["actual_bytes"] = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file() and p.name != "manifest.json")
    write_json(out_dir / "manifest.json", manifest)
    return manifest

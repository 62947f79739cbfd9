"""Activation and code shards on disk: schema, metadata, manifests, streamed reading.

A manifest's shard entries record each file's size (``bytes``) and rows (``n_rows``, or for
activation shards ``n_tokens``); :func:`shard_paths` checks them, and every reader error here is a
:class:`ShardError` naming the file, so a truncated or replaced shard is reported as such instead of
as a bare Parquet error.

Kept apart from :mod:`mmsae.extract.run` so that stages that only read shards (SAE training,
encoding, selection) need neither transformers nor image libraries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmsae.core.io import write_json, write_parquet


# Storage types of ``activation`` and their Arrow value types. Arrow has no bfloat16: its raw 2-byte
# values (the top half of the float32 bit pattern) are stored as uint16, and the field's metadata
# ``mmsae_dtype`` says how to read them back (:func:`decode_activations`).
STORAGE = {"float32": pa.float32(), "float16": pa.float16(), "bfloat16": pa.uint16()}
DTYPE_KEY = b"mmsae_dtype"


def activation_schema(d_model: int, dtype: str = "float32") -> pa.Schema:
    """Arrow schema of an activation shard (``dtype`` is the storage type of ``activation``: float32,
    float16, or bfloat16 stored as uint16 with field metadata ``mmsae_dtype: bfloat16``).

    Raises:
        ValueError: an unknown storage type.
    """
    if dtype not in STORAGE:
        raise ValueError(f"activation storage type {dtype!r}: expected one of {sorted(STORAGE)}")
    field = pa.field("activation", pa.list_(STORAGE[dtype], d_model), metadata={DTYPE_KEY: dtype.encode()})
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("token_index", pa.int32()),
            ("token_id", pa.int32()),
            ("modality", pa.dictionary(pa.int8(), pa.string())),
            ("view", pa.int16()),
            ("patch_row", pa.int16()),
            ("patch_col", pa.int16()),
            field,
        ]
    )


def shard_schema(d_model: int, dtype: str) -> pa.Schema:
    """Schema of the shards extraction writes: :func:`activation_schema` plus ``role``.

    ``role`` (dictionary string) is ``assistant`` for the tokens of an assistant turn's text (training
    conversations, see :func:`mmsae.models.token_roles`) and ``user`` for every other token. Readers
    must not require it: shards written by other tools (or older versions) may lack it.
    """
    return activation_schema(d_model, dtype).append(pa.field("role", pa.dictionary(pa.int8(), pa.string())))


class ShardError(ValueError):
    """A shard (or a file of its unit) that is missing, unreadable, or not what its manifest
    recorded; the message starts with the file's path."""


_READ_ERRORS = (OSError, ValueError, pa.ArrowException)  # what pyarrow raises on a damaged file


def expected_rows(entry: dict) -> int | None:
    """The row count a manifest's shard entry records: ``n_rows`` (code shards), else ``n_tokens``
    (activation shards hold one row per token); None when it records neither."""
    return entry.get("n_rows", entry.get("n_tokens"))


def check_shard(path: str | os.PathLike, entry: dict | None = None) -> pq.FileMetaData:
    """Check that ``path`` is a readable Parquet file with the size and rows its manifest ``entry``
    recorded (``bytes``, :func:`expected_rows`; each checked only when recorded).

    Returns:
        The file's Parquet metadata (footer).

    Raises:
        ShardError: missing, another size, unreadable footer, or another row count; the message
            names the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ShardError(f"{path}: missing ({exc.strerror})") from exc
    if entry and entry.get("bytes") is not None and size != entry["bytes"]:
        raise ShardError(f"{path}: {size} bytes, but its manifest recorded {entry['bytes']} (truncated or replaced)")
    try:
        md = pq.read_metadata(path)
    except _READ_ERRORS as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc})") from exc
    rows = expected_rows(entry) if entry else None
    if rows is not None and md.num_rows != rows:
        raise ShardError(f"{path}: {md.num_rows} rows, but its manifest recorded {rows}")
    return md


def read_shard_meta(path: str | os.PathLike) -> dict:
    """The ``mmsae`` metadata of an activation shard (model, hook point, d_model, config hash...).

    Raises:
        ShardError: the file is missing or unreadable (named in the message).
    """
    try:
        meta = pq.read_schema(path).metadata or {}
    except _READ_ERRORS as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc})") from exc
    return json.loads(meta.get(b"mmsae", b"{}"))


def shard_paths(manifest_path: str | os.PathLike, check: bool = True) -> list[Path]:
    """Absolute paths of the shards listed in an activation (or code) manifest.

    With ``check`` each shard is checked against its entry (:func:`check_shard`: present, readable,
    same bytes and rows), reading only its footer.

    Raises:
        ShardError: a damaged shard, named with the manifest and what to rerun.
    """
    manifest_path = Path(manifest_path)
    manifest = json.loads(manifest_path.read_text())
    paths = []
    for entry in manifest["shards"]:
        path = manifest_path.parent / entry["path"]
        if check:
            try:
                check_shard(path, entry)
            except ShardError as exc:
                raise ShardError(f"{exc} [listed in {manifest_path}; rerun the rule that wrote it: "
                                 "extraction (and encoding) redo exactly the samples of damaged shards]") from exc
        paths.append(path)
    return paths


def iter_batches(path: str | os.PathLike, **kwargs) -> Iterator[tuple[pq.ParquetFile, pa.RecordBatch]]:
    """``(file, record batch)`` of a Parquet file (``kwargs`` go to ``ParquetFile.iter_batches``),
    with every read error raised as a :class:`ShardError` naming the file."""
    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(**kwargs)
    except _READ_ERRORS as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc})") from exc
    while True:
        try:
            rb = next(batches)
        except StopIteration:
            return
        except _READ_ERRORS as exc:
            raise ShardError(f"{path}: read failed ({exc})") from exc
        yield pf, rb


def activation_dtype(schema: pa.Schema, where: str = "shard") -> str:
    """The storage type of a shard's ``activation`` column: the field's ``mmsae_dtype`` metadata when
    present (files written here), else the Arrow value type (float32 / float16 from other tools).

    Raises:
        ValueError: no ``activation`` column, or uint16 values without ``mmsae_dtype`` (raw 2-byte
            values that cannot be read without knowing their type); the message names ``where``.
    """
    if "activation" not in schema.names:
        raise ValueError(f"{where}: no 'activation' column (columns: {schema.names})")
    field = schema.field("activation")
    tagged = (field.metadata or {}).get(DTYPE_KEY)
    if tagged is not None:
        return tagged.decode()
    value = field.type.value_type
    for name, t in STORAGE.items():
        if value == t and name != "bfloat16":
            return name
    raise ValueError(f"{where}: activation values of type {value} without field metadata 'mmsae_dtype' "
                     f"cannot be read (expected {sorted(STORAGE)})")


def decode_activations(column: pa.Array | pa.ChunkedArray, dtype: str) -> np.ndarray:
    """A shard's ``activation`` column -> (n, d_model) float32, exactly (every reader goes through here).

    float32 and float16 values are converted by value; bfloat16 (stored as uint16) is widened bit for
    bit (``uint32(v) << 16`` reinterpreted as float32), so a bfloat16 tensor written by extraction reads
    back equal to ``tensor.float()``. The result is always writable (a float32 column read zero-copy
    from Arrow is a read-only buffer, and is copied), so ``torch.from_numpy`` may take it.

    Args:
        column: a fixed-size list array (n rows of d_model values), as read from a shard.
        dtype: its storage type (:func:`activation_dtype`).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    d = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    if dtype == "bfloat16":
        return (flat.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(-1, d)
    out = flat.astype(np.float32, copy=False)
    return (out if out.flags.writeable else out.copy()).reshape(-1, d)


def iter_activations(
    paths: list[Path], batch_rows: int = 4096, columns: tuple[str, ...] = ("modality", "token_id")
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Stream ``(activations [n, d_model] float32, {column: array [n]})`` from shards, in order.

    Memory is bounded by ``batch_rows`` whatever the number or size of shards.

    Raises:
        ShardError: a shard is unreadable (named in the message).
    """
    for path in paths:
        dtype = None
        for pf, rb in iter_batches(path, batch_size=batch_rows, columns=["activation", *columns]):
            dtype = dtype or activation_dtype(pf.schema_arrow, str(path))
            x = decode_activations(rb.column("activation"), dtype)
            cols = {}
            for c in columns:
                col = rb.column(c)
                if pa.types.is_dictionary(col.type):
                    col = col.cast(pa.string())
                cols[c] = col.to_numpy(zero_copy_only=False)
            yield x, cols


def _read_table(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except _READ_ERRORS as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({exc})") from exc


def merge_manifests(parts: list[str | os.PathLike], out: str | os.PathLike, samples: bool = True) -> dict:
    """One manifest over several part manifests (activations or codes) in subfolders of ``out``'s folder.

    Shard paths become relative to ``out``; token, sample, byte and float16-clamp counts are summed, skipped images
    concatenated; with ``samples``, the parts' ``samples.parquet`` are concatenated beside ``out``.
    Every other field must agree across parts (e.g. d_model, hook point, k).

    Each part's shards are checked against its entries (:func:`check_shard`) first.

    Raises:
        ValueError: the parts disagree on a field that is not summed.
        ShardError: a part's shard or samples table is damaged (named in the message).
    """
    out = Path(out)
    summed = {"n_samples", "n_tokens", "n_image_tokens", "n_text_tokens", "n_images_converted", "n_images_skipped", "n_images_used",
              "n_shards", "n_special_dropped", "n_tokens_excluded", "n_float16_overflow", "n_float16_underflow", "projected_bytes", "actual_bytes"}
    summed_by_key = {"tokens_seen", "tokens_written"}  # {role: count}, summed role by role
    merged: dict = {"shards": [], "skipped": [], "converted": [], "parts": []}
    for part in map(Path, parts):
        m = json.loads(part.read_text())
        shard_paths(part)  # a damaged shard fails here, named, not in a later stage
        rel = part.parent.relative_to(out.parent)
        merged["parts"].append(str(rel))
        merged["shards"] += [{**s, "path": str(rel / s["path"])} for s in m["shards"]]
        merged["skipped"] += m.get("skipped", [])
        merged["converted"] += m.get("converted", [])
        for k, v in m.items():
            if k in ("shards", "skipped", "converted", "config_hash"):
                continue
            if k in summed:
                merged[k] = merged.get(k, 0) + v
            elif k in summed_by_key:
                merged[k] = {r: merged.get(k, {}).get(r, 0) + n for r, n in v.items()}
            elif k in merged and merged[k] != v:
                raise ValueError(f"{part}: {k}={v!r} differs from the other parts ({merged[k]!r})")
            else:
                merged[k] = v
    merged["n_shards"] = len(merged["shards"])
    if samples:
        tables = [_read_table(Path(p).parent / "samples.parquet") for p in parts if (Path(p).parent / "samples.parquet").exists()]
        if tables:
            write_parquet(out.parent / "samples.parquet", pa.concat_tables(tables))
    write_json(out, merged)
    return merged

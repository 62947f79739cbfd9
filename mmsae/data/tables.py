"""Table corpora, read as a stream: rows of (image, prompt[, response]) or LLaVA-format conversations.

Forms of ``corpus.path`` (``source: table``):

* a ``.parquet`` or ``.csv`` table with columns ``image`` (a path relative to the table, or empty for
  a text-only row) and ``prompt``; an optional ``response`` column is the assistant's answer;
* LLaVA instruction-tuning records, as a JSON list (``.json``), one record per line (``.jsonl``)::

    {"id": "000001", "image": "coco/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A cup of coffee."}, ...]}

* the same records as published on the Hub (``lmms-lab/LLaVA-NeXT-Data``): Parquet files with
  columns ``id``, ``conversations`` (list of struct ``from``/``value``), ``data_source`` and ``image``
  (the ``datasets`` Image feature, struct ``bytes``/``path``; null for a text-only row). ``path`` may
  be one such file, a directory (every ``*.parquet`` under it, in name order) or a glob
  (``data/train-*.parquet``). The image stays in the file: the row's image is the reference
  ``<file>#row=<i>`` (:mod:`mmsae.data.parquet_images`), decoded from its bytes only when loaded.

``human`` turns become ``user`` turns and ``gpt`` turns ``assistant`` turns; the ``<image>``
placeholder is removed from the text (the image always comes first in the first user turn).

Memory is flat in rows: :func:`iter_table` is a generator over Parquet batches
(``ParquetFile.iter_batches``), JSON records (``ijson``, incremental) and JSONL lines; only a CSV is
read whole (polars). The image bytes of a Parquet row are never read here (only the ``image``
struct's validity, through its ``path`` leaf).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mmsae.data.parquet_images import image_ref

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TABLE_SUFFIXES = (".parquet", ".csv", ".json", ".jsonl")
BATCH_ROWS = 1024  # Parquet rows per batch while streaming (conversations only: no image bytes)


@dataclass(frozen=True)
class Row:
    """One table row: image path or :func:`~mmsae.data.parquet_images.image_ref` (or None), the first
    user prompt, and the turns after it."""

    image: str | None
    prompt: str
    turns: tuple[tuple[str, str], ...] = ()


def _image_path(table: Path, image) -> str | None:
    if image is None or str(image) == "":
        return None
    image = str(image)
    return image if os.path.isabs(image) else str(table.parent / image)


def _conversation(where: str, conv, image: str | None) -> Row:
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list")
    turns = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: conversations[{j}] is not a {{from, value}} record: {turn!r:.80}")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(f"{where}: conversations[{j}].from={turn.get('from')!r} is not one of human, gpt")
        text = str(turn.get("value") or "").replace("<image>", "").strip()
        turns.append((role, text))
    if turns[0][0] != "user":
        raise ValueError(f"{where}: the conversation must start with a human turn")
    return Row(image, turns[0][1], tuple(turns[1:]))


def table_files(path: str | os.PathLike) -> list[Path]:
    """The table files ``path`` names: the file itself, every table file under a directory, or a glob's matches.

    Raises:
        FileNotFoundError: nothing exists or matches (the message names ``path``).
        ValueError: a file without a table suffix (.parquet, .csv, .json, .jsonl).
    """
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TABLE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"corpus.path: directory {p} holds no {'/'.join(TABLE_SUFFIXES)} files")
    elif glob.has_magic(str(p)):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"corpus.path: the glob {p} matches no files")
    else:
        raise FileNotFoundError(f"corpus.path: table {p} does not exist")
    bad = [str(f) for f in files if f.suffix not in TABLE_SUFFIXES]
    if bad:
        raise ValueError(f"corpus.path: {bad[:5]} are not tables ({', '.join(TABLE_SUFFIXES)})")
    return files


def iter_table(path: str | os.PathLike) -> Iterator[Row]:
    """Rows of the corpus table(s) at ``path`` (a file, a directory or a glob: :func:`table_files`), lazily.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, or a malformed conversation (naming the file, record and field).
    """
    for f in table_files(path):
        if f.suffix == ".parquet":
            yield from _parquet_rows(f)
        elif f.suffix == ".csv":
            yield from _csv_rows(f)
        elif f.suffix == ".jsonl":
            yield from _jsonl_rows(f)
        else:
            yield from _json_rows(f)


def read_table(path: str | os.PathLike) -> list[Row]:
    """All rows of :func:`iter_table` as a list (small tables; a large one should be iterated)."""
    return list(iter_table(path))


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8") as f:
        i = 0
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"corpus table {path}: line {n} is not JSON ({exc})") from None
            yield _record(path, i, record)
            i += 1


def _json_rows(path: Path) -> Iterator[Row]:
    import ijson  # incremental parser: one record in memory at a time

    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
        if not head.startswith(b"["):
            raise ValueError(f"corpus table {path}: a .json corpus must be a list of records ([{{...}}, ...])")
        f.seek(0)
        i = 0
        try:
            for record in ijson.items(f, "item", use_float=True):
                yield _record(path, i, record)
                i += 1
        except ijson.JSONError as exc:
            raise ValueError(f"corpus table {path}: malformed JSON after record {i} ({exc})") from None


def _record(path: Path, i: int, record) -> Row:
    where = f"corpus table {path}: record {i}"
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not an object: {record!r:.80}")
    return _conversation(where, record.get("conversations"), _image_path(path, record.get("image")))


def _csv_rows(path: Path) -> Iterator[Row]:
    import polars as pl

    yield from _simple_rows(path, pl.read_csv(path).to_arrow(), 0)


def _simple_rows(path: Path, batch: pa.Table | pa.RecordBatch, first: int) -> Iterator[Row]:
    """Rows of an (image, prompt[, response]) batch; ``first``: the batch's first row in the file."""
    names = batch.schema.names
    for col in ("image", "prompt"):
        if col not in names:
            raise ValueError(f"corpus table {path}: missing column {col!r} (has {names})")
    images = batch.column("image")
    struct = pa.types.is_struct(images.type)
    images = images.is_valid().to_pylist() if struct else images.to_pylist()
    prompts = batch.column("prompt").to_pylist()
    responses = batch.column("response").to_pylist() if "response" in names else [None] * len(prompts)
    for k, (image, prompt, response) in enumerate(zip(images, prompts, responses)):
        ref = (image_ref(path, first + k) if image else None) if struct else _image_path(path, image)
        turns = (("assistant", str(response)),) if response is not None and str(response) != "" else ()
        yield Row(ref, str(prompt), turns)


def _parquet_rows(path: Path) -> Iterator[Row]:
    """Rows of one Parquet file, a batch at a time: LLaVA conversations (``conversations`` column,
    image struct or path optional) or an (image, prompt[, response]) table."""
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    names = schema.names
    image_type = schema.field("image").type if "image" in names else None
    struct = image_type is not None and pa.types.is_struct(image_type)
    if struct and "bytes" not in [image_type.field(k).name for k in range(image_type.num_fields)]:
        raise ValueError(f"corpus table {path}: column 'image' is a struct without 'bytes' ({image_type})")
    # the struct's validity is read through its small `path` leaf: never the image bytes
    image_col = ("image.path" if "path" in [image_type.field(k).name for k in range(image_type.num_fields)]
                 else "image.bytes") if struct else "image"
    if "conversations" not in names:
        first = 0
        cols = [c for c in ("image", "prompt", "response") if c in names]
        cols = [image_col if c == "image" else c for c in cols]
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
            yield from _simple_rows(path, batch, first)
            first += batch.num_rows
        return
    cols = ["conversations"] + (["id"] if "id" in names else []) + ([image_col] if image_type is not None else [])
    first = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
        convs = batch.column("conversations").to_pylist()
        ids = batch.column("id").to_pylist() if "id" in names else [None] * len(convs)
        if image_type is None:
            images = [None] * len(convs)
        elif struct:
            images = [image_ref(path, first + k) if ok else None
                      for k, ok in enumerate(batch.column("image").is_valid().to_pylist())]
        else:
            images = [_image_path(path, x) for x in batch.column("image").to_pylist()]
        for k, (conv, rid, image) in enumerate(zip(convs, ids, images)):
            where = f"corpus table {path}: row {first + k}" + (f" (id {rid!r})" if rid is not None else "")
            yield _conversation(where, conv, image)
        first += batch.num_rows

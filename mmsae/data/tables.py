"""Table corpora: rows of (image, prompt[, response]) from Parquet/CSV, or LLaVA-format conversations.

A Parquet or CSV table has columns ``image`` (a path relative to the table, or empty for a
text-only row) and ``prompt``; an optional ``response`` column is the assistant's answer to the
prompt (training text, as in LLaVA-NeXT-Data). A ``.json``/``.jsonl`` file is a list of records in
the LLaVA instruction-tuning format::

    {"id": "000001", "image": "coco/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A cup of coffee."}, ...]}

``human`` turns become ``user`` turns and ``gpt`` turns ``assistant`` turns; the ``<image>``
placeholder is removed from the text (the image always comes first in the first user turn).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Row:
    """One table row: image path (or None), the first user prompt, and the turns after it."""

    image: str | None
    prompt: str
    turns: tuple[tuple[str, str], ...] = ()


def _image_path(table: Path, image) -> str | None:
    if image is None or str(image) == "":
        return None
    image = str(image)
    return image if os.path.isabs(image) else str(table.parent / image)


def _conversation(table: Path, i: int, record: dict) -> Row:
    where = f"corpus table {table}: record {i}"
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list")
    turns = []
    for j, turn in enumerate(conv):
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(f"{where}: conversations[{j}].from={turn.get('from')!r} is not one of human, gpt")
        text = str(turn.get("value", "")).replace("<image>", "").strip()
        turns.append((role, text))
    if turns[0][0] != "user":
        raise ValueError(f"{where}: the conversation must start with a human turn")
    return Row(_image_path(table, record.get("image")), turns[0][1], tuple(turns[1:]))


def read_table(path: Path) -> list[Row]:
    """Rows of a corpus table (``.parquet``, ``.csv``, ``.json`` or ``.jsonl``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, or a malformed conversation (naming the record and field).
    """
    if not path.is_file():
        raise FileNotFoundError(f"corpus.path: table {path} does not exist")
    if path.suffix in (".json", ".jsonl"):
        text = path.read_text()
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
        return [_conversation(path, i, r) for i, r in enumerate(records)]
    df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    for col in ("image", "prompt"):
        if col not in df.columns:
            raise ValueError(f"corpus table {path}: missing column {col!r} (has {df.columns})")
    rows = []
    for r in df.iter_rows(named=True):
        response = r.get("response")  # None without a response column
        turns = (("assistant", str(response)),) if response is not None and str(response) != "" else ()
        rows.append(Row(_image_path(path, r["image"]), str(r["prompt"]), turns))
    return rows

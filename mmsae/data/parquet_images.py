"""Images stored inside Parquet rows (the ``datasets`` Image feature), named and loaded lazily.

Hub datasets such as ``lmms-lab/LLaVA-NeXT-Data`` keep each image in its row as a struct
``{bytes: binary, path: string}`` (``path`` is only the original file name). A corpus sample does not
carry those bytes: its ``image_path`` is a reference ``<parquet file>#row=<i>`` (``i`` the 0-based row
of that file), a plain string that travels through every table (``samples.parquet``, listings) like
a file path, and :func:`read_image_bytes` fetches the bytes when the image is used.

Reading one row reads the ``image`` column of its row group (``datasets`` writes image tables in
row groups of about 100 rows); the last :data:`ROW_GROUP_CACHE` row groups read are kept, so a pass
over consecutive rows reads each row group once. Memory: at most that many row groups' images.
"""

from __future__ import annotations

import bisect
import os
import re
from functools import lru_cache

import pyarrow.parquet as pq

REF_RE = re.compile(r"^(?P<file>.+\.parquet)#row=(?P<row>\d+)$")
ROW_GROUP_CACHE = 2


def image_ref(file: str | os.PathLike, row: int) -> str:
    """The reference of the image in row ``row`` (0-based) of the Parquet ``file``."""
    return f"{os.path.abspath(file)}#row={int(row)}"


def parse_image_ref(path: str | os.PathLike) -> tuple[str, int] | None:
    """``(parquet file, row)`` of an :func:`image_ref`, or None for anything else (an existing file
    whose name merely looks like a reference is a file)."""
    m = REF_RE.match(os.fspath(path))
    if m is None or os.path.isfile(path):
        return None
    return m["file"], int(m["row"])


@lru_cache(maxsize=16)
def _row_group_starts(file: str, _stamp: tuple[int, int]) -> tuple[int, ...]:
    """First row of each row group, then the row count (``_stamp``: mtime and size, so a rewritten
    file is read again)."""
    meta = pq.ParquetFile(file).metadata
    starts = [0]
    for k in range(meta.num_row_groups):
        starts.append(starts[-1] + meta.row_group(k).num_rows)
    return tuple(starts)


@lru_cache(maxsize=ROW_GROUP_CACHE)
def _row_group_images(file: str, group: int, _stamp: tuple[int, int]):
    """The ``image`` column (struct bytes/path) of one row group, as one Arrow array."""
    pf = pq.ParquetFile(file)
    if "image" not in pf.schema_arrow.names:
        raise ValueError(f"{file}: no 'image' column (has {pf.schema_arrow.names})")
    return pf.read_row_group(group, columns=["image"]).column("image").combine_chunks()


def read_image_bytes(file: str, row: int) -> tuple[bytes | None, str]:
    """The encoded image (PNG, JPEG...) in row ``row`` of ``file``.

    Returns:
        ``(bytes, "ok")``, or ``(None, reason)`` when the row has no image or its ``bytes`` are null
        (the reason names ``path``, which is only a name here).

    Raises:
        FileNotFoundError: ``file`` does not exist.
        IndexError: ``row`` is past the file's last row.
    """
    st = os.stat(file)
    stamp = (st.st_mtime_ns, st.st_size)
    starts = _row_group_starts(file, stamp)
    if not 0 <= row < starts[-1]:
        raise IndexError(f"{file}: row {row} is not in 0..{starts[-1] - 1}")
    group = bisect.bisect_right(starts, row) - 1
    cell = _row_group_images(file, group, stamp)[row - starts[group]]
    if not cell.is_valid:
        return None, "no image in this row (image is null)"
    value = cell.as_py()
    if value.get("bytes") is None:
        return None, f"image without bytes (path {value.get('path')!r} is only a name)"
    return value["bytes"], "ok"

"""Atomic file output: a killed job never leaves a half-written file that looks finished.

Every writer here writes to a temporary file in the destination's directory and renames it over the
destination (``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WriteError(OSError):
    """A failed write, re-raised naming its destination and the free space there (``errno`` is the
    original error's, ``dest`` the destination's path)."""


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _errno_of(exc: OSError) -> int | None:
    """The errno of ``exc``, also from pyarrow's message (``... Detail: [errno 28] No space left on device``)."""
    if exc.errno is not None:
        return exc.errno
    m = re.search(r"\[errno (\d+)\]", str(exc))
    return int(m.group(1)) if m else None


def write_error(dest: str | os.PathLike, exc: OSError) -> WriteError:
    """``exc`` (an OSError, pyarrow's IO errors included) as a :class:`WriteError` whose message names
    ``dest`` and the free bytes of the file system it lies on (``shutil.disk_usage``), e.g.
    ``writing results/x.parquet failed: [Errno 28] No space left on device (12 B free on its file system, ...)``."""
    dest = Path(dest)
    code = _errno_of(exc)
    try:
        where = next(p for p in (dest.parent, *dest.parents) if p.exists())
        usage = shutil.disk_usage(where)
        free = f"{_human_bytes(usage.free)} ({usage.free} bytes) free of {_human_bytes(usage.total)} on its file system"
    except (OSError, StopIteration):
        free = "free space unknown"
    hint = "; the disk is full: free space there or point results/ elsewhere" if code in DISK_FULL else ""
    message = f"writing {dest} failed: {exc} ({free}){hint}"
    err = WriteError(code, message) if code is not None else WriteError(message)
    err.dest = dest
    return err


@contextlib.contextmanager
def _naming(dest: str | os.PathLike, only_disk_full: bool = False) -> Iterator[None]:
    """Re-raise an OSError from the block as :func:`write_error` (once; ``only_disk_full``: only
    ENOSPC/EDQUOT/EFBIG, for blocks that may fail for reasons other than writing)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if only_disk_full and _errno_of(e) not in DISK_FULL:
            raise
        raise write_error(dest, e) from e


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success rename it to ``dest``, else delete it.

    Raises:
        WriteError: the disk (or quota) filled up inside the block or at the rename; the message names
            ``dest`` and the free space there (other errors pass unchanged).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or ".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are for people too
    try:
        with _naming(dest, only_disk_full=True):
            yield tmp
            os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``dest`` atomically; a failed write raises :class:`WriteError`
    naming ``dest`` and the free space there."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    with atomic_path(dest) as tmp, _naming(dest):
        tmp.write_text(text)


def write_parquet(dest: str | os.PathLike, table: pa.Table, **kwargs) -> None:
    """Write a pyarrow table to ``dest`` atomically (zstd-compressed unless told otherwise).

    Raises:
        WriteError: pyarrow's IO error (a full disk surfaces as "Error writing bytes to file", naming
            no file) re-raised naming ``dest`` and the free space there.
    """
    kwargs.setdefault("compression", "zstd")
    with atomic_path(dest, ".parquet") as tmp, _naming(dest):
        pq.write_table(table, tmp, **kwargs)


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    """Write raw bytes (e.g. a PNG) to ``dest`` atomically; a failed write raises :class:`WriteError`."""
    with atomic_path(dest) as tmp, _naming(dest):
        tmp.write_bytes(data)


def config_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

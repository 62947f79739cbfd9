"""A failed write names its destination and the free space there (mmsae.core.io): a full disk
otherwise surfaces as pyarrow's "Error writing bytes to file" with no path."""

from __future__ import annotations

import errno
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmsae.core import io


def _full_disk_parquet(*args, **kwargs):
    raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")  # pyarrow's own words


def test_parquet_on_a_full_disk_names_destination_and_free_space(tmp_path, monkeypatch):
    monkeypatch.setattr(pq, "write_table", _full_disk_parquet)
    dest = tmp_path / "shards" / "part-0.parquet"
    with pytest.raises(OSError) as info:
        io.write_parquet(dest, pa.table({"x": [1, 2]}))
    message = str(info.value)
    assert str(dest) in message and "No space left on device" in message
    reported = int(re.search(r"\((\d+) bytes\) free", message).group(1))
    assert abs(reported - shutil.disk_usage(tmp_path).free) < 10**8  # the free bytes, as measured there
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, io.WriteError)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no temporary file is left behind


@pytest.mark.parametrize("writer,arg", [(io.write_json, {"a": 1}), (io.write_bytes, b"png")])
def test_json_and_bytes_on_a_full_disk_name_destination(tmp_path, monkeypatch, writer, arg):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    monkeypatch.setattr(type(tmp_path), "write_bytes", full)
    dest = tmp_path / "out.bin"
    with pytest.raises(io.WriteError, match="out.bin.*free"):
        writer(dest, arg)


def test_a_full_disk_inside_atomic_path_names_destination_but_other_errors_pass(tmp_path):
    dest = tmp_path / "page.html"
    with pytest.raises(io.WriteError, match="page.html"):
        with io.atomic_path(dest):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(FileNotFoundError) as info:  # e.g. a missing input read inside the block: unchanged
        with io.atomic_path(dest):
            open(tmp_path / "missing")
    assert not isinstance(info.value, io.WriteError)


def test_writes_that_succeed_are_unchanged(tmp_path):
    io.write_parquet(tmp_path / "t.parquet", pa.table({"x": [1]}))
    io.write_json(tmp_path / "t.json", {"a": 1})
    assert pq.read_table(tmp_path / "t.parquet").column("x").to_pylist() == [1]
    assert (tmp_path / "t.json").read_text() == '{\n  "a": 1\n}\n'

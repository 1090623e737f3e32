"""The records an isolated apply's caller sends its child (lamina.archive.records).

Sending a tar's members as records and reading them back must give the applier what
reading the tar itself gives: every field of every entry, and every file's data (a
sparse file's regions in their places), whatever the pipe's reads return at a time.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from lamina.archive import records
from lamina.archive.reader import REG, Entry, TarReader
from tests import tarbuild as tb

MEMBERS = [
    tb.directory("d", mtime=1_700_000_000),
    tb.file("d/small", b"x" * 100),
    tb.file("d/empty", b""),
    tb.file("d/edge", b"e" * records.SMALL),  # sent with its record
    tb.file("d/big", os.urandom(records.SMALL + 1)),  # sent straight from the buffer
    tb.file("d/" + "long" * 60, b"long name", uid=70_000_000, gid=5),
    tb.symlink("d/link", "../" + "t" * 300),
    tb.hardlink("d/hard", "d/small"),
    tb.fifo("d/fifo"),
    tb.chardev("d/null", 1, 3),
    tb.blockdev("d/sda", 8, 0),
    tb.file("d/caps", b"#!", pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
                                  "SCHILY.xattr.user.\u00e9": "v", "atime": "1700000001.5"}),
    tb.whiteout("d/gone"),
    tb.opaque("d"),
]


def _fields(entry: Entry) -> tuple[object, ...]:
    return (entry.name, entry.type, entry.mode, entry.uid, entry.gid, entry.size, entry.mtime,
            entry.atime, entry.linkname, entry.devmajor, entry.devminor, entry.xattrs,
            entry.sparse, entry.data_size)


def _round_trip(data: bytes, tmp_path: Path, read_size: int = records.READ_SIZE
                ) -> tuple[list[tuple[object, ...]], list[bytes]]:
    """The entries and file data read back from the records of the tar ``data``."""
    r, w = os.pipe()

    def send() -> None:
        try:
            records.send(TarReader(io.BytesIO(data)), w)
        finally:
            os.close(w)

    sender = threading.Thread(target=send)
    sender.start()
    got, contents = [], []
    old = records.READ_SIZE
    records.READ_SIZE = read_size
    try:
        reader = records.RecordReader(r)
        for i, entry in enumerate(reader):
            got.append(_fields(entry))
            if entry.type == REG and i % 2 == 0:  # others' data is skipped, as applies do
                path = tmp_path / f"f{i}"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                try:
                    reader.copy_data(entry, fd, checksum=True)
                finally:
                    os.close(fd)
                contents.append(path.read_bytes())
    finally:
        records.READ_SIZE = old
        sender.join()
        os.close(r)
    return got, contents


def _direct(data: bytes, tmp_path: Path) -> tuple[list[tuple[object, ...]], list[bytes]]:
    reader = TarReader(io.BytesIO(data))
    got, contents = [], []
    for i, entry in enumerate(reader):
        got.append(_fields(entry))
        if entry.type == REG and i % 2 == 0:
            path = tmp_path / f"d{i}"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                reader.copy_data(entry, fd)
            finally:
                os.close(fd)
            contents.append(path.read_bytes())
    return got, contents


@pytest.mark.parametrize("read_size", [1, 7, 512, 1 << 20])
def test_records_give_what_the_tar_gives(tmp_path: Path, read_size: int) -> None:
    data = tb.build(MEMBERS)
    assert _round_trip(data, tmp_path, read_size) == _direct(data, tmp_path)


def test_sparse_files_keep_their_holes(tmp_path: Path) -> None:
    chunks = [(0, b"h" * 512), (1 << 20, os.urandom(137 * 512)), (3 << 20, b"tail")]
    data = (tb.raw_gnu_sparse("old", chunks, 4 << 20)
            + tb.raw_pax_sparse_1_0("new", chunks, 4 << 20) + tb.END)
    got, contents = _round_trip(data, tmp_path)
    assert got == _direct(data, tmp_path)[0]
    assert contents == [tb.expand_sparse(chunks, 4 << 20)]


def test_a_stream_cut_before_its_end_record_is_aborted(tmp_path: Path) -> None:
    r, w = os.pipe()
    with os.fdopen(w, "wb") as out:
        out.write(records.encode_head(next(iter(TarReader(tb.stream(MEMBERS))))))
    reader = records.RecordReader(r)
    with pytest.raises(records.Aborted):
        list(reader)
    os.close(r)

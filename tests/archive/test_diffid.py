"""The diff id as the tar streams past (:class:`lamina.archive.diffid.DigestingReader`)."""

from __future__ import annotations

import gc
import hashlib
import io
import os
import threading

import pytest

from lamina.archive.diffid import DigestingReader, chain_id


@pytest.mark.parametrize("sizes", [[1, 511, 4096], [70_000, 3, 1 << 20, 17, 65_536],
                                   [5, 65_536, 5, 65_536]])
def test_the_digest_of_what_passes_small_reads_and_large_alike(sizes: list[int]) -> None:
    data = os.urandom(3 << 20)
    reader = DigestingReader(io.BytesIO(data))
    got = b"".join(reader.read(n) for n in sizes)
    assert got == data[:len(got)]
    # what the caller left unread is hashed too, in order
    assert reader.diff_id() == "sha256:" + hashlib.sha256(data).hexdigest()
    assert reader.size == len(data)
    assert reader.diff_id() == "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_dropped_reader_ends_its_hashing_thread() -> None:
    before = {t.ident for t in threading.enumerate()}
    reader = DigestingReader(io.BytesIO(os.urandom(1 << 20)))
    reader.read(1 << 18)
    assert any(t.name == "lamina-diffid" for t in threading.enumerate())
    del reader
    gc.collect()
    for thread in threading.enumerate():
        if thread.ident not in before:
            thread.join(5)
            assert not thread.is_alive(), thread.name


def test_chain_ids() -> None:
    a = "sha256:" + "a" * 64
    b = "sha256:" + "b" * 64
    assert chain_id(None, a) == a
    assert chain_id(a, b) == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()

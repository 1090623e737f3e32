"""A layer's identity by content: its diff id and chain id (OCI image-spec ``config.md``).

The *diff id* of a layer is the SHA-256 of its uncompressed tar; the *chain id* of a
layer names it with all its parents: ``chain(L1) = diffid(L1)``, ``chain(Ln) =
sha256(chain(Ln-1) + " " + diffid(Ln))``.  containerd names its committed snapshots
of image layers by chain id, so a layer lamina applied through any front end can be
found again by containerd (the remote-snapshotter protocol: contract §6).

The diff id is computed while the tar streams into the apply (:class:`DigestingReader`
wraps the decompressed stream: each chunk read is hashed as it passes, no copy, no
second read).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import weakref
from typing import Any, BinaryIO, cast

_DRAIN = 1 << 20
_THREADED = 1 << 16
"""Chunks from this size on are hashed on a thread of their own (hashlib lets go of
the GIL for them): the SHA-256 of a layer then runs on the other core, beside the
parsing and writing that read the stream."""
_BACKLOG = 16
"""Chunks queued for the hashing thread at most (the reader waits beyond them)."""
_END = b""


def _hash_from(chunks: queue.Queue[bytes], sha: Any) -> None:
    while chunk := chunks.get():
        sha.update(chunk)


class DigestingReader:
    """A read-only stream that hashes what is read through it (SHA-256): small reads
    in the caller, and from the first large one on every chunk, in order, on a
    hashing thread (ended by :meth:`diff_id`, or when the reader is dropped)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._sha = hashlib.sha256()
        self._chunks: queue.Queue[bytes] | None = None
        self._thread: threading.Thread | None = None
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if data:
            self.size += len(data)
            if self._chunks is None and len(data) >= _THREADED:
                self._start()
            if self._chunks is not None:
                self._chunks.put(data)
            else:
                self._sha.update(data)
        return data

    def _start(self) -> None:
        chunks: queue.Queue[bytes] = queue.Queue(_BACKLOG)
        self._thread = threading.Thread(target=_hash_from, args=(chunks, self._sha),
                                        name="lamina-diffid", daemon=True)
        self._thread.start()
        self._chunks = chunks
        # A reader dropped mid-stream (a failed apply) ends its thread too.
        weakref.finalize(self, chunks.put, _END)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._stream.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def diff_id(self) -> str:
        """``sha256:HEX`` of the whole stream (what the apply left unread is read first:
        padding after the tar's end is part of the tar's digest)."""
        while self.read(_DRAIN):
            pass
        if self._chunks is not None and self._thread is not None:
            self._chunks.put(_END)
            self._thread.join()
            self._chunks = self._thread = None
        return "sha256:" + self._sha.hexdigest()

    def as_stream(self) -> BinaryIO:
        """This reader, typed as the stream it stands for."""
        return cast(BinaryIO, self)


def chain_id(parent_chain: str | None, diff_id: str) -> str:
    """The chain id of a layer of ``diff_id`` on a parent of chain id ``parent_chain``."""
    if parent_chain is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent_chain} {diff_id}".encode()).hexdigest()

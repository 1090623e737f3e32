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
from typing import Any, BinaryIO, cast

_DRAIN = 1 << 20


class DigestingReader:
    """A read-only stream that hashes what is read through it (SHA-256)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if data:
            self._sha.update(data)
            self.size += len(data)
        return data

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
        return "sha256:" + self._sha.hexdigest()

    def as_stream(self) -> BinaryIO:
        """This reader, typed as the stream it stands for."""
        return cast(BinaryIO, self)


def chain_id(parent_chain: str | None, diff_id: str) -> str:
    """The chain id of a layer of ``diff_id`` on a parent of chain id ``parent_chain``."""
    if parent_chain is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent_chain} {diff_id}".encode()).hexdigest()

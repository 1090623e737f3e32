"""Reading a layer under a lease: streams and getters that give their layers' read
leases back when they are closed (:meth:`lamina.backends.base.StoreDriver.diff` and
friends hand them out), and the no-follow getter of a layer's own files."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO, cast

from lamina import errors
from lamina.archive.export import READ_CHUNK
from lamina.driver import DiffGetter, LayerId
from lamina.host import fsutil
from lamina.host.fsutil import DIR_FLAGS


def release(lease: list[fsutil.FileLock]) -> None:
    for lock in lease:
        lock.release()


class LeasedReader(io.BufferedReader):
    """A stream that gives its layers' leases back when it is closed (or collected)."""

    def __init__(self, raw: io.RawIOBase, lease: list[fsutil.FileLock]) -> None:
        super().__init__(raw, READ_CHUNK)
        self._lease = lease

    def close(self) -> None:
        try:
            super().close()
        finally:
            release(self._lease)
            self._lease = []


def leased_stream(stream: BinaryIO, lease: list[fsutil.FileLock]) -> BinaryIO:
    if isinstance(stream, io.BufferedReader):
        raw = stream.detach()
        if isinstance(raw, io.RawIOBase):
            return cast(BinaryIO, LeasedReader(raw, lease))
        stream = cast(BinaryIO, io.BufferedReader(raw))  # pragma: no cover - not made here
    return cast(BinaryIO, LeasedReader(cast(io.RawIOBase, Passthrough(stream)), lease))


class Passthrough(io.RawIOBase):
    """Any binary stream as a raw one (for a backend whose diff is not buffered here)."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()


class LeasedGetter(DiffGetter):
    """A backend's getter, holding its layer's lease until it is closed."""

    def __init__(self, inner: DiffGetter, lease: list[fsutil.FileLock]) -> None:
        self._inner = inner
        self._lease = lease

    def get(self, path: str) -> BinaryIO:
        return self._inner.get(path)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            release(self._lease)
            self._lease = []


class TreeGetter(DiffGetter):
    """Opens files below a layer directory without following any symlink."""

    def __init__(self, root: Path, layer: LayerId) -> None:
        self.root = root
        self.layer = layer

    def get(self, path: str) -> BinaryIO:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise errors.InvalidArgument("bad path", layer=self.layer, path=path)
        fd = os.open(self.root, DIR_FLAGS)
        try:
            ffd = fsutil.open_file_beneath(fd, "/".join(parts))
        except OSError as e:
            raise errors.NotFound(f"cannot open: {e.strerror}", layer=self.layer,
                                  path=path) from e
        finally:
            os.close(fd)
        return os.fdopen(ffd, "rb")

"""The content store: blobs by digest, each verified as it is written and as it is read.

Layout under the image home (``HOME/image``)::

    blobs/sha256/HEX    one blob, complete, durable, read-only (0444)
    ingest/NAME         a blob being written (held by its writer's flock)

A :class:`BlobWriter` writes into ``ingest/``, hashing and counting as the bytes pass;
:meth:`BlobWriter.commit` checks the size and digest it was told to expect, fsyncs the
file and renames it into ``blobs/`` (then fsyncs that directory): a blob is either
whole or absent, and an abort or a kill leaves only an ingest file, which the next
:meth:`ContentStore.sweep` removes once its writer is gone.  A writer that is cut short
keeps what it has, so a download can go on from :attr:`BlobWriter.offset`.

:meth:`ContentStore.open` reads a blob and checks its digest at the end of the stream
(``Corrupt`` if the home was tampered with); blob files are opened without following
links and must be regular files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast

from lamina import crashpoints, errors
from lamina.host import fsutil
from lamina.image.reference import check_digest

CHUNK = 1 << 20


def _hex(digest: str) -> str:
    return check_digest(digest)[len("sha256:"):]



class LayerBlob(NamedTuple):
    """A layer's blob opened for its apply: the stream (compressed or not), and what
    reads it to its end and checks it (``Corrupt`` on a digest or size mismatch)."""

    stream: BinaryIO
    finish: Callable[[], None]

class ContentStore:
    """Blobs by digest under ``root`` (``HOME/image``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.ingest_dir = root / "ingest"
        for d in (self.blobs, self.ingest_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, digest: str) -> Path:
        return self.blobs / _hex(digest)

    def has(self, digest: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.path(digest)).st_mode)
        except FileNotFoundError:
            return False

    def size(self, digest: str) -> int:
        """The blob's size; ``NotFound`` when the store does not hold it."""
        try:
            st = os.lstat(self.path(digest))
        except FileNotFoundError:
            raise errors.NotFound(f"blob {digest} is not in the content store") from None
        if not stat.S_ISREG(st.st_mode):
            raise errors.Corrupt(f"blob {digest} is not a regular file",
                                 path=str(self.path(digest)))
        return st.st_size

    def digests(self) -> list[str]:
        """Every blob held (names that are not 64-hex digests are not blobs: skipped)."""
        out = []
        for name in os.listdir(self.blobs):
            if len(name) == 64 and all(c in "0123456789abcdef" for c in name):
                out.append(f"sha256:{name}")
        return sorted(out)

    def open_layer(self, digest: str, *, size: int, verify: bool = True) -> LayerBlob:
        """Blob ``digest`` opened for a layer's apply (as :meth:`open`), with what reads
        it to its end and checks it."""
        reader = self._verifying(digest, size=size, verify=verify)
        return LayerBlob(reader.as_stream(), reader.finish)

    def open(self, digest: str, *, size: int | None = None, verify: bool = True) -> BinaryIO:
        """A reader of blob ``digest`` that raises ``Corrupt`` at its end if the bytes do
        not hash to ``digest`` (or are not ``size`` long).  ``verify`` false: the size is
        checked, the digest left to the caller (an uncompressed layer's apply computes its
        diff id, which is the blob's digest: one hash instead of two)."""
        return self._verifying(digest, size=size, verify=verify).as_stream()

    def _verifying(self, digest: str, *, size: int | None, verify: bool) -> VerifyingReader:
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise errors.NotFound(f"blob {digest} is not in the content store") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise errors.Corrupt(f"blob {digest} is a symbolic link", path=str(path)) from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise errors.Corrupt(f"blob {digest} is not a regular file", path=str(path))
        if size is not None and st.st_size != size:
            os.close(fd)
            raise errors.Corrupt(f"blob {digest} is {st.st_size} bytes, not {size}",
                                 path=str(path))
        return VerifyingReader(open(fd, "rb", buffering=0), digest if verify else None,
                               st.st_size, f"blob {digest} in the content store")

    def read(self, digest: str, *, limit: int) -> bytes:
        """A small blob's bytes, verified (a document: at most ``limit`` bytes)."""
        size = self.size(digest)
        if size > limit:
            raise errors.Corrupt(f"blob {digest}: {size} bytes, over the {limit / (1 << 20):g} "
                                 "MiB a document may have")
        with self.open(digest) as f:
            return f.read()

    def writer(self, digest: str | None = None, size: int | None = None) -> BlobWriter:
        """A writer of a new blob expected to be ``digest`` and ``size`` long (either may
        be unknown: the writer computes them)."""
        if digest is not None:
            check_digest(digest)
        return BlobWriter(self, digest, size)

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (a document) as a blob; its digest."""
        with self.writer(digest, len(data)) as w:
            w.write(data)
            return w.commit()

    def delete(self, digest: str) -> bool:
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            return False
        return True

    def sweep(self) -> list[str]:
        """Remove the ingest files whose writers are gone; their names."""
        gone = []
        for name in os.listdir(self.ingest_dir):
            path = self.ingest_dir / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # not a file a writer made (a link, a fifo): remove it
                continue
            try:
                if not fsutil.lock_fd(fd, blocking=False):
                    continue  # a live writer
            finally:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            gone.append(name)
        return gone


class BlobWriter:
    """One blob being written (a context manager: leaving it without :meth:`commit`
    aborts)."""

    def __init__(self, store: ContentStore, digest: str | None, size: int | None) -> None:
        self.store = store
        self.expected = digest
        self.expected_size = size
        self.offset = 0
        self._sha = hashlib.sha256()
        self.tmp = store.ingest_dir / f"{secrets.token_hex(8)}.partial"
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                       | os.O_CLOEXEC, 0o600)
        fsutil.lock_fd(self._fd)

    def _what(self) -> str:
        return f"blob {self.expected}" if self.expected else "blob"

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None, "write after commit or abort"
        if self.expected_size is not None and self.offset + len(data) > self.expected_size:
            raise errors.Corrupt(f"{self._what()}: more than the {self.expected_size} bytes "
                                 "its descriptor says")
        self._sha.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.offset += len(data)

    def copy_from(self, stream: BinaryIO, limit: int | None = None) -> int:
        """Write what ``stream`` holds (up to ``limit`` bytes); the count written."""
        done = 0
        while limit is None or done < limit:
            chunk = stream.read(CHUNK if limit is None else min(CHUNK, limit - done))
            if not chunk:
                break
            self.write(chunk)
            done += len(chunk)
        return done

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    def commit(self) -> str:
        """Check, sync and publish the blob; its digest.  A blob held already is kept
        (its bytes are the same, by their digest) and this one is dropped."""
        assert self._fd is not None, "commit twice"
        digest = self.digest
        if self.expected_size is not None and self.offset != self.expected_size:
            self.abort()
            raise errors.Corrupt(f"{self._what()}: {self.offset} bytes, its descriptor says "
                                 f"{self.expected_size} (cut short?)")
        if self.expected is not None and digest != self.expected:
            self.abort()
            raise errors.Corrupt(f"{self._what()}: its bytes hash to {digest} (damaged or "
                                 "tampered with)")
        os.fchmod(self._fd, 0o444)
        fsutil.sync_file(self._fd)
        final = self.store.path(digest)
        crashpoints.reached("blob:before-rename")
        if self.store.has(digest):
            self.abort()
            return digest
        fsutil.rename(self.tmp, final)
        os.close(self._fd)
        self._fd = None
        fsutil.sync_dir(self.store.blobs)
        return digest

    def abort(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class VerifyingReader:
    """A stream that checks, when it reaches its end, that what it gave hashes to
    ``digest`` and was ``size`` bytes long (``Corrupt`` otherwise, naming ``what``)."""

    def __init__(self, stream: BinaryIO, digest: str | None, size: int | None,
                 what: str) -> None:
        self._stream = stream
        self._digest = digest
        self._size = size
        self._what = what
        self._sha = hashlib.sha256()
        self.count = 0
        self.verified = False

    def read(self, n: int = -1) -> bytes:
        if self._size is not None and self.count >= self._size:
            data = b""
        else:
            if n is None or n < 0:
                n = CHUNK if self._size is None else max(self._size - self.count, 0)
            if self._size is not None:
                n = min(n, self._size - self.count + 1)
            data = self._stream.read(n)
        if data:
            if self._digest is not None:
                self._sha.update(data)
            self.count += len(data)
            if self._size is not None and self.count > self._size:
                raise errors.Corrupt(f"{self._what}: longer than its {self._size} bytes")
        elif n != 0:
            self._check()
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def _check(self) -> None:
        if self.verified:
            return
        if self._size is not None and self.count != self._size:
            raise errors.Corrupt(f"{self._what}: {self.count} bytes, {self._size} expected "
                                 "(cut short)")
        got = "sha256:" + self._sha.hexdigest()
        if self._digest is not None and got != self._digest:
            raise errors.Corrupt(f"{self._what}: its bytes hash to {got}, not {self._digest}")
        self.verified = True

    def finish(self) -> None:
        """Read what is left and check the digest."""
        while self.read(CHUNK):
            pass
        self._check()

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if name in ("fileno", "seek", "tell", "peek"):
            raise AttributeError(name)  # reads must pass through the check
        return getattr(self._stream, name)

    def as_stream(self) -> BinaryIO:
        return cast(BinaryIO, self)

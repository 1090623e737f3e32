"""What an image archive holds, for :mod:`lamina.image.load`: its files as blobs of the
content store (by their path in the archive), its small documents, and its links.

A tar (:class:`TarSource`) is read front to back, twice where it must be.  The first
reading keeps the documents and the small members in memory (up to :data:`MAX_HELD`)
and only notes the larger ones: their names and sizes, their bytes read past.  Once the
load knows which members its images need (the references come last in every real
archive: ``manifest.json`` after the layers), a second reading (:meth:`Source.fetch`)
stores just those, each checked against its name (a ``blobs/sha256/HEX`` member must hash
to that digest) and its descriptor's size.  So a member nothing names costs a read, never
a write: a gzip'd archive of a few megabytes (a run of zeros compresses a thousandfold)
cannot make the home take gigabytes.

The second reading reads the file again (or standard input, when it is a file).  A pipe
cannot be read again:

- an uncompressed pipe's larger members are stored as they stream (the home takes no
  more than was sent), and the load sweeps what no image needs afterwards;
- a compressed pipe's bytes are kept as they come in the content store's ingest (its
  compressed size, not its expanded one) and read a second time from there.

A directory (:class:`DirSource`) is read where the images lead: each file is copied into
the content store when it is needed, never more of it than its descriptor's size.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, cast

from lamina import errors
from lamina.archive import codecs
from lamina.archive.entry import DIR, LINK, REG, SYMLINK, Entry
from lamina.archive.reader import TarReader
from lamina.image import reference, spec
from lamina.image.content import BlobWriter, ContentStore
from lamina.progress import counted

DOCUMENTS = ("manifest.json", "index.json", "oci-layout", "repositories")
MAX_MEMBERS = 1 << 16
"""The most members an image archive may have."""
MAX_LINK_DEPTH = 8
MAX_TRAILER = 1 << 20
"""The most read after a tar's end-of-archive marker: room for a writer's blocking
padding and a compressed stream's own end.  A stream that goes on past it (``image load
/dev/zero``, an archive followed by endless zeros) is refused, not read for ever."""
MAX_HELD = 64 << 20
"""The most bytes of small members (documents, tiny layers) a first reading keeps in
memory; the members after that are noted, as the larger ones are."""


def clean(name: str, what: str = "archive member") -> str:
    """A member name as a relative path within the archive, or ``UnsafeArchive``."""
    if "\x00" in name:
        raise errors.UnsafeArchive(f"{what} name holds a NUL byte", path=repr(name))
    if name.startswith("/"):
        raise errors.UnsafeArchive(f"{what} has an absolute name", path=name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise errors.UnsafeArchive(f"{what} name leaves the archive ('..')", path=name)
    return "/".join(parts)


def _named_digest(path: str, what: str) -> str | None:
    """The digest a ``blobs/sha256/HEX`` path names (its bytes must hash to it)."""
    if not path.startswith("blobs/sha256/"):
        return None
    return reference.check_digest("sha256:" + path[len("blobs/sha256/"):], what)


class Needed(Exception):
    """Members the first reading only noted, which the images need now: the load has
    them read (:meth:`Source.fetch`) and resolves its images again."""

    def __init__(self, paths: set[str]) -> None:
        super().__init__(", ".join(sorted(paths)))
        self.paths = paths


class Source:
    """What an archive holds: its files as blobs (by path) and its small documents."""

    def __init__(self, content: ContentStore) -> None:
        self.content = content
        self.blobs: dict[str, tuple[str, int]] = {}
        self.docs: dict[str, bytes] = {}
        self.links: dict[str, str] = {}
        self.wanted: set[str] = set()
        """Noted members named by a descriptor, to store once the images are known."""
        self.unasked = False
        """Members were stored before anything asked for them (an uncompressed pipe)."""

    def resolve(self, path: str, what: str) -> str:
        """``path`` with the archive's links followed (within the archive)."""
        path = clean(path, what)
        for _ in range(MAX_LINK_DEPTH):
            if path in self.blobs or path in self.docs or path not in self.links:
                return path
            path = self.links[path]
        raise errors.UnsafeArchive(f"{what}: too many links", path=path)

    def need(self, paths: Iterable[str], what: str) -> None:
        """Say (``Needed``) which of ``paths`` must be read again before they are used."""

    def blob(self, path: str, what: str, digest: str | None = None,
             size: int | None = None, *, stored: bool = True) -> tuple[str, int]:
        """The digest and size of the file at ``path`` (checked against ``digest`` and
        ``size`` when given).  ``stored`` false: the caller needs no bytes yet (a layer,
        applied later), so a member the first reading only noted is not read again now
        but :attr:`wanted`."""
        path = self.resolve(path, what)
        found = self.blobs.get(path)
        if found is None:
            found = self._fetch(path, what, size, stored=stored)
        if digest is not None and found[0] != digest:
            raise errors.Corrupt(f"{what}: {path} hashes to {found[0]}, not {digest}")
        if size is not None and found[1] != size:
            raise errors.Corrupt(f"{what}: {path} is {found[1]} bytes, its descriptor "
                                 f"says {size}")
        return found

    def blob_by_digest(self, desc: spec.Descriptor, what: str, *, stored: bool = True) -> str:
        """The blob ``desc`` names, at ``blobs/sha256/HEX`` (see :meth:`blob`)."""
        digest, _ = self.blob(f"blobs/sha256/{desc.digest[7:]}", what, desc.digest,
                              desc.size, stored=stored)
        return digest

    def document(self, path: str, what: str) -> bytes | None:
        """The bytes of the small file at ``path``; None when there is none."""
        path = self.resolve(path, what)
        if path in self.docs:
            return self.docs[path]
        if path in self.blobs:
            return self.content.read(self.blobs[path][0], limit=spec.MAX_DOCUMENT)
        return self._fetch_document(path, what)

    def fetch(self, paths: set[str]) -> None:
        """Store the members ``paths`` that the first reading only noted."""

    def close(self) -> None:
        """Give back what the source holds (a pipe's kept bytes)."""

    def _fetch(self, path: str, what: str, size: int | None, *,
               stored: bool) -> tuple[str, int]:
        raise errors.NotFound(f"{what}: the archive holds no {path}")

    def _fetch_document(self, path: str, what: str) -> bytes | None:
        return None


class _Tee:
    """A pipe passed through; once :meth:`keep` is called, every byte it gave (those
    before the call too) is written to a blob writer of the ingest as well."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._head: list[bytes] | None = []
        self._into: BlobWriter | None = None

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if self._into is not None:
            self._into.write(data)
        elif self._head is not None:
            self._head.append(data)
        return data

    def keep(self, into: BlobWriter) -> None:
        into.write(b"".join(self._head or []))
        self._head, self._into = None, into

    def drop(self) -> None:
        self._head = None


def _rereader(stream: BinaryIO) -> Callable[[], AbstractContextManager[BinaryIO]] | None:
    """How to read ``stream`` again from where it is now: None for a pipe, a device."""
    try:
        if not stream.seekable():
            return None
        with contextlib.suppress(io.UnsupportedOperation, AttributeError):
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                return None  # /dev/zero seeks, and reads the same again: not a file
        start = stream.tell()
    except (OSError, ValueError):
        return None

    @contextlib.contextmanager
    def again() -> Iterator[BinaryIO]:
        stream.seek(start)
        yield stream

    return again


class TarSource(Source):
    """A tar archive, read once for its layout and again for the members the images
    need (see the module docstring)."""

    def __init__(self, content: ContentStore) -> None:
        super().__init__(content)
        self.held: dict[str, bytes] = {}
        self.noted: dict[str, int] = {}
        self._held_bytes = 0
        self._again: Callable[[], AbstractContextManager[BinaryIO]] | None = None
        self._spool: BlobWriter | None = None

    def read(self, stream: BinaryIO, on_read: Callable[[int], None] | None = None) -> None:
        """The first reading of ``stream`` (``on_read`` told of each read's bytes)."""
        self._again = _rereader(stream)
        source = stream if on_read is None else counted(stream, on_read)
        tee = None if self._again is not None else _Tee(source)
        tar, kind = codecs.decompressed(source if tee is None else cast(BinaryIO, tee))
        store_rest = False
        if tee is not None and kind:
            spool = self._spool = self.content.writer()
            tee.keep(spool)

            @contextlib.contextmanager
            def from_spool() -> Iterator[BinaryIO]:
                with open(spool.tmp, "rb") as f:
                    yield f

            self._again = from_spool
        elif tee is not None:
            tee.drop()
            store_rest = True  # uncompressed: stored as it streams is never more than sent
        self._scan(TarReader(tar), store_rest)

    def _scan(self, reader: TarReader, store_rest: bool) -> None:
        count = 0
        for entry in reader:
            count += 1
            if count > MAX_MEMBERS:
                raise errors.UnsafeArchive(f"more than {MAX_MEMBERS} members in an image "
                                           "archive")
            name = clean(entry.name)
            if entry.type == DIR or not name:
                continue
            if entry.type in (SYMLINK, LINK):
                self.links[name] = self._link_target(entry, name)
                continue
            if entry.type != REG:
                raise errors.UnsafeArchive("an image archive holds only files, directories "
                                           "and links", path=name)
            if name in self.blobs or name in self.docs or name in self.held \
                    or name in self.noted:
                raise errors.UnsafeArchive("archive member appears twice", path=name)
            size = entry.data_size
            if name in DOCUMENTS:
                self.docs[name] = reader.read_data(entry, spec.MAX_DOCUMENT, name)
            elif "/" in name and posixpath.basename(name) in ("VERSION", "json") \
                    and size <= 1 << 16:
                reader.read_data(entry, 1 << 16, name)  # Docker's legacy per-layer files
            elif size <= spec.MAX_DOCUMENT and self._held_bytes + size <= MAX_HELD:
                _named_digest(name, f"archive member {name}")
                self.held[name] = reader.read_data(entry, spec.MAX_DOCUMENT, name)
                self._held_bytes += size
            elif store_rest:
                self.blobs[name] = self._store(reader, entry, name)
                self.unasked = True
            else:
                _named_digest(name, f"archive member {name}")
                self.noted[name] = size  # its bytes are read past, not stored
        reader.trailer(MAX_TRAILER)

    @staticmethod
    def _link_target(entry: Entry, name: str) -> str:
        target = entry.linkname
        if entry.type == SYMLINK:
            if target.startswith("/"):
                raise errors.UnsafeArchive("archive link points outside the archive", path=name)
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if target.startswith("../") or target == "..":
                raise errors.UnsafeArchive("archive link points outside the archive", path=name)
        return clean(target, "link target")

    def _store(self, reader: TarReader, entry: Entry, name: str) -> tuple[str, int]:
        expect = _named_digest(name, f"archive member {name}")
        with self.content.writer(expect, entry.data_size) as w:
            for view in reader.data_chunks(entry):
                w.write(view)
            return w.commit(), entry.data_size

    def need(self, paths: Iterable[str], what: str) -> None:
        missing = {p for p in (self.resolve(x, what) for x in paths) if p in self.noted}
        if missing:
            raise Needed(missing)

    def _fetch(self, path: str, what: str, size: int | None, *,
               stored: bool) -> tuple[str, int]:
        if path in self.held:
            data = self.held.pop(path)
            with self.content.writer(_named_digest(path, what), len(data)) as w:
                w.write(data)
                found = self.blobs[path] = (w.commit(), len(data))
            return found
        noted = self.noted.get(path)
        if noted is None:
            return super()._fetch(path, what, size, stored=stored)
        if size is not None and noted != size:  # refused before a byte is stored
            raise errors.Corrupt(f"{what}: {path} is {noted} bytes, its descriptor says {size}")
        if not stored and _named_digest(path, what) is not None:
            self.wanted.add(path)  # its name is its digest: checked as it is stored
            return f"sha256:{path[len('blobs/sha256/'):]}", noted
        raise Needed({path})

    def document(self, path: str, what: str) -> bytes | None:
        resolved = self.resolve(path, what)
        if resolved in self.held:
            return self.held[resolved]
        if self.noted.get(resolved, 0) > spec.MAX_DOCUMENT:
            raise errors.Corrupt(f"{what}: over {spec.MAX_DOCUMENT >> 20} MiB")
        if resolved in self.noted:
            raise Needed({resolved})
        return super().document(path, what)

    def fetch(self, paths: set[str]) -> None:
        todo = {p for p in paths if p in self.noted}
        if not todo:
            return
        assert self._again is not None, "members are noted only where they can be read again"
        with self._again() as stream:
            tar, _ = codecs.decompressed(stream)
            reader = TarReader(tar)
            for entry in reader:
                name = clean(entry.name)
                if entry.type != REG or name not in todo:
                    continue
                if entry.data_size != self.noted[name]:
                    break  # not the archive the first reading read
                self.blobs[name] = self._store(reader, entry, name)
                del self.noted[name]
                todo.discard(name)
                if not todo:
                    return  # the rest need not be read
        raise errors.Corrupt("the archive changed while it was read (its second reading "
                             f"lacks {', '.join(sorted(todo))})")

    def close(self) -> None:
        if self._spool is not None:
            self._spool.abort()


class DirSource(Source):
    """A directory (an OCI layout, or an unpacked ``docker save``): files are copied into
    the content store as the images need them; links must stay inside the directory."""

    def __init__(self, content: ContentStore, root: Path) -> None:
        super().__init__(content)
        self.root = root.resolve()

    def _open(self, path: str, what: str) -> int | None:
        full = Path(os.path.realpath(self.root / path))
        if full != self.root and self.root not in full.parents:
            raise errors.UnsafeArchive(f"{what}: {path} points outside the layout",
                                       path=str(self.root / path))
        try:
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise errors.InvalidArgument(f"{what}: cannot read it: {e.strerror}",
                                         path=str(full)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise errors.UnsafeArchive(f"{what}: not a regular file", path=str(full))
        return fd

    def _fetch(self, path: str, what: str, size: int | None, *,
               stored: bool) -> tuple[str, int]:
        fd = self._open(path, what)
        if fd is None:
            raise errors.NotFound(f"{what}: the layout holds no {path}")
        expect = _named_digest(path, f"layout file {path}")
        with open(fd, "rb", buffering=0) as f:
            found_size = os.fstat(f.fileno()).st_size
            if size is not None and found_size != size:  # before a byte is copied
                raise errors.Corrupt(f"{what}: {path} is {found_size} bytes, its descriptor "
                                     f"says {size}")
            want = found_size if size is None else size
            with self.content.writer(expect, want) as w:
                # One byte more than it may have: a file that grows meanwhile is refused
                # as that byte arrives, not copied whole.
                w.copy_from(f, limit=want + 1)
                found = (w.commit(), want)
        self.blobs[path] = found
        return found

    def _fetch_document(self, path: str, what: str) -> bytes | None:
        fd = self._open(path, what)
        if fd is None:
            return None
        with open(fd, "rb") as f:
            data = f.read(spec.MAX_DOCUMENT + 1)
        return data

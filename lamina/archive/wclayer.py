"""Windows container layer tars, as go-winio's ``backuptar`` and hcsshim's ``ociwclayer``
write them, imported into and exported from a directory on Linux.

The format: every path is under ``Files/``, ``Hives/`` or ``UtilityVM/Files/``
(besides those directories themselves).  Windows metadata rides in PAX records:
``MSWINDOWS.fileattr`` (attributes, decimal), ``MSWINDOWS.rawsd`` (the security
descriptor, base64), ``MSWINDOWS.mountpoint`` (a reparse point that is a mount
point, on a symlink entry), ``MSWINDOWS.xattr.NAME`` (extended attributes,
base64), ``LIBARCHIVE.creationtime``.  An alternate data stream is a regular
entry named ``FILE:STREAM`` that follows its file.  Whiteouts (``.wh.NAME``) and
hard links are allowed only under ``Files/`` and ``UtilityVM/Files/``, and a base
layer has no whiteouts.  Anything else — ``..``, a drive letter, a backslash, a
device, a path outside those roots — is :class:`~lamina.errors.UnsafeArchive`.

Import keeps everything: file data at its path below the layer directory (an
ADS as a file named ``FILE:STREAM``, which Linux allows), the PAX records as
``user.`` xattrs for inspection, tombstones as overlay whiteouts (so that an
overlay mount of the chain's ``Files/`` is the union), and — for export byte for
byte — every member's header blocks as read, in order, with the archive's end
(tar-split's idea).  The seed's mutated UtilityVM files (the BCD store and its
logs) are also saved as ``bcd.bak`` etc., which ``diff_getter`` serves.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from lamina import progress
from lamina.archive.apply import WHITEOUT_PREFIX, lower_lookup
from lamina.archive.reader import DIR, LINK, REG, SYMLINK, Entry, TarReader
from lamina.archive.writer import padding
from lamina.errors import LaminaError, UnsafeArchive
from lamina.host import fsutil
from lamina.host.fsutil import DIR_FLAGS

ROOTS = ("Files", "Hives", "UtilityVM")
LINKABLE = ("Files/", "UtilityVM/Files/")
MUTATED = {
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD": "bcd.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG": "bcd.log.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG1": "bcd.log1.bak",
    "UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG2": "bcd.log2.bak",
}
RECORD = "tar-split.jsonl"
VENDOR_PREFIXES = ("MSWINDOWS.", "LIBARCHIVE.")
_CHUNK = 1 << 20


def check_name(name: str, kind: str, *, layer: str | None) -> list[str]:
    """The components of a Windows layer path, or ``UnsafeArchive``."""

    def refuse(why: str) -> UnsafeArchive:
        return UnsafeArchive(f"not a Windows layer path: {why}", layer=layer, path=name)

    clean = name[:-1] if name.endswith("/") else name
    if not clean or clean.startswith("/") or "\\" in clean or "\0" in clean:
        raise refuse("absolute, empty, or with a backslash")
    parts = clean.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise refuse("an empty, '.' or '..' component")
    if parts[0] not in ROOTS:
        raise refuse("outside Files/, Hives/ and UtilityVM/Files/")
    if parts[0] == "UtilityVM" and len(parts) > 1 and parts[1] != "Files":
        raise refuse("outside UtilityVM/Files/")
    for i, part in enumerate(parts):
        if ":" not in part:
            continue
        # Only an alternate data stream, FILE:STREAM as the last part of a file entry.
        stem = part.split(":", 1)[0]
        if i != len(parts) - 1 or kind != REG or not stem or i < 1:
            raise refuse("a drive letter or a stream where none can be")
    return parts


class WindowsImporter:
    """Imports one Windows layer tar into a layer directory (see the module docstring)."""

    def __init__(self, root: Path, parents: Sequence[Path], *, layer: str | None) -> None:
        self.root = root
        self.parents = list(parents)  # the parent layers' directories, nearest first
        self.layer = layer

    def apply(self, stream: BinaryIO) -> int:
        """Import the tar ``stream``; return the bytes of file data, as Docker does."""
        reader = TarReader(stream, layer=self.layer, keep_raw=True)
        total = 0
        report = progress.current()
        seen = 0
        root_fd = os.open(self.root, DIR_FLAGS)
        try:
            with open(self.root / RECORD, "w", encoding="ascii") as record:
                for entry in reader:
                    try:
                        total += self._entry(root_fd, reader, entry, record)
                    except LaminaError:
                        raise
                    except OSError as e:
                        raise UnsafeArchive(f"cannot import entry: {e.strerror or e}",
                                            layer=self.layer, path=entry.name) from e
                    if report is not None:
                        report(reader.consumed - seen, 1)
                        seen = reader.consumed
                trailer = reader.trailer()
                record.write(json.dumps({"end": base64.b64encode(trailer).decode()}) + "\n")
        finally:
            os.close(root_fd)
        return total

    def _entry(self, root_fd: int, reader: TarReader, entry: Entry, record: object) -> int:
        parts = check_name(entry.name, entry.type, layer=self.layer)
        path = "/".join(parts)
        base = parts[-1]
        data_path: str | None = None
        size = 0
        if base.startswith(WHITEOUT_PREFIX):
            self._tombstone(root_fd, parts, entry)
        else:
            pfd = self._parent(root_fd, parts[:-1], entry.name)
            try:
                if entry.type == DIR:
                    if not _is_dir_at(pfd, base):
                        _clear(pfd, base)
                        os.mkdir(base, 0o755, dir_fd=pfd)
                    _set_vendor_xattrs(pfd, base, entry)
                elif entry.type == REG:
                    _clear(pfd, base)
                    fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o644, dir_fd=pfd)
                    try:
                        reader.copy_data(entry, fd)
                    finally:
                        os.close(fd)
                    _set_vendor_xattrs(pfd, base, entry)
                    data_path, size = path, entry.size
                    if path in MUTATED:
                        self._save_mutated(pfd, base, MUTATED[path])
                elif entry.type == SYMLINK:
                    _clear(pfd, base)
                    os.symlink(entry.linkname, base, dir_fd=pfd)  # a reparse point
                elif entry.type == LINK:
                    self._hardlink(root_fd, pfd, parts, entry)
                else:
                    raise UnsafeArchive(f"a Windows layer has no member of type {entry.type!r}",
                                        layer=self.layer, path=entry.name)
            finally:
                os.close(pfd)
        if entry.sparse is not None:
            raise UnsafeArchive("sparse members are not part of the Windows layer format",
                                layer=self.layer, path=entry.name)
        line = {"h": base64.b64encode(entry.raw).decode(), "n": entry.data_size}
        if data_path is not None:
            line["p"] = data_path
        record.write(json.dumps(line) + "\n")  # type: ignore[attr-defined]
        return size

    def _parent(self, root_fd: int, parts: Sequence[str], name: str) -> int:
        """The directory fd of ``parts``, made where missing; never through a link."""
        fd = os.dup(root_fd)
        for part in parts:
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError:
                os.close(fd)
                raise UnsafeArchive(f"{part!r} is not a directory", layer=self.layer,
                                    path=name) from None
            os.close(fd)
            fd = nfd
        return fd

    def _tombstone(self, root_fd: int, parts: list[str], entry: Entry) -> None:
        path = "/".join(parts)
        if not path.startswith(LINKABLE):
            raise UnsafeArchive("whiteouts belong under Files/ or UtilityVM/Files/",
                                layer=self.layer, path=entry.name)
        if not self.parents:
            raise UnsafeArchive("a base layer has no whiteouts", layer=self.layer,
                                path=entry.name)
        target = parts[-1][len(WHITEOUT_PREFIX):]
        if target in ("", ".", ".."):
            raise UnsafeArchive("invalid whiteout name", layer=self.layer, path=entry.name)
        pfd = self._parent(root_fd, parts[:-1], entry.name)
        try:
            _clear(pfd, target)
            # An overlay whiteout: a mount of the chain's Files/ hides the name.
            os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
        finally:
            os.close(pfd)

    def _hardlink(self, root_fd: int, pfd: int, parts: list[str], entry: Entry) -> None:
        path = "/".join(parts)
        target = check_name(entry.linkname, REG, layer=self.layer)
        if not path.startswith(LINKABLE) or not "/".join(target).startswith(LINKABLE):
            raise UnsafeArchive("hard links belong under Files/ or UtilityVM/Files/",
                                layer=self.layer, path=entry.name)
        _clear(pfd, parts[-1])
        tfd = self._existing(root_fd, target[:-1])
        if tfd is not None:
            try:
                st = os.lstat(target[-1], dir_fd=tfd)
                if stat.S_ISREG(st.st_mode):
                    os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd,
                            follow_symlinks=False)
                    return
            except FileNotFoundError:
                pass
            finally:
                os.close(tfd)
        # A link to a file of a parent layer: this layer gets its own copy of it.
        found = lower_lookup([str(p) for p in self.parents], target)
        if found is None or not stat.S_ISREG(found[1].st_mode):
            raise UnsafeArchive(f"hard link target {entry.linkname!r} not found",
                                layer=self.layer, path=entry.name)
        src = os.open(os.path.dirname(found[0]), DIR_FLAGS)
        try:
            _copy_as(src, os.path.basename(found[0]), pfd, parts[-1])
        finally:
            os.close(src)

    def _existing(self, root_fd: int, parts: Sequence[str]) -> int | None:
        try:
            return fsutil.open_dir_beneath(root_fd, parts)
        except OSError:
            return None

    def _save_mutated(self, pfd: int, base: str, backup: str) -> None:
        # The seed saves these before the import mutates them; diff_getter serves them.
        src = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            dst = os.open(self.root / backup, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                          | os.O_CLOEXEC, 0o600)
            try:
                fsutil.copy_file_data(src, dst, os.fstat(src).st_size)
            finally:
                os.close(dst)
        finally:
            os.close(src)


def _copy_as(src_dir: int, src_name: str, dst_dir: int, dst_name: str) -> None:
    sfd = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        dfd = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o644, dir_fd=dst_dir)
        try:
            fsutil.copy_file_data(sfd, dfd, os.fstat(sfd).st_size)
            fsutil.copy_xattrs(sfd, dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _is_dir_at(pfd: int, base: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(base, dir_fd=pfd).st_mode)
    except FileNotFoundError:
        return False


def _clear(pfd: int, base: str) -> None:
    try:
        st = os.lstat(base, dir_fd=pfd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(base, dir_fd=pfd)
    else:
        os.unlink(base, dir_fd=pfd)


def _set_vendor_xattrs(pfd: int, base: str, entry: Entry) -> None:
    # Kept for inspection and scanning; the export itself uses the recorded headers.
    for key, value in entry.pax.items():
        if key.startswith(VENDOR_PREFIXES):
            try:
                os.setxattr(f"/proc/self/fd/{pfd}/{base}", "user." + key, value,
                            follow_symlinks=False)
            except OSError:
                continue  # a value too large for the filesystem: the record still has it


def export(root: Path) -> Iterator[bytes]:
    """The imported tar again, byte for byte, from the record and the layer's files."""
    root_fd = os.open(root, DIR_FLAGS)
    try:
        with open(root / RECORD, encoding="ascii") as record:
            for line in record:
                item = json.loads(line)
                if "end" in item:
                    yield base64.b64decode(item["end"])
                    return
                yield base64.b64decode(item["h"])
                size = int(item["n"])
                if size:
                    yield from _data(root_fd, item["p"], size)
                    yield padding(size)
    finally:
        os.close(root_fd)


def _data(root_fd: int, path: str, size: int) -> Iterator[bytes]:
    ffd = fsutil.open_file_beneath(root_fd, path)
    try:
        left = size
        while left > 0:
            chunk = os.read(ffd, min(_CHUNK, left))
            if not chunk:
                yield bytes(left)  # the file shrank: keep the archive well formed
                return
            left -= len(chunk)
            yield chunk
    finally:
        os.close(ffd)


def data_size(root: Path) -> int:
    """Bytes of file data the layer's tar carries."""
    total = 0
    with open(root / RECORD, encoding="ascii") as record:
        for line in record:
            item = json.loads(line)
            if "p" in item:
                total += int(item["n"])
    return total

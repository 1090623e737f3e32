"""What a tree takes: apparent bytes, bytes on disk and inodes, a hard-linked file once.

The one size walk of lamina: the manifest's totals, ``df``'s walk of writable layers,
the overlay diff size and the loop-image quotas' base all count with :class:`Tally`, so
they agree with each other on every tree.  Read-only; no crash model to state.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from lamina.host.fsutil import DIR_FLAGS


@dataclass(frozen=True)
class Totals:
    """What a tree's entries take: apparent bytes of regular files, bytes on disk, inodes."""

    bytes: int
    disk: int
    inodes: int


class Tally:
    """Adds up entries' lstat results, counting each inode of a non-directory once."""

    __slots__ = ("_seen", "bytes", "disk", "inodes")

    def __init__(self) -> None:
        self.bytes = self.disk = self.inodes = 0
        self._seen: set[tuple[int, int]] = set()

    def add(self, st: os.stat_result) -> bool:
        """Count ``st``; False (and nothing counted) for another link to a counted inode."""
        mode = st.st_mode
        if st.st_nlink > 1 and not stat.S_ISDIR(mode):
            key = (st.st_dev, st.st_ino)
            if key in self._seen:
                return False
            self._seen.add(key)
        self.inodes += 1
        self.disk += st.st_blocks * 512
        if stat.S_ISREG(mode):
            self.bytes += st.st_size
        return True

    def totals(self) -> Totals:
        """What has been counted so far."""
        return Totals(self.bytes, self.disk, self.inodes)


def tree_totals(root: str | os.PathLike[str]) -> Totals:
    """The :class:`Totals` of everything below ``root`` (not ``root`` itself), walked by
    directory fds without following symlinks."""
    tally = Tally()
    fd = os.open(root, DIR_FLAGS)
    try:
        _walk(fd, tally)
    finally:
        os.close(fd)
    return tally.totals()


def _walk(fd: int, tally: Tally) -> None:
    with os.scandir(fd) as it:
        entries = list(it)
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # gone since the listing (a running container's layer)
        tally.add(st)
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(entry.name, DIR_FLAGS, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                _walk(sub, tally)
            finally:
                os.close(sub)

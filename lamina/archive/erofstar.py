"""A layer tar indexed as an EROFS metadata image, in one pass, nothing extracted.

:func:`index_tar` reads an uncompressed layer tar once with lamina's
:class:`~lamina.archive.reader.TarReader`, builds the layer's tree in memory
(:class:`~lamina.archive.erofsimage.ImageTree`) and writes an EROFS image whose
regular files point into the tar itself (:mod:`lamina.archive.erofs`).  Mounted
with the tar as its extra device, the image shows what extracting the tar shows,
with overlayfs' markers for what a lower layer must not show.

Semantics, as contract §2 has them for a layer:

- a later member replaces an earlier one of the same name (a file replacing a
  directory drops what was below it, and the reverse); a directory over a directory
  merges, the later one's metadata winning and xattrs added;
- names are cleaned as lamina cleans them (``.`` components and repeated slashes
  dropped); a name with a ``..`` component, an absolute name, an empty one, or a
  component longer than 255 bytes is :class:`~lamina.errors.UnsafeArchive` (the
  reader already refuses NUL);
- a missing parent directory is created 0755, owned by root, with the image's epoch
  as its mtime (as extraction creates it); a symlink met as a parent is followed as
  a chroot at the layer root would follow it, inside this layer's tree;
- ``.wh.NAME`` becomes a 0/0 character device NAME (overlayfs' whiteout) unless the
  layer has NAME itself; ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on its
  directory; other ``.wh..wh.`` names are ignored (as Docker does); a bare ``.wh.``
  or a whiteout of ``.``/``..`` is ``UnsafeArchive``;
- ``trusted.overlay.*`` and ``user.overlay.*`` xattrs from the tar are dropped, as are
  names without a Linux namespace; an xattr EROFS cannot hold (a name past 255 bytes,
  a value past 64 KiB) is ``Unsupported``;
- a hard link to an earlier member is the same inode (its link count counted).

What cannot be an image over this tar is :class:`~lamina.errors.Unsupported`,
naming the path, so that the caller keeps the layer as a directory instead:
a sparse member (its data is not contiguous in the tar), a hard link to a file
this tar does not carry (a lower layer's), an opaque marker at the layer root
(overlayfs ignores the xattr on a layer's root: only whiteouts of the lowers'
names, which this tar cannot list, would do), a 0/0 character device (it would be
a whiteout), and a tar past 2 TiB (32-bit block numbers).
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from lamina.archive import erofs
from lamina.archive.apply import xattr_allowed
from lamina.archive.entry import BLK, BLOCK, CHR, DIR, FIFO, LINK, REG, SYMLINK, Entry
from lamina.archive.erofsimage import IMPLICIT, ImageStats, ImageTree
from lamina.archive.reader import TarReader
from lamina.archive.resolve import MAX_DEPTH, MAX_SYMLINKS
from lamina.archive.union import OPAQUE_MARKER, OVERLAY_OPAQUE_XATTR, WHITEOUT_PREFIX
from lamina.errors import UnsafeArchive, Unsupported
from lamina.host.idmap import IdMapper

__all__ = ["ImageStats", "index_tar"]

_CACHE_MAX = 512
_SPECIAL = {CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}


def index_tar(stream: BinaryIO, out: BinaryIO, *, layer: str | None = None,
              ids: IdMapper | None = None, max_entries: int | None = None) -> ImageStats:
    """Read the uncompressed tar ``stream`` to its end and write to the file ``out`` the
    EROFS image that shows it with the tar as device 1 (see the module docstring).

    ``stream`` must give the tar's bytes exactly as they are stored for the mount: the
    image records offsets into it.  ``ids`` maps owners as apply does; ``max_entries``
    bounds the members."""
    reader = TarReader(stream, layer=layer)
    builder = _Builder(layer, ids or IdMapper())
    for count, entry in enumerate(reader, 1):
        if max_entries is not None and count > max_entries:
            raise UnsafeArchive(f"more than {max_entries} entries", layer=layer)
        builder.add(entry, reader.consumed)
    reader.finish()
    return builder.tree.write(out, reader.consumed)


class _Builder:
    """Tar members into an :class:`ImageTree`."""

    def __init__(self, layer: str | None, ids: IdMapper) -> None:
        self.layer = layer
        self.ids = ids
        self.tree = ImageTree()
        # Directories by cleaned path: most members sit beside the one before them.
        self._cache: dict[tuple[str, ...], int] = {}

    def _unsafe(self, message: str, name: str) -> UnsafeArchive:
        return UnsafeArchive(message, layer=self.layer, path=name)

    def _unsupported(self, message: str, name: str) -> Unsupported:
        return Unsupported(f"cannot be an EROFS layer: {message}", layer=self.layer, path=name)

    # -- names ------------------------------------------------------------------

    def _clean(self, name: str) -> list[str]:
        if not name:
            raise self._unsafe("empty name", name)
        if name.startswith("/"):
            raise self._unsafe("absolute name", name)
        parts = [part for part in name.split("/") if part and part != "."]
        if ".." in parts:
            raise self._unsafe("name has a '..' component", name)
        if len(parts) > MAX_DEPTH + 1:
            raise self._unsafe(f"name is more than {MAX_DEPTH} directories deep", name)
        return parts

    def _component(self, part: str, name: str) -> bytes:
        raw = os.fsencode(part)
        if len(raw) > erofs.NAME_MAX:
            raise self._unsafe(f"a name component is longer than {erofs.NAME_MAX} bytes", name)
        return raw

    def _dir(self, parts: list[str], name: str) -> int:
        """The directory ``parts`` names, made where missing."""
        key = tuple(parts)
        node = self._cache.get(key)
        if node is None:
            node = self._walk([self._component(p, name) for p in parts], True, name)
            assert node is not None
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = node
        return node

    def _walk(self, parts: list[bytes], create: bool, name: str) -> int | None:
        """Resolve ``parts`` from the root as a chroot would, following symlinks inside
        the tree; a missing directory is made (``create``) or None."""
        tree = self.tree
        stack = [tree.root]
        todo = list(reversed(parts))
        links = 0
        while todo:
            part = todo.pop()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            children = tree.children(stack[-1])
            child = children.get(part)
            if child is None or tree.is_whiteout(child):
                if not create:
                    return None
                if len(part) > erofs.NAME_MAX:
                    raise self._unsafe("a symlink leads to a name too long", name)
                child = children[part] = tree.new_dir(0o755, *self._owner(0, 0, name), IMPLICIT)
            elif tree.kind(child) == stat.S_IFLNK:
                links += 1
                if links > MAX_SYMLINKS:
                    raise self._unsafe("too many levels of symbolic links", name)
                target = tree.targets[tree.ref[child]]
                if target.startswith(b"/"):
                    del stack[1:]
                todo.extend(reversed(target.split(b"/")))
                continue
            elif tree.kind(child) != stat.S_IFDIR:
                raise self._unsafe(f"{os.fsdecode(part)!r} is not a directory", name)
            stack.append(child)
            if len(stack) > MAX_DEPTH + 1:
                raise self._unsafe(f"path is more than {MAX_DEPTH} directories deep", name)
        return stack[-1]

    def _owner(self, uid: int, gid: int, name: str) -> tuple[int, int]:
        return self.ids.to_host(uid, gid, self.layer, name)

    def _put(self, parent: int, base: bytes, node: int) -> None:
        children = self.tree.children(parent)
        old = children.get(base)
        children[base] = node
        if old is not None and self.tree.kind(old) in (stat.S_IFDIR, stat.S_IFLNK):
            self._cache.clear()  # paths through the old name lead elsewhere now

    # -- members ----------------------------------------------------------------

    def add(self, entry: Entry, data_offset: int) -> None:
        """Add one member whose data (if any) starts at ``data_offset`` in the tar."""
        name = entry.name
        parts = self._clean(name)
        if not parts:
            if entry.type != DIR:
                raise self._unsafe("root entry is not a directory", name)
            self._dir_metadata(self.tree.root, entry)
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, base, name, entry)
            return
        parent = self._dir(parts[:-1], name)
        raw = self._component(base, name)
        kind = entry.type
        if kind == DIR:
            old = self.tree.children(parent).get(raw)
            if old is not None and self.tree.kind(old) == stat.S_IFDIR:
                self._dir_metadata(old, entry)
                return
            node = self.tree.new_dir(0, 0, 0, 0)
            self._dir_metadata(node, entry)
        elif kind == LINK:
            node = self._hardlink(entry)
            if self.tree.children(parent).get(raw) == node:
                return
        else:
            node = self._node(entry, data_offset)
            xattrs = self._xattrs(entry)
            if xattrs:
                self.tree.xattrs[node] = xattrs
        self._put(parent, raw, node)

    def _node(self, entry: Entry, data_offset: int) -> int:
        """A new inode for a file, symlink, device or fifo member."""
        tree = self.tree
        name = entry.name
        uid, gid = self._owner(entry.uid, entry.gid, name)
        perm = entry.mode & 0o7777
        if entry.type == REG:
            if entry.sparse is not None:
                raise self._unsupported("a sparse file's data is not contiguous in the tar",
                                        name)
            assert data_offset % BLOCK == 0
            block = data_offset // BLOCK
            if block + -(-entry.size // BLOCK) > erofs.MAX_BLKADDR:
                raise self._unsupported("data past 2 TiB into the tar", name)
            return tree.new_file(perm, uid, gid, entry.mtime, entry.size, block)
        if entry.type == SYMLINK:
            if not entry.linkname:
                raise self._unsafe("symlink with an empty target", name)
            target = os.fsencode(entry.linkname)
            return tree.new_symlink(perm, uid, gid, entry.mtime, target)
        major, minor = entry.devmajor, entry.devminor
        if entry.type == CHR and major == minor == 0:
            raise self._unsupported("a 0/0 character device is overlayfs' whiteout", name)
        if not erofs.dev_fits(major, minor):
            raise self._unsafe(f"device number {major}:{minor} out of range", name)
        rdev = erofs.encode_dev(major, minor)
        return tree.new_special(_SPECIAL[entry.type] | perm, uid, gid, entry.mtime, rdev)

    def _dir_metadata(self, node: int, entry: Entry) -> None:
        tree = self.tree
        tree.uid[node], tree.gid[node] = self._owner(entry.uid, entry.gid, entry.name)
        tree.mode[node] = stat.S_IFDIR | entry.mode & 0o7777
        tree.mtime[node] = entry.mtime
        xattrs = self._xattrs(entry)
        if xattrs:
            tree.xattrs.setdefault(node, {}).update(xattrs)

    def _xattrs(self, entry: Entry) -> dict[str, bytes]:
        kept = {}
        for key, value in entry.xattrs.items():
            if not xattr_allowed(key) or erofs.xattr_key(key) is None:
                continue
            problem = erofs.xattr_error(key, value)
            if problem is not None:
                raise self._unsupported(problem, entry.name)
            kept[key] = value
        return kept

    def _hardlink(self, entry: Entry) -> int:
        """The inode a hard link member names."""
        name = entry.name
        target = self._clean(entry.linkname)
        if not target:
            raise self._unsafe("hard link to the layer root", name)
        raw = [self._component(part, name) for part in target]
        parent = self._walk(raw[:-1], False, name)
        node = None if parent is None else self.tree.children(parent).get(raw[-1])
        if node is None:
            raise self._unsupported(
                f"hard link target {entry.linkname!r} is not in this layer", name)
        if self.tree.is_whiteout(node):
            raise self._unsafe(f"hard link target {entry.linkname!r} is deleted", name)
        if self.tree.kind(node) == stat.S_IFDIR:
            raise self._unsafe("hard link to a directory", name)
        return node

    def _whiteout(self, parts: list[str], base: str, name: str, entry: Entry) -> None:
        tree = self.tree
        if base == OPAQUE_MARKER:
            if len(parts) == 1:
                raise self._unsupported("an opaque marker at the layer root", name)
            node = self._dir(parts[:-1], name)
            tree.xattrs.setdefault(node, {})[OVERLAY_OPAQUE_XATTR] = b"y"
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other whiteout meta files are ignored, as Docker does
        target = base[len(WHITEOUT_PREFIX):]
        if target in ("", ".", ".."):
            raise self._unsafe("invalid whiteout name", name)
        parent = self._dir(parts[:-1], name)
        raw = self._component(target, name)
        if raw in tree.children(parent):
            return  # whiteouts hide the lowers only, never this layer's own entries
        uid, gid = self._owner(0, 0, name)
        tree.children(parent)[raw] = tree.new_special(stat.S_IFCHR, uid, gid, entry.mtime, 0)

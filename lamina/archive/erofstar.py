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
  dropped, an absolute name is the layer's own: ``/x`` is ``x``, as Docker has it);
  a name with a ``..`` component, an empty one, a component longer than 255 bytes or
  a path (symlinks followed) of PATH_MAX bytes or more from the layer root is
  :class:`~lamina.errors.UnsafeArchive`, as extracting it fails (the reader already
  refuses NUL);
- a missing parent directory is copied up from the lower layers where they have it
  and are known (``lowers``), else created 0755, owned by root, with the image's
  epoch as its mtime (as extraction creates it); a symlink met as a parent (this
  layer's, or a lower's where this layer has nothing) is followed as a chroot at the
  layer root would follow it: nothing leaves the tree;
- ``.wh.NAME`` becomes a 0/0 character device NAME (overlayfs' whiteout) unless the
  layer has NAME itself (and, the lowers known, only where a lower has NAME);
  ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on its directory, or at the
  root (where overlayfs ignores the xattr) whiteouts each name the lowers have
  there; other ``.wh..wh.`` names are ignored (as Docker does); a bare ``.wh.`` or
  a whiteout of ``.``/``..`` is ``UnsafeArchive``;
- ``trusted.overlay.*`` and ``user.overlay.*`` xattrs from the tar are dropped, as are
  names without a Linux namespace and ``user.*`` on what is neither a file nor a
  directory (Linux refuses those); an xattr EROFS cannot hold (a name past 255 bytes,
  a value past 64 KiB) is ``Unsupported``; a symlink's target is 1 to 4095 bytes,
  its mode 0777 whatever the member says (as ``symlink(2)`` makes it);
- a hard link to an earlier member is the same inode (its link count counted).

What cannot be an image over this tar is :class:`~lamina.errors.Unsupported`,
naming the path, so that the caller keeps the layer as a directory instead:
a sparse member (its data is not contiguous in the tar), xattrs past an inode's
inline area (some 256 KiB of them), a hard link to a file
this tar does not carry (a lower layer's: the image cannot copy its data up), an
opaque marker at the layer root when the lowers are not known (only whiteouts of
their names would do), a 0/0 character device (it would be a whiteout), and a tar
past 2 TiB (32-bit block numbers).  This is the same union that
:class:`~lamina.archive.apply.Applier` writes with ``overlay_whiteouts`` over the
same lowers (tests/archive/test_erofs.py compares them).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import BinaryIO, cast

from isal import isal_zlib

from lamina import crashpoints, progress
from lamina.archive import erofs
from lamina.archive.apply import xattr_allowed
from lamina.archive.digests import MAX_DIGESTS
from lamina.archive.entry import BLK, BLOCK, CHR, DIR, FIFO, LINK, REG, SYMLINK, Entry
from lamina.archive.erofsimage import IMPLICIT, ImageStats, ImageTree
from lamina.archive.reader import TarReader
from lamina.archive.resolve import MAX_DEPTH, MAX_SYMLINKS
from lamina.archive.union import (
    OPAQUE_MARKER,
    WHITEOUT_PREFIX,
    lower_lookup,
)
from lamina.errors import UnsafeArchive, Unsupported
from lamina.host.idmap import IdMapper

__all__ = ["ImageStats", "index_tar"]

_CACHE_MAX = 512
IMAGE_OPAQUE_XATTR = "trusted.overlay.opaque"
"""An image's opaque directories: real root's overlayfs mounts the images (a user
namespace cannot mount EROFS, so no image is ever read with ``userxattr``)."""
_ICOUNT_MAX = 0xFFFF  # i_xattr_icount, 16 bits
_PATH_MAX = 4096  # symlink(2) takes no target of this length or more, nor an empty one
_Place = tuple[int, tuple[bytes, ...], bool]
"""A directory of the tree: its inode, its path in the union, whether an opaque
directory of this layer (it, or one above it) hides the lowers there."""
_SPECIAL = {CHR: stat.S_IFCHR, BLK: stat.S_IFBLK, FIFO: stat.S_IFIFO}


def index_tar(stream: BinaryIO, out: BinaryIO, *, layer: str | None = None,
              ids: IdMapper | None = None, max_entries: int | None = None,
              lowers: Sequence[str] | None = None, store: BinaryIO | None = None,
              checksums: bool = False) -> ImageStats:
    """Read the uncompressed tar ``stream`` to its end and write to the file ``out`` the
    EROFS image that shows it with the tar as device 1 (see the module docstring).

    ``stream`` must give the tar's bytes exactly as they are stored for the mount: the
    image records offsets into it.  ``store``, if given, receives those bytes as they
    are read (all of them, to the stream's end: the device itself, in the same pass;
    syncing it is the caller's).  ``ids`` maps owners as apply does; ``max_entries``
    bounds the members.  ``checksums``: the regular files' CRC-32s are taken as their
    data passes, for the returned :attr:`ImageStats.digests`.

    ``lowers``: the union of the layers below (their root directories, nearest first,
    as the applier takes them), or None where it is not known.  Known, it is consulted
    as the applier consults it: a missing parent that a lower has is copied up (its
    owner, mode, mtime and xattrs), a lower's symlink met as a parent is followed, a
    whiteout is written only where a lower has the name, and an opaque marker at the
    root becomes a whiteout of each name the lowers have there.  Unknown, parents are
    made 0755 and root's, every whiteout is written, and an opaque root is
    ``Unsupported``."""
    if store is not None:
        stream = cast(BinaryIO, _Tee(stream, store))  # the reader calls read() alone
    reader = TarReader(stream, layer=layer)
    builder = _Builder(layer, ids or IdMapper(), lowers)
    crcs = builder.tree.crc
    report = progress.current()
    seen = summed = 0
    for count, entry in enumerate(reader, 1):
        if max_entries is not None and count > max_entries:
            raise UnsafeArchive(f"more than {max_entries} entries", layer=layer)
        crashpoints.reached("index:entry")
        node = builder.add(entry, reader.consumed)
        if checksums and node is not None and summed < MAX_DIGESTS:
            summed += 1
            # The data passes by anyway (to ``store``): its CRC-32 now spares the
            # manifest a second read of every file through the mount.
            crc = 0
            if entry.size:
                for chunk in reader.data_chunks(entry):
                    crc = isal_zlib.crc32(chunk, crc)
            crcs[node] = crc
        if report is not None:
            report(reader.consumed - seen, 1)
            seen = reader.consumed
    reader.finish()
    if report is not None:
        report(reader.consumed - seen, 0)
    builder.finish()
    return builder.tree.write(out, reader.consumed)


class _Tee:
    """A stream that writes what is read from it to ``copy``."""

    def __init__(self, stream: BinaryIO, copy: BinaryIO) -> None:
        self.stream = stream
        self.copy = copy

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.copy.write(data)
        return data


class _Builder:
    """Tar members into an :class:`ImageTree`."""

    def __init__(self, layer: str | None, ids: IdMapper, lowers: Sequence[str] | None) -> None:
        self.layer = layer
        self.ids = ids
        self.lowers = None if lowers is None else list(lowers)
        self.tree = ImageTree()
        # The root, where the tar has none, as the applier's: the container's root's.
        root_uid, root_gid = ids.to_host(0, 0, layer, "/")
        self.tree.uid[self.tree.root], self.tree.gid[self.tree.root] = root_uid, root_gid
        # Directories by cleaned path: most members sit beside the one before them.
        self._cache: dict[tuple[str, ...], _Place] = {}
        self._root_opaque = False

    def _unsafe(self, message: str, name: str) -> UnsafeArchive:
        return UnsafeArchive(message, layer=self.layer, path=name)

    def _unsupported(self, message: str, name: str) -> Unsupported:
        return Unsupported(f"cannot be an EROFS layer: {message}", layer=self.layer, path=name)

    # -- names ------------------------------------------------------------------

    def _clean(self, name: str) -> list[str]:
        if not name:
            raise self._unsafe("empty name", name)
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

    def _dir(self, parts: list[str], name: str, *, copy_up_only: bool = False) -> _Place | None:
        """The directory ``parts`` names: made where missing (``copy_up_only``: only
        where a lower layer has it; else None)."""
        key = tuple(parts)
        place = self._cache.get(key)
        if place is None:
            raw = [self._component(p, name) for p in parts]
            place = self._walk(raw, True, name, copy_up_only)
            if place is None:
                return None
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = place
        return place

    def _walk(self, parts: list[bytes], create: bool, name: str,
              copy_up_only: bool = False) -> _Place | None:
        """Resolve ``parts`` from the root as a chroot would, following symlinks (this
        layer's, or the lowers' where this layer has nothing); a missing directory is
        made (``create``), copied up from the lowers where they have it, or None."""
        tree = self.tree
        stack = [tree.root]
        path: list[bytes] = []  # the names that lead to stack[-1]
        todo = list(reversed(parts))
        links = 0
        length = 0  # of "/" + "/".join(path)
        while todo:
            part = todo.pop()
            if part in (b"", b"."):
                continue
            if part == b"..":
                if path:
                    stack.pop()
                    length -= len(path.pop()) + 1
                continue
            children = tree.children(stack[-1])
            child = children.get(part)
            target: bytes | None = None
            if child is None or tree.is_whiteout(child):
                lower = None if child is not None else self._in_lowers(stack, path, part)
                if lower is not None and stat.S_ISLNK(lower[1].st_mode):
                    target = os.fsencode(os.readlink(lower[0]))
                elif lower is not None and not stat.S_ISDIR(lower[1].st_mode):
                    raise self._unsafe(f"{os.fsdecode(part)!r} is not a directory", name)
                elif not create or (copy_up_only and lower is None):
                    return None
                else:
                    child = children[part] = self._parent_dir(part, lower, name)
            elif tree.kind(child) == stat.S_IFLNK:
                target = tree.targets[tree.ref[child]]
            elif tree.kind(child) != stat.S_IFDIR:
                raise self._unsafe(f"{os.fsdecode(part)!r} is not a directory", name)
            if target is not None:
                links += 1
                if links > MAX_SYMLINKS:
                    raise self._unsafe("too many levels of symbolic links", name)
                if target.startswith(b"/"):
                    del stack[1:], path[:]
                    length = 0
                todo.extend(reversed(target.split(b"/")))
                continue
            assert child is not None
            stack.append(child)
            path.append(part)
            length += len(part) + 1
            if length >= _PATH_MAX:
                raise self._unsafe(f"path is {_PATH_MAX} bytes or longer", name)
            if len(stack) > MAX_DEPTH + 1:
                raise self._unsafe(f"path is more than {MAX_DEPTH} directories deep", name)
        return stack[-1], tuple(path), any(map(self._opaque, stack[1:]))

    def _opaque(self, node: int) -> bool:
        return self.tree.xattrs.get(node, {}).get(IMAGE_OPAQUE_XATTR) == b"y"

    def _in_lowers(self, stack: list[int], path: list[bytes],
                   part: bytes) -> tuple[str, os.stat_result] | None:
        """What the lower layers show at ``path``/``part``, unless an opaque directory of
        this layer above it hides them."""
        if not self.lowers or any(map(self._opaque, stack[1:])):
            return None
        return lower_lookup(self.lowers, [*map(os.fsdecode, path), os.fsdecode(part)])

    def _parent_dir(self, part: bytes, lower: tuple[str, os.stat_result] | None,
                    name: str) -> int:
        """A directory no member named: the lower layer's copied up (owner, mode, mtime,
        xattrs: the union must not change), else 0755 and root's."""
        if len(part) > erofs.NAME_MAX:
            raise self._unsafe("a symlink leads to a name too long", name)
        if lower is None:
            return self.tree.new_dir(0o755, *self._owner(0, 0, name), IMPLICIT)
        where, st = lower
        node = self.tree.new_dir(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
        xattrs = {key: os.getxattr(where, key, follow_symlinks=False)
                  for key in os.listxattr(where, follow_symlinks=False)
                  if xattr_allowed(key) and erofs.xattr_key(key) is not None}
        if xattrs:
            self.tree.xattrs[node] = xattrs
        return node

    def _owner(self, uid: int, gid: int, name: str) -> tuple[int, int]:
        return self.ids.to_host(uid, gid, self.layer, name)

    def _put(self, parent: int, base: bytes, node: int) -> None:
        children = self.tree.children(parent)
        old = children.get(base)
        children[base] = node
        if old is not None and self.tree.kind(old) in (stat.S_IFDIR, stat.S_IFLNK):
            self._cache.clear()  # paths through the old name lead elsewhere now

    # -- members ----------------------------------------------------------------

    def add(self, entry: Entry, data_offset: int) -> int | None:
        """Add one member whose data (if any) starts at ``data_offset`` in the tar; the
        new inode of a regular file's (not a hard link's), else None."""
        name = entry.name
        parts = self._clean(name)
        if not parts:
            if entry.type != DIR:
                raise self._unsafe("root entry is not a directory", name)
            self._dir_metadata(self.tree.root, entry)
            return None
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts, base, name, entry)
            return None
        place = self._dir(parts[:-1], name)
        assert place is not None
        parent = place[0]
        raw = self._component(base, name)
        if sum(map(len, place[1])) + len(place[1]) + 1 + len(raw) >= _PATH_MAX:
            raise self._unsafe(f"path is {_PATH_MAX} bytes or longer", name)
        kind = entry.type
        if kind == DIR:
            old = self.tree.children(parent).get(raw)
            if old is not None and self.tree.kind(old) == stat.S_IFDIR:
                self._dir_metadata(old, entry)
                return None
            node = self.tree.new_dir(0, 0, 0, 0)
            self._dir_metadata(node, entry)
        elif kind == LINK:
            node = self._hardlink(entry)
            if self.tree.children(parent).get(raw) == node:
                return None
        else:
            node = self._node(entry, data_offset)
            xattrs = self._xattrs(entry)
            if xattrs:
                self.tree.xattrs[node] = self._fitting(xattrs, entry.name)
            self._put(parent, raw, node)
            return node if kind == REG else None
        self._put(parent, raw, node)
        return None

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
            target = os.fsencode(entry.linkname)
            if not 0 < len(target) < _PATH_MAX:
                raise self._unsafe(f"symlink target of {len(target)} bytes", name)
            # 0777 whatever the member says: symlink(2) makes every symlink so (the
            # directory applier's too), and the image must show what a directory layer does.
            return tree.new_symlink(0o777, uid, gid, entry.mtime, target)
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
            tree.xattrs[node] = self._fitting({**tree.xattrs.get(node, {}), **xattrs},
                                              entry.name)

    def _fitting(self, xattrs: dict[str, bytes], name: str) -> dict[str, bytes]:
        """``xattrs``, which must fit one inode's inline xattr area (its size in 4-byte
        slots is 16 bits: some 256 KiB), else ``Unsupported``."""
        if erofs.xattr_icount(erofs.xattr_body(xattrs)) > _ICOUNT_MAX:
            raise self._unsupported("its xattrs take more than an EROFS inode holds", name)
        return xattrs

    def _xattrs(self, entry: Entry) -> dict[str, bytes]:
        """The member's xattrs that the image keeps (see the module docstring)."""
        kept = {}
        # Linux allows user.* on regular files and directories only: extraction drops
        # them elsewhere (EPERM), and so does the image.
        user_ok = entry.type in (REG, DIR)
        for key, value in entry.xattrs.items():
            if not xattr_allowed(key) or erofs.xattr_key(key) is None:
                continue
            if not user_ok and key.startswith("user."):
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
        place = self._walk(raw[:-1], False, name)
        node = None if place is None else self.tree.children(place[0]).get(raw[-1])
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
            self._opaque_marker(parts, name)
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other whiteout meta files are ignored, as Docker does
        target = base[len(WHITEOUT_PREFIX):]
        if target in ("", ".", ".."):
            raise self._unsafe("invalid whiteout name", name)
        raw = self._component(target, name)
        place = self._dir(parts[:-1], name, copy_up_only=self.lowers is not None)
        if place is None:
            return  # no such directory in the union: nothing to hide
        parent, path, hidden = place
        if raw in tree.children(parent):
            return  # whiteouts hide the lowers only, never this layer's own entries
        if self.lowers is not None and (hidden or not lower_lookup(
                self.lowers, [*map(os.fsdecode, path), target])):
            return  # no lower has it
        uid, gid = self._owner(0, 0, name)
        tree.children(parent)[raw] = tree.new_special(stat.S_IFCHR, uid, gid, entry.mtime, 0)

    def _opaque_marker(self, parts: list[str], name: str) -> None:
        if len(parts) > 1:
            place = self._dir(parts[:-1], name)
            assert place is not None
            self.tree.xattrs.setdefault(place[0], {})[IMAGE_OPAQUE_XATTR] = b"y"
            self._cache.clear()  # the lowers are hidden below it now
        elif self.lowers is None:
            raise self._unsupported("an opaque marker at the layer root, the lowers unknown",
                                    name)
        else:
            self._root_opaque = True  # see finish()

    def finish(self) -> None:
        """After the last member: an opaque root hides each name the lowers have there,
        one whiteout each (overlayfs ignores the opaque xattr on a layer's root)."""
        if not self._root_opaque or not self.lowers:
            return
        tree = self.tree
        children = tree.children(tree.root)
        for name in sorted({name for lower in self.lowers for name in os.listdir(lower)}):
            raw = os.fsencode(name)
            if raw not in children and lower_lookup(self.lowers, [name]) is not None:
                children[raw] = tree.new_special(stat.S_IFCHR, *self._owner(0, 0, name),
                                                 IMPLICIT, 0)

"""The tree of an EROFS metadata image, held small in memory, and its writing.

:class:`ImageTree` keeps one row per inode in typed arrays (mode, owners, mtime,
size, and a reference: a tar block for a file's data, ``rdev`` for a device, an
index into the symlink targets or the directories) and one ``dict`` of name to
inode per directory; xattrs live in a side table for the few inodes that have any.
:mod:`lamina.archive.erofstar` fills it from a tar; :meth:`ImageTree.write` lays it
out as :mod:`lamina.archive.erofs` describes and writes the image:

1. a walk from the root, breadth first and by name, gives every reachable inode its
   place in the order, its link count, and each directory its parent (an inode
   replaced by a later member is unreachable and is not written);
2. a layout pass gives each inode its nid (its slot in the metadata area) and each
   directory or symlink that is not inline its blocks in the data area;
3. a writing pass encodes every inode, its xattrs and its data or chunk indexes, in
   order, and the superblock and device table last.
"""

from __future__ import annotations

import os
import stat
from array import array
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from lamina.archive import erofs
from lamina.archive.digests import MAX_DIGESTS

IMPLICIT = -(1 << 63)
"""The mtime of a directory no member named (a missing parent): the image's epoch."""


@dataclass(frozen=True, slots=True)
class ImageStats:
    """What :meth:`ImageTree.write` wrote."""

    inodes: int
    image_size: int
    tar_size: int
    file_bytes: int = 0
    """The regular files' data, each inode once (what extracting the tar writes)."""
    digests: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    """The files whose CRC-32 the tree was given (:attr:`ImageTree.crc`), by the inode
    number the kernel reports for them (the nid): ``(size, mtime_ns, crc)``, as
    :data:`lamina.archive.digests.Digests` has them for a store's manifest; at most
    :data:`~lamina.archive.digests.MAX_DIGESTS` of them (the manifest reads the others)."""


class ImageTree:
    """The inodes and directories of one image (see the module docstring)."""

    def __init__(self) -> None:
        self.mode = array("I")
        self.uid = array("I")
        self.gid = array("I")
        self.mtime = array("q")  # nanoseconds, or IMPLICIT
        self.size = array("Q")
        self.ref = array("Q")
        self.xattrs: dict[int, dict[str, bytes]] = {}
        self.dirs: list[dict[bytes, int]] = []
        self.targets: list[bytes] = []
        self.crc = array("q")
        """Per inode, its data's CRC-32 where the caller had it (see ImageStats), else -1."""
        self.root = self.new_dir(0o755, 0, 0, IMPLICIT)

    # -- building ---------------------------------------------------------------

    def _new(self, mode: int, uid: int, gid: int, mtime: int, size: int, ref: int) -> int:
        self.mode.append(mode)
        self.uid.append(uid)
        self.gid.append(gid)
        self.mtime.append(mtime)
        self.size.append(size)
        self.ref.append(ref)
        self.crc.append(-1)
        return len(self.mode) - 1

    def new_dir(self, perm: int, uid: int, gid: int, mtime: int) -> int:
        """A new, empty directory."""
        self.dirs.append({})
        return self._new(stat.S_IFDIR | perm, uid, gid, mtime, 0, len(self.dirs) - 1)

    def new_file(self, perm: int, uid: int, gid: int, mtime: int, size: int, block: int) -> int:
        """A regular file of ``size`` bytes whose data starts at tar block ``block``."""
        return self._new(stat.S_IFREG | perm, uid, gid, mtime, size, block)

    def new_symlink(self, perm: int, uid: int, gid: int, mtime: int, target: bytes) -> int:
        """A symbolic link to ``target``."""
        self.targets.append(target)
        return self._new(stat.S_IFLNK | perm, uid, gid, mtime, len(target), len(self.targets) - 1)

    def new_special(self, mode: int, uid: int, gid: int, mtime: int, rdev: int) -> int:
        """A device, fifo or socket (``mode`` has its type); ``rdev`` as the inode holds it."""
        return self._new(mode, uid, gid, mtime, 0, rdev)

    def children(self, node: int) -> dict[bytes, int]:
        """The entries of the directory ``node``: name to inode."""
        return self.dirs[self.ref[node]]

    def kind(self, node: int) -> int:
        """The file type bits of ``node``."""
        return stat.S_IFMT(self.mode[node])

    def is_whiteout(self, node: int) -> bool:
        """Whether ``node`` is an overlay whiteout (a 0/0 character device)."""
        return self.mode[node] & 0o170000 == stat.S_IFCHR and self.ref[node] == 0

    # -- writing ----------------------------------------------------------------

    def write(self, out: BinaryIO, tar_size: int) -> ImageStats:
        """Write the image to the file ``out`` (from its offset 0, with ``pwrite``), for a
        tar of ``tar_size`` bytes attached as device 1."""
        order, nlink, parent = self._walk()
        epoch = _frequent(self.mtime[node] for node in order)
        layout = _Layout(self, order, nlink, epoch)
        layout.place_all()
        out.flush()
        fd = out.fileno()
        layout.write_all(fd, parent)
        size = layout.data_end
        os.ftruncate(fd, size)
        tar_blocks = -(-tar_size // erofs.BLOCK_SIZE)
        head = erofs.superblock(root_nid=layout.nid[self.root], inodes=len(order),
                                epoch=epoch // 1_000_000_000, epoch_nsec=epoch % 1_000_000_000,
                                blocks=size // erofs.BLOCK_SIZE, devices=1)
        os.pwrite(fd, head + erofs.device_slot(tar_blocks), erofs.SUPER_OFFSET)
        file_bytes = 0
        digests: dict[int, tuple[int, int, int]] = {}
        mode, sizes, crcs = self.mode, self.size, self.crc
        for node in order:
            if mode[node] & 0o170000 == stat.S_IFREG:
                file_bytes += sizes[node]
                crc = crcs[node]
                # (their memory bounded; an empty file's the manifest knows unread)
                if crc >= 0 and sizes[node] and len(digests) < MAX_DIGESTS:
                    digests[layout.nid[node]] = (sizes[node], layout.mtime_of(node), crc)
        return ImageStats(len(order), size, tar_size, file_bytes, digests)

    def _walk(self) -> tuple[array[int], array[int], array[int]]:
        """The reachable inodes, root first and breadth first; their link counts; each
        directory's parent."""
        count = len(self.mode)
        nlink = array("I", bytes(4 * count))
        parent = array("Q", bytes(8 * count))
        seen = bytearray(count)
        order = array("Q", [self.root])
        seen[self.root] = 1
        parent[self.root] = self.root
        nlink[self.root] = 2
        queue = deque([self.root])
        while queue:
            node = queue.popleft()
            children = self.children(node)
            for name in sorted(children):
                child = children[name]
                if stat.S_ISDIR(self.mode[child]):
                    nlink[node] += 1
                    nlink[child] = 2
                    parent[child] = node
                    queue.append(child)
                else:
                    nlink[child] += 1
                if not seen[child]:
                    seen[child] = 1
                    order.append(child)
        return order, nlink, parent


def _frequent(values: Iterable[int]) -> int:
    """A most frequent value (Misra-Gries with a few counters: bounded memory), ignoring
    IMPLICIT; 0 when there is none."""
    counters: dict[int, int] = {}
    for value in values:
        if value == IMPLICIT:
            continue
        if value in counters:
            counters[value] += 1
        elif len(counters) < 16:
            counters[value] = 1
        else:
            for key in list(counters):
                counters[key] -= 1
                if not counters[key]:
                    del counters[key]
    return max(counters, key=counters.__getitem__) if counters else 0


class _Layout:
    """Nids, data blocks and the encoding of every inode of an :class:`ImageTree`."""

    def __init__(self, tree: ImageTree, order: array[int], nlink: array[int], epoch: int):
        self.tree = tree
        self.order = order
        self.nlink = nlink
        self.epoch = epoch
        self.nid = array("Q", bytes(8 * len(tree.mode)))
        self.xattrs: dict[int, bytes] = {}
        self.dir_sizes: dict[int, int] = {}
        self.blocks: dict[int, int] = {}  # node -> its first block in the data area (relative)
        # Each inode's shape (see _shape), kept in a few bytes per inode for the writing.
        count = len(tree.mode)
        self.compact = bytearray(count)
        self.layout = bytearray(count)
        self.after = array("I", bytes(4 * count))
        self.data_start = 0  # byte offset of the data area
        self.data_end = 0

    def mtime_of(self, node: int) -> int:
        """``node``'s mtime in nanoseconds, as the image has it (and the kernel says)."""
        return self._mtime(node)

    def _mtime(self, node: int) -> int:
        mtime = self.tree.mtime[node]
        return self.epoch if mtime == IMPLICIT else mtime

    def _compact(self, node: int) -> bool:
        tree = self.tree
        sec, nsec = divmod(self._mtime(node), 1_000_000_000)
        epoch, epoch_nsec = divmod(self.epoch, 1_000_000_000)
        return erofs.can_be_compact(tree.uid[node], tree.gid[node], self.nlink[node],
                                    self._size(node), sec, nsec, epoch, epoch_nsec)

    def _size(self, node: int) -> int:
        tree = self.tree
        if stat.S_ISDIR(tree.mode[node]):
            return self._dir_size(node)
        return tree.size[node]

    def _dir_size(self, node: int) -> int:
        size = self.dir_sizes.get(node)
        if size is None:
            names = [*self.tree.children(node), b".", b".."]
            names.sort()
            size = self.dir_sizes[node] = erofs.dir_blocks(names)[1]
        return size

    def _shape(self, node: int) -> tuple[int, int, int, int]:
        """(inode size, xattr area size, layout, bytes after the xattrs): the inline data,
        or the alignment and chunk indexes."""
        tree = self.tree
        isize = erofs.COMPACT_SIZE if self._compact(node) else erofs.EXTENDED_SIZE
        xattrs = tree.xattrs.get(node)
        body = erofs.xattr_body(xattrs) if xattrs else b""
        if body:
            self.xattrs[node] = body
        head = isize + len(body)
        kind = tree.kind(node)
        if kind == stat.S_IFREG:
            size = tree.size[node]
            if not size:
                return isize, len(body), erofs.FLAT_PLAIN, 0
            chunks = erofs.chunk_format(size)[1]
            return isize, len(body), erofs.CHUNK_BASED, -head % 8 + 8 * chunks
        if kind in (stat.S_IFDIR, stat.S_IFLNK):
            size = self._size(node)
            tail = size % erofs.BLOCK_SIZE if size > erofs.BLOCK_SIZE else size
            if tail and erofs.inline_fits(head, tail):
                return isize, len(body), erofs.FLAT_INLINE, tail
            return isize, len(body), erofs.FLAT_PLAIN, 0
        return isize, len(body), erofs.FLAT_PLAIN, 0

    def place_all(self) -> None:
        """Give every inode its nid, and data-area blocks where it needs them."""
        pos = 0
        data = 0
        for node in self.order:
            isize, xsize, layout, after = self._shape(node)
            self.compact[node] = isize == erofs.COMPACT_SIZE
            self.layout[node] = layout
            self.after[node] = after
            total = isize + xsize + after
            pos = erofs.place(pos, total if total <= erofs.BLOCK_SIZE else erofs.BLOCK_SIZE)
            self.nid[node] = (erofs.META_START + pos) // erofs.INODE_SLOT
            pos += total + (-total % erofs.INODE_SLOT)
            if layout in (erofs.FLAT_PLAIN, erofs.FLAT_INLINE) and self.tree.kind(node) in (
                    stat.S_IFDIR, stat.S_IFLNK):
                size = self._size(node)
                full = size - after  # what is not inline
                if full:
                    self.blocks[node] = data
                    data += -(-full // erofs.BLOCK_SIZE)
        meta_end = erofs.META_START + pos
        self.data_start = meta_end + (-meta_end % erofs.BLOCK_SIZE)
        self.data_end = self.data_start + data * erofs.BLOCK_SIZE

    def write_all(self, fd: int, parent: array[int]) -> None:
        """Encode and write every inode and the data area."""
        meta = _Sink(fd, erofs.META_START)
        data = _Sink(fd, self.data_start)
        for i, node in enumerate(self.order):
            shape = (erofs.COMPACT_SIZE if self.compact[node] else erofs.EXTENDED_SIZE,
                     len(self.xattrs.get(node, b"")), self.layout[node], self.after[node])
            body, tail, content = self._encode(node, shape, parent, i + 1)
            meta.put(self.nid[node] * erofs.INODE_SLOT, body + tail)
            if content:
                data.put(self.data_start + self.blocks[node] * erofs.BLOCK_SIZE, content)
        meta.flush()
        data.flush()

    def _encode(self, node: int, shape: tuple[int, int, int, int], parent: array[int],
                ino: int) -> tuple[bytes, bytes, bytes]:
        """(inode and xattrs, what follows them, data-area content) of ``node``."""
        tree = self.tree
        isize, _, layout, after = shape
        kind = tree.kind(node)
        size = self._size(node)
        tail = b""
        content = b""
        i_u = 0
        if kind == stat.S_IFREG:
            if layout == erofs.CHUNK_BASED:
                i_u = erofs.chunk_format(size)[0]
                xsize = shape[1]
                tail = bytes(-(isize + xsize) % 8) + erofs.chunk_indexes(tree.ref[node], size)
            else:
                i_u = erofs.NULL_ADDR
        elif kind in (stat.S_IFDIR, stat.S_IFLNK):
            data = self._dir_data(node, parent) if kind == stat.S_IFDIR else tree.targets[
                tree.ref[node]]
            split = len(data) - after
            content, tail = data[:split], data[split:]
            i_u = self.data_start // erofs.BLOCK_SIZE + self.blocks[node] if content else 0
        else:
            i_u = tree.ref[node]
        mtime = self._mtime(node)
        head = erofs.inode(
            compact=isize == erofs.COMPACT_SIZE, layout=layout,
            xattr_icount=erofs.xattr_icount(self.xattrs.get(node, b"")),
            mode=tree.mode[node], nlink=self.nlink[node], size=size, i_u=i_u, ino=ino,
            uid=tree.uid[node], gid=tree.gid[node], mtime=mtime // 1_000_000_000,
            nsec=mtime % 1_000_000_000)
        return head + self.xattrs.get(node, b""), tail, content

    def _dir_data(self, node: int, parent: array[int]) -> bytes:
        tree = self.tree
        items = [(name, self.nid[child], erofs.FILE_TYPES[tree.kind(child)])
                 for name, child in tree.children(node).items()]
        dir_type = erofs.FILE_TYPES[stat.S_IFDIR]
        items.append((b".", self.nid[node], dir_type))
        items.append((b"..", self.nid[parent[node]], dir_type))
        items.sort()
        counts, _ = erofs.dir_blocks(name for name, _, _ in items)
        return erofs.dir_data(items, counts)


class _Sink:
    """Writes that arrive in increasing offsets, gathered into large ``pwrite`` calls."""

    def __init__(self, fd: int, start: int) -> None:
        self.fd = fd
        self.start = start  # the file offset of buf[0]
        self.buf = bytearray()

    def put(self, offset: int, data: bytes) -> None:
        gap = offset - self.start - len(self.buf)
        assert gap >= 0, "writes out of order"
        self.buf += bytes(gap)
        self.buf += data
        if len(self.buf) >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            os.pwrite(self.fd, self.buf, self.start)
            self.start += len(self.buf)
            self.buf = bytearray()

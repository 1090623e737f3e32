"""The EROFS on-disk format, as lamina writes it: a metadata image over a layer tar.

Written from the kernel's own definitions (``fs/erofs/erofs_fs.h`` and
``Documentation/filesystems/erofs.rst`` of Linux); every integer is little-endian.
The image is the *primary device*; the layer's uncompressed tar, stored byte for
byte, is the one *extra device* (device id 1), and every regular file's data is a
span of that tar.  With 512-byte EROFS blocks (``blkszbits`` 9, Linux >= 6.4) each
tar member's data starts on a block boundary, so it needs no copy.

Layout of the image (offsets in bytes, blocks of 512)::

    0       zeros (room for a boot sector, as the format wants)
    1024    superblock, 128 bytes (no extension slots)
    1152    device table: one 128-byte slot, the tar (``devt_slotoff`` 9)
    1536    the inodes, root first (nid 48)
    ...     data area: directory blocks and symlink targets that are not inline

An inode's nid is its offset in the image divided by 32 (``meta_blkaddr`` 0): no
inode is nid 0, which readdir(3) would take for a deleted entry, and the root's
nid fits the superblock's 16 bits.  Each inode is followed by its inline xattrs
(``erofs_xattr_ibody_header`` then entries, each 4-byte aligned, names shortened by
the ``user.``/``trusted.``/``security.`` prefix indexes; no shared xattrs, no long
prefixes, no name filter) and then by one of:

- a regular file with data: ``EROFS_INODE_CHUNK_BASED`` with chunk indexes
  (``EROFS_CHUNK_FORMAT_INDEXES``), 8-byte aligned after the xattrs: one index per
  chunk, the chunk as large as the file needs (up to ``512 << 31`` bytes), each
  naming device 1 and the tar block where the data starts; an empty file is
  ``EROFS_INODE_FLAT_PLAIN`` with no blocks;
- a directory or symlink whose data fits in the rest of one block after the inode
  and its xattrs: ``EROFS_INODE_FLAT_INLINE``, the data right there (symlinks then
  are the kernel's fast symlinks); a larger directory keeps its full blocks in the
  data area and its tail inline when that fits, else it is ``EROFS_INODE_FLAT_PLAIN``
  with every block in the data area;
- a device, fifo or socket: nothing (``rdev`` in the inode, ``new_encode_dev``).

An inode that carries inline data, or whose inode, xattrs and chunk indexes fit in
a block, never crosses a block boundary: the writer skips to the next block
instead.  Directory blocks hold ``erofs_dirent`` records (12 bytes) then the names
they point to, unterminated; names are sorted bytewise across the whole directory,
``.`` and ``..`` among them.

Inodes are compact (32 bytes) where they can be: owners and nlink below 65536, a
size below 4 GiB, and a mtime equal to the superblock's ``epoch`` (the writer picks
the layer's most frequent mtime; a compact inode's ``i_mtime`` offset is left 0,
since older kernels, which have no such field, give every compact inode the epoch
itself); else extended (64 bytes: 32-bit owners, 64-bit size, mtime in seconds and
nanoseconds).
Features used: ``CHUNKED_FILE`` and ``DEVICE_TABLE`` (incompat); no compat bits,
so no superblock checksum.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterable, Mapping, Sequence

BLOCK_BITS = 9
BLOCK_SIZE = 1 << BLOCK_BITS
SUPER_OFFSET = 1024
SUPER_MAGIC = 0xE0F5E1E2
DEVT_SLOT_SIZE = 128
DEVT_SLOT_OFF = (SUPER_OFFSET + 128) // DEVT_SLOT_SIZE  # the table right after the superblock
META_BLKADDR = 0  # nids count from the start of the image...
META_START = 3 * BLOCK_SIZE  # ...and the first inode follows the device table
INODE_SLOT = 32  # nids count 32-byte slots

FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8

FLAT_PLAIN, FLAT_INLINE, CHUNK_BASED = 0, 2, 4
COMPACT_SIZE, EXTENDED_SIZE = 32, 64
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_BLKBITS_MAX = 31  # the format's 5-bit field
CHUNK_INDEX_SIZE = 8
NULL_ADDR = 0xFFFF_FFFF
MAX_BLKADDR = 0xFFFF_FFFE  # 32-bit block numbers: a tar of up to 2 TiB
TAR_DEVICE = 1

DIRENT_SIZE = 12
NAME_MAX = 255
XATTR_HEADER_SIZE = 12
XATTR_VALUE_MAX = 0xFFFF
XATTR_ICOUNT_MAX = 0xFFFF

FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
              stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7}
"""EROFS dirent file types: Linux's ``FT_*``."""

_XATTR_PREFIXES = (("user.", 1), ("trusted.", 4), ("security.", 6))
_XATTR_WHOLE = {"system.posix_acl_access": 2, "system.posix_acl_default": 3}

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB3sIQQ")
_COMPACT = struct.Struct("<HHHHIIIIHHI")
_EXTENDED = struct.Struct("<HHHHQIIIIqII16x")
_DEVSLOT = struct.Struct("<64sIIIH50x")
_XATTR_ENTRY = struct.Struct("<BBH")
_CHUNK_INDEX = struct.Struct("<HHI")
_DIRENT = struct.Struct("<QHBB")
assert _SUPER.size == 128 and _COMPACT.size == COMPACT_SIZE
assert _EXTENDED.size == EXTENDED_SIZE and _DEVSLOT.size == DEVT_SLOT_SIZE


def superblock(*, root_nid: int, inodes: int, epoch: int, epoch_nsec: int, blocks: int,
               devices: int, uuid: bytes = bytes(16), volume: bytes = b"") -> bytes:
    """The 128-byte superblock (it goes at :data:`SUPER_OFFSET`).

    ``epoch`` (seconds, ``epoch_nsec``) is the mtime of every compact inode; ``blocks``
    counts the image's own blocks; ``devices`` the extra devices in the table."""
    incompat = FEATURE_INCOMPAT_CHUNKED_FILE | (FEATURE_INCOMPAT_DEVICE_TABLE if devices else 0)
    return _SUPER.pack(
        SUPER_MAGIC, 0, 0, BLOCK_BITS, 0, root_nid, inodes, epoch & 0xFFFF_FFFF_FFFF_FFFF,
        epoch_nsec, blocks, META_BLKADDR, 0, uuid, volume[:16], incompat, 0, devices,
        DEVT_SLOT_OFF if devices else 0, 0, 0, 0, 0, 0, b"", 0, 0, 0)


def device_slot(blocks: int, tag: bytes = b"") -> bytes:
    """A device table slot: a device of ``blocks`` blocks, addressed by its id (chunk
    indexes name it), not mapped into a unified block space."""
    return _DEVSLOT.pack(tag[:64], blocks & 0xFFFF_FFFF, 0, blocks >> 32, 0)


def encode_dev(major: int, minor: int) -> int:
    """Linux's ``new_encode_dev``: 12-bit major, 20-bit minor, in 32 bits."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def dev_fits(major: int, minor: int) -> bool:
    """Whether a device number fits the inode's 32-bit ``rdev``."""
    return 0 <= major <= 0xFFF and 0 <= minor <= 0xFFFFF


def can_be_compact(uid: int, gid: int, nlink: int, size: int, mtime: int, nsec: int,
                   epoch: int, epoch_nsec: int) -> bool:
    """Whether a compact inode says all of it (see the module docstring)."""
    return (uid <= 0xFFFF and gid <= 0xFFFF and nlink <= 0xFFFF and size <= 0xFFFF_FFFF
            and mtime == epoch and nsec == epoch_nsec)


def inode(*, compact: bool, layout: int, xattr_icount: int, mode: int, nlink: int, size: int,
          i_u: int, ino: int, uid: int, gid: int, mtime: int, nsec: int) -> bytes:
    """An on-disk inode, compact (32 bytes) or extended (64).  ``i_u`` is the union: the
    start block (flat), ``rdev`` (devices) or the chunk format (chunk-based)."""
    i_format = (0 if compact else 1) | (layout << 1)
    ino &= 0xFFFF_FFFF
    if compact:
        return _COMPACT.pack(i_format, xattr_icount, mode, nlink, size, 0, i_u, ino, uid, gid, 0)
    return _EXTENDED.pack(i_format, xattr_icount, mode, 0, size, i_u, ino, uid, gid, mtime,
                          nsec, nlink)


def xattr_key(name: str) -> tuple[int, bytes] | None:
    """An xattr name as (name index, the rest of the name), or None for a name EROFS
    (and Linux) has no namespace for, or an empty one."""
    whole = _XATTR_WHOLE.get(name)
    if whole is not None:
        return whole, b""
    for prefix, index in _XATTR_PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):].encode("utf-8", "surrogateescape")
    return None


def xattr_body(xattrs: Mapping[str, bytes]) -> bytes:
    """The inline xattr area of ``xattrs`` (names already checked with :func:`xattr_key`
    and :func:`xattr_error`): the 12-byte header (no name filter, no shared xattrs),
    then one 4-byte aligned entry per xattr, sorted by (index, name)."""
    entries = []
    for name, value in xattrs.items():
        key = xattr_key(name)
        if key is not None:
            entries.append((key[0], key[1], value))
    if not entries:
        return b""
    out = bytearray(XATTR_HEADER_SIZE)
    for index, suffix, value in sorted(entries):
        out += _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        out += bytes(-len(out) % 4)
    return bytes(out)


def xattr_error(name: str, value: bytes) -> str | None:
    """Why the xattr cannot be stored, or None (a name without a namespace is dropped,
    not refused: see :func:`xattr_key`)."""
    key = xattr_key(name)
    if key is not None and len(key[1]) > NAME_MAX:
        return f"xattr name {name!r} is longer than {NAME_MAX} bytes"
    if len(value) > XATTR_VALUE_MAX:
        return f"xattr {name!r} has a value of more than {XATTR_VALUE_MAX} bytes"
    return None


def xattr_icount(body: bytes) -> int:
    """``i_xattr_icount`` for an xattr area: the header counts as one 4-byte slot."""
    return 0 if not body else (len(body) - XATTR_HEADER_SIZE) // 4 + 1


def chunk_format(size: int) -> tuple[int, int]:
    """A chunk-based file's ``i_u`` (chunk bits | INDEXES) and its number of chunks: one
    chunk as large as the file, or as many of the largest chunks as it needs."""
    blocks = -(-size // BLOCK_SIZE)
    bits = min(CHUNK_BLKBITS_MAX, max(0, (blocks - 1).bit_length()))
    chunks = -(-blocks // (1 << bits))
    return CHUNK_FORMAT_INDEXES | bits, chunks


def chunk_indexes(first_block: int, size: int) -> bytes:
    """The chunk indexes of a file whose data is contiguous on the tar device from
    block ``first_block``."""
    fmt, chunks = chunk_format(size)
    step = 1 << (fmt & 0x1F)
    return b"".join(_CHUNK_INDEX.pack(0, TAR_DEVICE, first_block + i * step)
                    for i in range(chunks))


def dir_blocks(names: Iterable[bytes]) -> tuple[list[int], int]:
    """How a directory's sorted names pack into blocks: the number of dirents in each
    block, and the directory's size (full blocks, then what the last one uses)."""
    counts: list[int] = []
    used = count = 0
    for name in names:
        need = DIRENT_SIZE + len(name)
        if used + need > BLOCK_SIZE:
            counts.append(count)
            used = count = 0
        used += need
        count += 1
    counts.append(count)
    return counts, (len(counts) - 1) * BLOCK_SIZE + used


def dir_data(entries: Sequence[tuple[bytes, int, int]], counts: Sequence[int]) -> bytes:
    """A directory's data: ``entries`` (name, nid, file type), sorted by name, packed
    into blocks as :func:`dir_blocks` counted; every block but the last padded."""
    out = bytearray()
    pos = 0
    for count in counts:
        if out:
            out += bytes(-len(out) % BLOCK_SIZE)
        block = entries[pos : pos + count]
        pos += count
        nameoff = DIRENT_SIZE * count
        for name, nid, ftype in block:
            out += _DIRENT.pack(nid, nameoff, ftype, 0)
            nameoff += len(name)
        for name, _, _ in block:
            out += name
    return bytes(out)


def inline_fits(head: int, tail: int) -> bool:
    """Whether ``tail`` bytes of data can follow an inode and xattrs of ``head`` bytes
    within one block (the kernel refuses inline data that crosses a block)."""
    return head + tail <= BLOCK_SIZE


def place(pos: int, keep: int) -> int:
    """Where an inode whose first ``keep`` bytes must lie in one block goes, at or after
    offset ``pos`` of the metadata area (``keep`` 0: anywhere)."""
    off = pos % BLOCK_SIZE
    if keep and off + keep > BLOCK_SIZE:
        return pos + BLOCK_SIZE - off
    return pos

"""Overlay's EROFS read-only layers: the layer's tar kept byte for byte, an image over it.

A read-only layer applied from a tar into a new layer (``overlay.layers=erofs``) is
kept, in ``layers/ID/``, as ``layer.tar`` (the uncompressed tar exactly as it was
read: its sha256 is the layer's diff id) and ``layer.erofs`` (the EROFS metadata
image that :func:`lamina.archive.erofstar.index_tar` writes while the tar streams
past, its files' data pointing into ``layer.tar``).  The image is mounted read-only
at the layer's ``diff/``, so that the layer's lower is where a directory layer's
is: the union mounts, the ``l/`` links, containerd's mounts, native changes and
``check``'s manifest read it unchanged (it holds overlayfs' whiteouts and opaque
xattrs, as a ``diff/`` does).  ``diff`` against the layer's own parent is
``layer.tar`` itself.

What cannot be an image over its tar (``Unsupported`` from the indexer: a sparse
member, a hard link to a lower layer's file, …) is applied as a directory instead,
from what was read so far (the stored prefix) followed by the rest of the stream:
the source is read once, and nothing of it is lost.

Crash model.  The tar and the image are written into the layer's staging
directory, the image mounted there, and the whole made durable by the layer's one
``syncfs`` before the rename that publishes it (the mount follows the rename).  A
kill before the rename leaves a staging directory that the next open sweeps,
unmounting what is mounted inside it; after it, a published layer.  Mounts do not
survive a reboot: opening the store mounts every EROFS layer whose ``diff/`` is
not a mount (:func:`remount_all`).  Deleting a layer unmounts what is mounted
inside its directory (:meth:`lamina.store.layers.Store.delete`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

from lamina import crashpoints, errors
from lamina.archive import erofs
from lamina.archive.digests import Digests
from lamina.archive.erofsimage import ImageTree
from lamina.archive.erofstar import index_tar
from lamina.host import fsutil, mount, userns
from lamina.host.idmap import IdMapper

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

TAR, IMAGE = "layer.tar", "layer.erofs"
CHUNK = 1 << 20


def is_erofs(layer_dir: Path) -> bool:
    """Whether the layer in ``layer_dir`` (live or staged) is kept as EROFS."""
    return (layer_dir / IMAGE).is_file()


def probe(staging: Path) -> str | None:
    """Why EROFS layers cannot be mounted here (None: they can): a tiny image (one
    directory, over a one-block device) is written in the store's ``staging``
    directory, under a lock of its own (the next open sweeps it if a kill leaves
    it there), and mounted once."""
    if userns.IN_USER_NAMESPACE:
        return ("EROFS images are mounted by root of the initial user namespace only (this "
                "is a user namespace): read-only layers are directories")
    name = f"erofs-probe-{secrets.token_hex(4)}"
    base = staging / name
    lock = fsutil.FileLock(staging / f"{name}.lock")
    lock.acquire()
    try:
        base.mkdir()
        (base / TAR).write_bytes(bytes(erofs.BLOCK_SIZE))
        tree = ImageTree()
        tree.children(tree.root)[b"d"] = tree.new_dir(0o755, 0, 0, 0)
        with open(base / IMAGE, "wb") as out:
            tree.write(out, erofs.BLOCK_SIZE)
        (base / "mnt").mkdir()
        mount.mount_erofs(base / IMAGE, base / TAR, base / "mnt")
        try:
            if not (base / "mnt" / "d").is_dir():
                return "a probe image mounted without its content"
        finally:
            mount.unmount(str(base / "mnt"))
    except (OSError, errors.LaminaError) as e:
        return f"the kernel cannot mount lamina's EROFS images (512-byte blocks need " \
               f"Linux >= 6.4, file-backed mounts 6.12 or loop devices): {e}"
    finally:
        with contextlib.suppress(OSError):
            mount.unmount_below(base)
            fsutil.remove_tree(base)
        with contextlib.suppress(OSError):
            os.unlink(lock.path)
        lock.release()
    return None


class Replay:
    """The tar for the directory applier after an index gave up: the bytes already
    read (stored in ``layer.tar``), then the rest of the source stream."""

    def __init__(self, prefix: Path, rest: BinaryIO) -> None:
        self._prefix: BinaryIO | None = open(prefix, "rb")  # noqa: SIM115 (closed at its end)
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all of them for -1), the stored prefix first."""
        if self._prefix is not None:
            data = self._prefix.read(n)
            if data or n == 0:
                return data
            self.close()
        return self._rest.read(n)

    def close(self) -> None:
        """Close the stored prefix (the source is the caller's)."""
        if self._prefix is not None:
            self._prefix.close()
            self._prefix = None


def store_indexed(staged: Path, diff: Path, tar: BinaryIO, *, layer: str,
                  lowers: Sequence[str], ids: IdMapper, max_entries: int | None,
                  digests: Digests) -> Replay | int:
    """Keep ``tar`` as an EROFS layer in ``staged``: ``layer.tar`` and ``layer.erofs``
    written in one pass, the image mounted at ``diff``; its regular files' bytes (as
    the directory applier counts them), their CRC-32s added to ``digests`` for the
    manifest.  Where the tar cannot be an image, or the image cannot be mounted,
    nothing of it is left but what the directory applier must read instead (a
    :class:`Replay`, to be given to :func:`drop_replayed` when read)."""
    stats = None
    # Unsupported: the directory applier takes it from what was read (below).
    with open(staged / TAR, "wb") as stored, open(staged / IMAGE, "wb") as out, \
            contextlib.suppress(errors.Unsupported):
        stats = index_tar(tar, out, layer=layer, ids=ids, max_entries=max_entries,
                          lowers=lowers, store=stored, checksums=True)
    if stats is not None:
        try:
            mount.mount_erofs(staged / IMAGE, staged / TAR, diff)
            digests.update(stats.digests)
            return stats.file_bytes
        except OSError:
            pass  # refused: the whole tar is stored, the directory applier takes it
    (staged / IMAGE).unlink(missing_ok=True)
    return Replay(staged / TAR, tar)


def drop_replayed(staged: Path, replay: Replay) -> None:
    """Forget what a :class:`Replay` kept, once the directory applier has read it."""
    replay.close()
    (staged / TAR).unlink(missing_ok=True)


def remount(layer_dir: Path, diff: Path) -> bool:
    """Mount an EROFS layer's image at ``diff`` unless it is mounted; whether it was."""
    if os.path.ismount(diff):
        return False
    mount.mount_erofs(layer_dir / IMAGE, layer_dir / TAR, diff)
    return True


class _StoredTar(io.FileIO):
    """A layer's stored tar, read as its diff (a crash point each read of the file)."""

    def readinto(self, buffer: WriteableBuffer, /) -> int | None:
        crashpoints.reached("diff:chunk")
        return super().readinto(buffer)


def stream_tar(layer_dir: Path) -> BinaryIO:
    """The layer's stored tar (its diff against its own parent), to read."""
    return cast(BinaryIO, io.BufferedReader(_StoredTar(layer_dir / TAR, "rb"), CHUNK))


def verify(layer_dir: Path, diff: Path, diff_id: str | None) -> str | None:
    """What is wrong with an EROFS layer: its tar's sha256 other than ``diff_id``, or
    an image that is not mounted and will not mount; None when nothing is."""
    digest = hashlib.sha256()
    try:
        with open(layer_dir / TAR, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as e:
        return f"its tar cannot be read: {e}"
    if diff_id is not None and "sha256:" + digest.hexdigest() != diff_id:
        return f"its tar's sha256 is not its diff id {diff_id}"
    try:
        remount(layer_dir, diff)
    except OSError as e:
        return f"its EROFS image does not mount: {e}"
    return None


"""EROFS layer images in tests: mounted by the kernel, pictured, compared with GNU tar.

:func:`mounted` mounts an image that :func:`~lamina.archive.erofstar.index_tar` wrote
with its tar as device 1 (the host tier's mount, file-backed or through loop devices);
:func:`picture` describes a tree (names, types, modes, owners, sizes, contents, every xattr, link
targets, devices, mtimes, link counts, hard-link groups); :func:`check_tar` indexes a
tar, mounts it and compares it with what ``tar --xattrs --xattrs-include='*'
--numeric-owner -xpf`` extracts, whiteouts and opaque markers as overlayfs has them
(:func:`as_overlay_lower`).

The oracles, erofs-utils 1.9 in the lab (:mod:`tests.lab`): every image a test writes
through :func:`index` or :func:`check_tar` (or hands to :func:`keep`, or that a store
writes through :func:`keeping`) is kept while the test runs, and at its end (the
``erofs_fsck`` fixture, :func:`fsck_at_end`) ``fsck.erofs --extract`` reads each, with
its tar as the extra device, all in one call to the lab; :func:`mkfs_image` is what
``mkfs.erofs --tar=f --aufs`` makes of the same tar, to compare with lamina's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lamina.archive.erofstar import index_tar
from lamina.host import mount
from tests import lab
from tests.conftest import in_ci, lacking

OPQ = ".wh..wh..opq"  # the opaque marker, as a tar spells it

Node = tuple[Any, ...]
"""What :func:`node_of` says of a path: mode string, uid, gid, size, sha256, link target,
(major, minor), xattrs, mtime in ns, link count (the size and count None for directories)."""


# -- mounting -----------------------------------------------------------------------------


def _kernel_release() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@contextlib.contextmanager
def mounted(image: Path, tar: Path, where: Path, *, loops: bool = False) -> Iterator[Path]:
    """``image`` mounted read-only at ``where`` with ``tar`` as its device 1 by
    :func:`lamina.host.mount.mount_erofs`: file-backed (Linux >= 6.12), else (or with
    ``loops``) through two loop devices; unmounted (and the devices freed) after.  A
    mount the kernel refuses is an error: an image lamina wrote must mount wherever
    EROFS takes 512-byte blocks (Linux >= 6.4)."""
    if _kernel_release() < (6, 4):
        lacking(f"EROFS with 512-byte blocks needs Linux >= 6.4, not {os.uname().release}")
    where.mkdir(exist_ok=True)
    try:
        mount.mount_erofs(image, tar, where, loops=loops)
    except OSError as e:
        if e.errno == errno.ENODEV:
            lacking("the kernel has no EROFS")
        raise
    try:
        yield where
    finally:
        mount.unmount(str(where), lazy=False)


def index(tar: Path, image: Path, lowers: list[str] | None = None) -> None:
    """The EROFS image of ``tar`` (over ``lowers``, if known) into ``image``, kept for
    ``fsck.erofs`` (:func:`keep`)."""
    with open(tar, "rb") as src, open(image, "wb") as out:
        index_tar(src, out, lowers=lowers)
    keep(image, tar)


# -- the oracles: erofs-utils in the lab --------------------------------------------------


class Kept:
    """The images written during one test, each with its tar, for ``fsck.erofs`` at its
    end: the image copied (a test may damage it after), the tar hard-linked (it is the
    image's device; only its bytes of file data could change, which fsck cannot judge)."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.cases: list[Path] = []

    def add(self, image: Path, tar: Path) -> None:
        """Keep ``image`` (whole: its writer is done) and its device ``tar``."""
        case = self.where / f"{len(self.cases):05d}"
        case.mkdir()
        shutil.copyfile(image, case / "meta.erofs")
        try:
            os.link(tar, case / "layer.tar")
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.copyfile(tar, case / "layer.tar")
        self.cases.append(case)


_kept: Kept | None = None


def keep(image: Path, tar: Path) -> None:
    """Have ``fsck.erofs`` check ``image`` (with ``tar`` as its device) at the end of the
    test, if the test checks its images (the ``erofs_fsck`` fixture)."""
    if _kept is not None:
        _kept.add(image, tar)


def keeping(index: Callable[..., Any]) -> Callable[..., Any]:
    """``index_tar`` that keeps what it wrote (:func:`keep`): for a store's images, in
    place of the one :mod:`lamina.backends.erofslayers` calls."""

    @functools.wraps(index)
    def kept(src: BinaryIO, out: BinaryIO, **kw: Any) -> Any:
        stats = index(src, out, **kw)
        tar: BinaryIO = kw.get("store") or src
        out.flush()
        tar.flush()
        keep(Path(out.name), Path(tar.name))
        return stats

    return kept


@contextlib.contextmanager
def fsck_at_end(where: Path) -> Iterator[Kept]:
    """Keep the images written inside (in ``where``), then check them all with
    ``fsck.erofs`` in one call to the lab (:func:`fsck`); an image it refuses, or
    extracts otherwise than the kernel mounts it, fails the test.  Where the lab is
    missing, outside CI, nothing is kept or checked; nor in the VM tests' guests
    (``LAMINA_VM_GUEST``: the lab is the host's, which checks the same images)."""
    global _kept
    if (not lab.present() and not in_ci()) or os.environ.get("LAMINA_VM_GUEST") == "1":
        yield Kept(where)
        return
    lab.lab_root()
    _kept = kept = Kept(where)
    try:
        yield kept
    finally:
        _kept = None
    failed = fsck(kept.cases)
    assert not failed, "fsck.erofs refused images lamina wrote:\n" + "\n".join(failed)


EXTRACTED_UP_TO = 32 << 20
"""The largest tar whose image :func:`fsck` has extracted, to compare with the mount
(a larger one is only checked: extracting the corpus's 200 MB takes seconds)."""

# ``--extract``: every inode's data is read too (through the chunk indexes into the
# tar), not only the metadata; to a directory, the tree written there.  fsck.erofs
# 1.9.4 reads zeros past the end of a short device instead of failing: whether the
# data is the tar's right bytes is for the comparisons of the mounted tree to say.
_FSCK = r"""
limit=$1; shift
for case in "$@"; do
  if [ "$(stat -c %s "$case/layer.tar")" -le "$limit" ]; then
    extract="--extract=$case/extracted"
  else
    extract=--extract
  fi
  if ! out=$(fsck.erofs "$extract" --xattrs --device="$case/layer.tar" "$case/meta.erofs" 2>&1)
  then
    printf '%s: %s\n' "$case" "$(printf '%s' "$out" | tr '\n' ' ')"
  fi
done
"""


def fsck(cases: list[Path]) -> list[str]:
    """``fsck.erofs --extract`` on each case directory (``meta.erofs`` with
    ``layer.tar`` as its device), in one call to the lab, and what it extracted
    compared with what the kernel mounts: a line for each image refused or extracted
    otherwise.  fsck.erofs 1.9.4 extracts no ``security.capability`` and no xattr whose
    value is empty (from its own mkfs.erofs's images neither): those are not compared."""
    if not cases:
        return []
    binds = sorted({case.parent for case in cases})
    done = lab.run(["/bin/sh", "-c", _FSCK, "fsck", str(EXTRACTED_UP_TO), *map(str, cases)],
                   binds=binds, timeout=60 + 5 * len(cases))
    failed = done.stdout.splitlines()
    for case in cases:
        if not (case / "extracted").is_dir() or any(line.startswith(f"{case}:")
                                                     for line in failed):
            continue
        with mounted(case / "meta.erofs", case / "layer.tar", case / "mnt") as where:
            got = picture(where)
        want = picture(case / "extracted")
        for path, node in got[0].items():
            got[0][path] = (*node[:7], tuple(x for x in node[7] if x[1] and
                                             x[0] != "security.capability"), *node[8:])
        if got != want:
            failed.append(f"{case}: fsck.erofs extracts another tree than the kernel mounts: "
                          + "; ".join(differences(got[0], want[0], limit=5)))
    return failed


def mkfs_image(tar: Path, image: Path) -> None:
    """What erofs-utils makes of ``tar``: ``mkfs.erofs --tar=f --aufs`` (whiteouts and
    opaque markers as overlayfs has them, as lamina's) into ``image``, data included."""
    lab.run(["mkfs.erofs", "--quiet", "--tar=f", "--aufs", str(image), str(tar)],
            binds=[tar.parent, image.parent], timeout=600)


# -- pictures of trees --------------------------------------------------------------------


def node_of(path: str) -> Node:
    """Everything compared about one path (the link count not for directories)."""
    st_ = os.lstat(path)
    kind = stat.S_IFMT(st_.st_mode)
    digest = link = rdev = None
    if kind == stat.S_IFREG:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    elif kind == stat.S_IFLNK:
        link = os.readlink(path)
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        rdev = (os.major(st_.st_rdev), os.minor(st_.st_rdev))
    xattrs = tuple(sorted((key, _xattr(path, key))
                          for key in os.listxattr(path, follow_symlinks=False)))
    return (stat.filemode(st_.st_mode), st_.st_uid, st_.st_gid,
            st_.st_size if kind != stat.S_IFDIR else None, digest, link, rdev, xattrs,
            st_.st_mtime_ns, None if kind == stat.S_IFDIR else st_.st_nlink)


def _xattr(path: str, key: str) -> bytes | None:
    """The value of xattr ``key``; None for one listed that cannot be read (the kernel
    lists a ``user.`` xattr of a special file, as an image of mkfs.erofs may hold, but
    refuses to read it)."""
    try:
        return os.getxattr(path, key, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise
        return None


def picture(root: Path) -> tuple[dict[str, Node], set[frozenset[str]]]:
    """Every path below ``root`` with its node, and the hard-link groups."""
    nodes: dict[str, Node] = {}
    inodes: dict[int, set[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(path, root)
            nodes[rel] = node_of(path)
            st_ = os.lstat(path)
            if not stat.S_ISDIR(st_.st_mode) and st_.st_nlink > 1:
                inodes.setdefault(st_.st_ino, set()).add(rel)
    return nodes, {frozenset(group) for group in inodes.values() if len(group) > 1}


def as_overlay_lower(nodes: dict[str, Node]) -> dict[str, Node]:
    """GNU tar's tree with the whiteout files it extracted as overlayfs has them, and
    without the overlay xattrs that a tar may not set."""
    banned = ("trusted.overlay.", "user.overlay.")
    out = {path: (*node[:7], tuple((k, v) for k, v in node[7] if not k.startswith(banned)),
                  *node[8:]) for path, node in nodes.items()}
    for path, node in nodes.items():
        parent, _, base = path.rpartition("/")
        if not base.startswith(".wh."):
            continue
        del out[path]
        if base == OPQ:
            if parent:
                old = out[parent]
                xattrs = tuple(sorted((*old[7], ("trusted.overlay.opaque", b"y"))))
                out[parent] = (*old[:7], xattrs, *old[8:])
        elif not base.startswith(".wh..wh.") and f"{parent}/{base[4:]}" not in nodes:
            out[f"{parent}/{base[4:]}"] = ("c---------", 0, 0, 0, None, None, (0, 0), (),
                                           node[8], 1)
    return out


def differences(got: dict[str, Node], want: dict[str, Node], limit: int = 20) -> list[str]:
    """Readable lines saying where two pictures differ (empty when they are equal)."""
    lines = []
    for path in sorted(set(got) | set(want)):
        if got.get(path) != want.get(path):
            lines.append(f"{path}: got {got.get(path)} want {want.get(path)}")
        if len(lines) >= limit:
            break
    return lines


def gnu_extract(tar: Path, dest: Path) -> None:
    """GNU tar's extraction of ``tar`` into the new directory ``dest``."""
    dest.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
                    str(tar), "-C", str(dest)], check=True, capture_output=True)


def check_tar(tar: Path, work: Path) -> tuple[dict[str, Node], float]:
    """Index ``tar``, mount it and compare with GNU tar's extraction; the mounted tree
    and the seconds the index took."""
    image = work / "meta.erofs"
    started = time.perf_counter()
    index(tar, image)
    took = time.perf_counter() - started
    want_dir = work / "gnu"
    extracted = time.time_ns() - 1_000_000_000
    gnu_extract(tar, want_dir)
    want, want_links = picture(want_dir)
    with mounted(image, tar, work / "mnt") as where:
        got, got_links = picture(where)
    want = as_overlay_lower(want)
    for path, node in want.items():  # a directory no member named: GNU tar made it now
        if node[0].startswith("d") and node[8] >= extracted and path in got:
            want[path] = (*node[:8], None, None)
            got[path] = (*got[path][:8], None, None)
    assert not differences(got, want), "\n".join(differences(got, want))
    assert got_links == {g for g in want_links if all(p in want for p in g)}
    return got, took


@contextlib.contextmanager
def mounted_whole(image: Path, where: Path) -> Iterator[Path]:
    """An image that holds its data (mkfs.erofs's) mounted read-only at ``where``."""
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "erofs", "-o", "ro", str(image), str(where)], check=True,
                   capture_output=True)
    try:
        yield where
    finally:
        mount.unmount(str(where), lazy=False)


def named_dirs(tar: Path) -> set[str]:
    """The directories that members of ``tar`` name, as pictures name paths ("/a/b")."""
    with tarfile.open(tar) as tf:
        return {"/" + os.path.normpath(m.name.lstrip("/")) for m in tf if m.isdir()}


MKFS_ORIGIN = ("trusted.overlay.origin", b"")
"""What mkfs.erofs --aufs sets on each directory in which a tar has a whiteout (so that
overlayfs filters the whiteouts out of a directory that only one layer has); lamina
does not (a store's layers only keep whiteouts that hide something below them, whose
directories overlayfs merges)."""


def as_mkfs_compares(nodes: dict[str, Node], named: set[str]) -> dict[str, Node]:
    """A picture without what lamina and mkfs.erofs do differently on purpose:

    - a directory no member names (a missing parent): lamina makes it 0755 with the
      image's epoch as mtime, mkfs.erofs 0777 with the time it ran;
    - an xattr listed but unreadable: mkfs.erofs keeps a ``user.`` xattr of a special
      file, which the kernel lists but does not read; lamina drops it (no file system
      can hold it, GNU tar cannot set it);
    - a symlink's permission bits: mkfs.erofs keeps its member's, lamina makes it 0777
      as symlink(2) does (real tars say 0777 anyway);
    - :data:`MKFS_ORIGIN`;
    - an xattr twice: mkfs.erofs 1.9.4 writes one again when a directory member
      repeats it (a directory named twice, two opaque markers), and ``listxattr``
      names it twice; lamina writes it once (the GNU tar comparison and fsck.erofs's
      extraction would see lamina write one twice)."""
    out = {}
    for path, node in nodes.items():
        xattrs = tuple(sorted({x for x in node[7] if x[1] is not None and x != MKFS_ORIGIN}))
        if node[0].startswith("l"):
            out[path] = ("l", *node[1:7], xattrs, *node[8:])
        elif node[0].startswith("d") and path not in named:
            out[path] = (None, *node[1:7], xattrs, None, *node[9:])
        else:
            out[path] = (*node[:7], xattrs, *node[8:])
    return out


def compare_with_mkfs(tar: Path, work: Path) -> dict[str, Node]:
    """Lamina's image of ``tar`` and mkfs.erofs's (``--tar=f --aufs``), both mounted
    by the kernel, show the same tree (but for :func:`as_mkfs_compares`'s differences):
    names, types, modes, owners, sizes, contents, xattrs, link targets, devices,
    mtimes, link counts and hard-link groups; lamina's tree.  ``tar`` must not white
    out its own members: mkfs.erofs lets a whiteout replace an earlier member of the
    same name, lamina (as the OCI spec says) hides only what lower layers have."""
    index(tar, work / "meta.erofs")
    mkfs_image(tar, work / "mkfs.erofs")
    named = named_dirs(tar)
    with mounted(work / "meta.erofs", tar, work / "mnt") as where:
        got, got_links = picture(where)
    with mounted_whole(work / "mkfs.erofs", work / "mkfs-mnt") as where:
        want, want_links = picture(where)
    got, want = as_mkfs_compares(got, named), as_mkfs_compares(want, named)
    assert not differences(got, want), "lamina's, then mkfs.erofs's:\n" + "\n".join(
        differences(got, want))
    assert got_links == want_links
    return got

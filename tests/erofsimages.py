"""EROFS layer images in tests: mounted by the kernel, pictured, compared with GNU tar.

:func:`mounted` mounts an image that :func:`~lamina.archive.erofstar.index_tar` wrote
with its tar as device 1 (the host tier's mount, file-backed or through loop devices);
:func:`picture` describes a tree (names, types, modes, owners, sizes, contents, every xattr, link
targets, devices, mtimes, link counts, hard-link groups); :func:`check_tar` indexes a
tar, mounts it and compares it with what ``tar --xattrs --xattrs-include='*'
--numeric-owner -xpf`` extracts, whiteouts and opaque markers as overlayfs has them
(:func:`as_overlay_lower`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lamina.archive.erofstar import index_tar
from lamina.host import mount
from tests.conftest import lacking

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
    """The EROFS image of ``tar`` (over ``lowers``, if known) into ``image``."""
    with open(tar, "rb") as src, open(image, "wb") as out:
        index_tar(src, out, lowers=lowers)


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
    xattrs = tuple(sorted((key, os.getxattr(path, key, follow_symlinks=False))
                          for key in os.listxattr(path, follow_symlinks=False)))
    return (stat.filemode(st_.st_mode), st_.st_uid, st_.st_gid,
            st_.st_size if kind != stat.S_IFDIR else None, digest, link, rdev, xattrs,
            st_.st_mtime_ns, None if kind == stat.S_IFDIR else st_.st_nlink)


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

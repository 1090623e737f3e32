"""Compatibility with GNU tar, on every backend.

A tree of every kind of file is built on disk, archived by GNU tar (gnu and posix
formats, sparse, xattrs, compressed), applied by lamina, and the layer must be the tree.
Then lamina's own export of the layer, extracted by GNU tar, must be the tree again.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import lamina
from tests import tarbuild as tb
from tests.conftest import lacking
from tests.layers import links, tree
from tests.snapshot import assert_same_tree, hardlink_groups, snapshot

pytestmark = pytest.mark.root
EACH_FORMAT = True  # with overlay+dir too (tests/conftest.py)

T = 1_500_000_000
TAR_CREATE = ["tar", "--numeric-owner"]
TAR_EXTRACT = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-p"]


@pytest.fixture(autouse=True)
def _gnu_tar() -> None:
    if shutil.which("tar") is None:
        lacking("GNU tar is not installed")
    version = subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout
    if "GNU tar" not in version:
        lacking("tar is not GNU tar")


def make_tree(root: Path) -> Path:
    """Every kind of file GNU tar and lamina both handle, with fixed mtimes."""
    root.mkdir()
    os.chmod(root, 0o755)
    (root / "etc").mkdir(mode=0o755)
    (root / "etc/passwd").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    (root / "bin").mkdir()
    (root / "bin/ping").write_bytes(b"\x7fELF ping")
    os.chmod(root / "bin/ping", 0o755)
    os.setxattr(root / "bin/ping", "security.capability", tb.CAP_NET_RAW)
    (root / "bin/su").write_bytes(b"\x7fELF su")
    os.chmod(root / "bin/su", 0o4755)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "srv").mkdir()
    os.chown(root / "srv", 1000, 1000)
    os.chmod(root / "srv", 0o2770)
    (root / "srv/data").write_bytes(os.urandom(300_000))
    os.chown(root / "srv/data", 1000, 100)
    os.link(root / "srv/data", root / "srv/data-link")
    os.link(root / "srv/data", root / "etc/data-link")
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("../etc/passwd", root / "srv/rel-link")
    os.symlink("x" * 180, root / "long-target")
    os.mkfifo(root / "fifo")
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev/loop3", stat.S_IFBLK | 0o660, os.makedev(7, 3))
    os.chmod(root / "dev/null", 0o666)
    long_dir = root / "/".join(f"long-directory-name-number-{i}" for i in range(8))
    long_dir.mkdir(parents=True)
    (long_dir / ("f" * 200)).write_bytes(b"long")
    with open(root / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(5 << 20)
        f.write(b"middle")
        f.truncate(9 << 20)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in dirnames + filenames + ["."]:
            os.utime(os.path.join(dirpath, name), (T, T), follow_symlinks=False)
    return root


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "source")


ARCHIVERS = {  # (the gnu format has no room for xattrs)
    "gnu": ["--format=gnu"],
    "posix": ["--format=posix", "--xattrs"],
    "posix-sparse": ["--format=posix", "--xattrs", "--sparse"],
    "gnu-sparse": ["--format=gnu", "--sparse"],
    "posix-gzip": ["--format=posix", "--xattrs", "-z"],
    "posix-zstd": ["--format=posix", "--xattrs", "--zstd"],
}


@pytest.mark.parametrize("flags", ARCHIVERS.values(), ids=ARCHIVERS.keys())
def test_gnu_tar_archives_apply_exactly(
    driver: lamina.Driver, source: Path, tmp_path: Path, flags: list[str]
) -> None:
    if "--zstd" in flags and shutil.which("zstd") is None:
        lacking("zstd is not installed")
    archive = tmp_path / "layer.tar"
    subprocess.run(
        [*TAR_CREATE, *flags, "-C", source, "-cf", archive, "."],
        check=True,
    )
    with open(archive, "rb") as f:
        driver.apply_diff("l", None, f)
    want = snapshot(source)
    if "--xattrs" not in flags:
        want = {p: n._replace(cap=None) for p, n in want.items()}
    assert_same_tree(tree(driver, "l"), want)
    assert links(driver, "l") == hardlink_groups(source)


def test_lamina_export_extracts_exactly_with_gnu_tar(
    driver: lamina.Driver, source: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "layer.tar"
    subprocess.run(
        [*TAR_CREATE, "--format=posix", "--xattrs", "--sparse", "-C", source, "-cf", archive, "."],
        check=True,
    )
    with open(archive, "rb") as f:
        driver.apply_diff("l", None, f)
    exported = tmp_path / "exported.tar"
    with driver.diff("l") as stream, open(exported, "wb") as out:
        shutil.copyfileobj(stream, out)
    target = tmp_path / "extracted"
    target.mkdir()
    os.chmod(target, 0o755)
    subprocess.run(
        [*TAR_EXTRACT, "-C", target, "-xf", exported],
        check=True,
    )
    got = snapshot(target)
    want = tree(driver, "l")
    # a diff may leave the root out, and then tar leaves ours as it was
    got["/"] = got["/"]._replace(mode=want["/"].mode, uid=want["/"].uid, gid=want["/"].gid)
    assert_same_tree(got, want)
    assert hardlink_groups(target) == links(driver, "l")

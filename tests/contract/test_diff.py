"""Conformance, part 4: ``diff``, ``diff_size``, ``diff_getter`` and id maps, on every backend.

Diff then apply onto the same parent must reproduce the layer exactly (contract §2), and
the tar must say it the way Docker says it: whiteouts for deletions, links for hard
links, ``SCHILY.xattr.security.capability`` for file capabilities.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

import lamina
from lamina import errors
from tests import tarbuild as tb
from tests.conftest import Stores
from tests.layers import apply, is_stored_tar, links, mounted, names, read, tree
from tests.snapshot import assert_same_tree, tar_path

pytestmark = pytest.mark.root

BASE = [
    tb.directory("etc"),
    tb.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    tb.file("etc/del", b"to be deleted"),
    tb.file("etc/modify", b"old content"),
    tb.directory("var/lib/gone", mode=0o700),
    tb.file("var/lib/gone/a", b"a" * 1000),
    tb.directory("var/lib/gone/sub"),
    tb.file("var/lib/gone/sub/b", b"b" * 2000),
    tb.directory("recreated"),
    tb.file("recreated/old1", b"1"),
    tb.file("recreated/old2", b"2"),
    tb.file("recreated/kept", b"kept"),
    tb.file("becomes-dir", b"f"),
    tb.directory("becomes-file"),
    tb.file("becomes-file/child", b"c"),
    tb.directory("usr/bin"),
    tb.file("usr/bin/tool", b"tool", mode=0o755),
]


def diff_then_apply(drv: lamina.Driver, id: str, copy: str, parent: str | None) -> int:
    """Apply ``diff(id)`` as layer ``copy`` on ``parent``; return what ``apply_diff`` said."""
    with drv.diff(id) as stream:
        return drv.apply_diff(copy, parent, stream)


def read_diff(drv: lamina.Driver, id: str, parent: str | None = None) -> dict[str, tarfile.TarInfo]:
    """The members of ``diff(id, parent)`` by path (``/a/b``), in tar order, less the root."""
    out = {}
    with drv.diff(id, parent) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            assert not member.name.startswith("/"), member.name
            assert ".." not in member.name.split("/"), member.name
            path = tar_path(member.name)
            assert path not in out, f"{member.name} twice"
            if path == "/":
                assert member.isdir(), "a root entry that is not a directory"
                continue  # Docker writes one for a base layer, or not
            out[path] = member
    return out


def test_diff_apply_sizes(driver: lamina.Driver) -> None:
    # moby's DriverTestDiffApply: regular files only, so that every count agrees.
    rng = random.Random(1)
    apply(driver, "base", None, BASE)
    driver.create_rw("upper", "base")
    sizes = {"new/a": 4096, "new/b": 100_000, "new/empty": 0, "one": 1, "etc/modify": 12_345}
    with mounted(driver, "upper") as root:
        (root / "new").mkdir()
        for rel, size in sizes.items():
            (root / rel).write_bytes(rng.randbytes(size))
        (root / "hard1").write_bytes(rng.randbytes(5000))
        os.link(root / "hard1", root / "new/hard2")
        os.unlink(root / "etc/del")
        shutil.rmtree(root / "var/lib/gone")
    expected = sum(sizes.values()) + 5000  # the hard-linked file once
    diff_size = driver.diff_size("upper")
    applied = diff_then_apply(driver, "upper", "copy", "base")
    assert applied == diff_size == expected
    assert driver.diff_size("upper", "base") == expected
    assert_same_tree(tree(driver, "copy"), tree(driver, "upper"))
    assert links(driver, "copy") == links(driver, "upper") == {frozenset({"/hard1", "/new/hard2"})}


def test_diff_apply_reproduces_everything(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    driver.create_rw("upper", "base")
    long_dir = "/".join(f"a-rather-long-directory-name-{i}" for i in range(12))
    with mounted(driver, "upper") as root:
        os.unlink(root / "etc/del")
        (root / "etc/modify").write_bytes(b"new content, longer than before")
        os.utime(root / "etc/modify", (1_000_000_000, 1_000_000_000))
        shutil.rmtree(root / "var/lib/gone")
        for name in ("old1", "old2", "kept"):
            os.unlink(root / "recreated" / name)
        (root / "recreated/kept").write_bytes(b"kept, rewritten")
        (root / "recreated/new").write_bytes(b"new")
        os.unlink(root / "becomes-dir")
        (root / "becomes-dir").mkdir(mode=0o711)
        (root / "becomes-dir/inner").write_bytes(b"inner")
        shutil.rmtree(root / "becomes-file")
        (root / "becomes-file").write_bytes(b"now a file")
        (root / "specials").mkdir()
        os.mkfifo(root / "specials/fifo", 0o640)
        os.mknod(root / "specials/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(root / "specials/loop", stat.S_IFBLK | 0o660, os.makedev(7, 1))
        os.chmod(root / "specials/null", 0o666)
        (root / "modes").mkdir()
        (root / "modes/setuid").write_bytes(b"su")
        os.chown(root / "modes/setuid", 1234, 5678)
        os.chmod(root / "modes/setuid", 0o4755)
        (root / "modes/sticky").mkdir()
        os.chmod(root / "modes/sticky", 0o1777)
        (root / "modes/setgid").mkdir()
        os.chmod(root / "modes/setgid", 0o2770)
        (root / "caps").write_bytes(b"\x7fELF")
        os.setxattr(root / "caps", "security.capability", tb.CAP_NET_BIND_SERVICE)
        (root / "h1").write_bytes(b"three names")
        os.link(root / "h1", root / "modes/h2")
        os.link(root / "h1", root / "specials/h3")
        os.symlink("../etc/passwd", root / "modes/rel-link")
        os.symlink("/etc/passwd", root / "abs-link")
        os.symlink("nowhere/at/all", root / "dangling")
        os.utime(root / "dangling", (1_200_000_000, 1_200_000_000), follow_symlinks=False)
        os.symlink("t" * 200, root / "long-target")
        (root / long_dir).mkdir(parents=True)
        (root / long_dir / ("n" * 200)).write_bytes(b"long")
        os.chmod(root / "usr/bin/tool", 0o700)
        os.chown(root / "usr/bin", 2, 2)
    diff_then_apply(driver, "upper", "copy", "base")
    assert_same_tree(tree(driver, "copy"), tree(driver, "upper"))
    assert links(driver, "copy") == links(driver, "upper")
    assert links(driver, "copy") == {frozenset({"/h1", "/modes/h2", "/specials/h3"})}
    assert sorted(driver.changes("copy")) == sorted(driver.changes("upper"))


def test_diff_of_a_base_layer_is_the_whole_tree(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    members = read_diff(driver, "base")
    # A layer kept as its tar (overlay's EROFS) gives that tar back: no parents added.
    made = set() if is_stored_tar(driver, "base") else {"/var", "/var/lib", "/usr"}
    assert set(members) == {"/" + e.name for e in BASE} | made
    assert not any(os.path.basename(p).startswith(".wh.") for p in members)
    diff_then_apply(driver, "base", "copy", None)
    assert_same_tree(tree(driver, "copy"), tree(driver, "base"))


def test_diff_against_an_older_ancestor(driver: lamina.Driver) -> None:
    apply(driver, "a", None, BASE)
    apply(driver, "b", "a", [tb.file("from-b", b"b"), tb.whiteout("etc/del")])
    apply(driver, "c", "b", [tb.file("from-c", b"c"), tb.whiteout("usr/bin/tool")])
    driver.create("c2", "a")
    with driver.diff("c", "a") as stream:
        driver.apply_diff("c2", "a", stream)
    assert_same_tree(tree(driver, "c2"), tree(driver, "c"))
    assert driver.diff_size("c", "a") == 2


def test_exported_tar_is_what_docker_writes(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    driver.create_rw("upper", "base")
    with mounted(driver, "upper") as root:
        os.unlink(root / "etc/del")
        (root / "etc/modify").write_bytes(b"modified")
        shutil.rmtree(root / "var/lib/gone")
        (root / "h1").write_bytes(b"hard")
        os.link(root / "h1", root / "etc/h2")
        (root / "caps").write_bytes(b"x")
        os.setxattr(root / "caps", "security.capability", tb.CAP_NET_RAW)
        os.mkfifo(root / "fifo")
    members = read_diff(driver, "upper")
    assert set(members) == {
        "/etc",
        "/etc/.wh.del",
        "/etc/modify",
        "/etc/h2",
        "/var",
        "/var/lib",
        "/var/lib/.wh.gone",
        "/h1",
        "/caps",
        "/fifo",
    }
    # whiteouts are empty regular files
    for path in ("/etc/.wh.del", "/var/lib/.wh.gone"):
        assert members[path].isreg() and members[path].size == 0, path
    # one of the two names carries the data, the other links to it
    h1, h2 = members["/h1"], members["/etc/h2"]
    data, link = (h1, h2) if h1.isreg() else (h2, h1)
    assert data.isreg() and data.size == 4
    assert link.islnk() and tar_path(link.linkname) == tar_path(data.name)
    cap = members["/caps"].pax_headers.get("SCHILY.xattr.security.capability")
    assert cap is not None and cap.encode("utf-8", "surrogateescape") == tb.CAP_NET_RAW
    assert members["/fifo"].isfifo()
    # directories come before what they contain
    order = list(members)
    for path in order:
        parent = os.path.dirname(path)
        if parent in members:
            assert order.index(parent) < order.index(path), path


def test_recreated_directory_hides_old_children(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    driver.create_rw("upper", "base")
    with mounted(driver, "upper") as root:
        shutil.rmtree(root / "recreated")
        (root / "recreated").mkdir()
        (root / "recreated/fresh").write_bytes(b"fresh")
    members = set(read_diff(driver, "upper"))
    inside = {p for p in members if p.startswith("/recreated/")}
    # overlay can tell (an opaque directory); vfs cannot (a whiteout per child), as Docker
    assert inside in (
        {"/recreated/.wh..wh..opq", "/recreated/fresh"},
        {"/recreated/.wh.old1", "/recreated/.wh.old2", "/recreated/.wh.kept", "/recreated/fresh"},
    ), sorted(inside)
    diff_then_apply(driver, "upper", "copy", "base")
    assert {p for p in names(driver, "copy") if p.startswith("/recreated/")} == {"/recreated/fresh"}


def test_diff_stream_is_a_closeable_context_manager(driver: lamina.Driver) -> None:
    apply(driver, "l", None, [tb.file("f", b"x" * 100_000)])
    with driver.diff("l") as stream:
        first = stream.read(1)
        rest = stream.read()
    data = first + rest
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["f"]
    stream = driver.diff("l")
    stream.read(10)
    stream.close()  # closed early: nothing may hang or leak
    driver.remove("l")


def test_diff_getter(driver: lamina.Driver) -> None:
    apply(driver, "base", None, [tb.file("lower", b"lower")])
    apply(driver, "l", "base", [tb.directory("x"), tb.file("x/y", b"hello"), tb.file("z", b"")])
    with driver.diff_getter("l") as getter:
        for path, want in (("x/y", b"hello"), ("z", b"")):
            f = getter.get(path)
            try:
                assert f.read() == want
            finally:
                f.close()


# --- id maps --------------------------------------------------------------------------------

UID_MAP = [(0, 100000, 65536)]
GID_MAP = [(0, 200000, 65536)]


@pytest.fixture
def mapped(stores: Stores, tmp_path: Path) -> lamina.Driver:
    return stores.open(tmp_path / "mapped", uid_map=UID_MAP, gid_map=GID_MAP)


def test_id_maps_on_apply(mapped: lamina.Driver) -> None:
    apply(
        mapped,
        "l",
        None,
        [
            tb.directory("d"),
            tb.file("d/root-file", b"r"),
            tb.file("user-file", b"u", uid=1000, gid=1001, mode=0o4750),
            tb.symlink("link", "d/root-file"),
        ],
    )
    got = tree(mapped, "l")
    assert (got["/d"].uid, got["/d"].gid) == (100000, 200000)
    assert (got["/d/root-file"].uid, got["/d/root-file"].gid) == (100000, 200000)
    assert (got["/user-file"].uid, got["/user-file"].gid) == (101000, 201001)
    assert got["/user-file"].mode == 0o4750
    assert (got["/link"].uid, got["/link"].gid) == (100000, 200000)
    assert (got["/"].uid, got["/"].gid) == (100000, 200000)
    assert stat.S_IMODE(mapped.home.stat().st_mode) == 0o710


def test_id_maps_on_export(mapped: lamina.Driver) -> None:
    apply(mapped, "base", None, [tb.file("base", b"b")])
    mapped.create_rw("ctr", "base")
    with mounted(mapped, "ctr") as root:
        (root / "by-root").write_bytes(b"r")
        os.chown(root / "by-root", 100000, 200000)
        (root / "by-user").write_bytes(b"u")
        os.chown(root / "by-user", 101000, 201001)
    members = read_diff(mapped, "ctr")
    assert (members["/by-root"].uid, members["/by-root"].gid) == (0, 0)
    assert (members["/by-user"].uid, members["/by-user"].gid) == (1000, 1001)
    with mapped.diff("ctr") as stream:
        mapped.apply_diff("copy", "base", stream)
    assert_same_tree(tree(mapped, "copy"), tree(mapped, "ctr"))


def test_id_maps_refuse_unmapped_owner(mapped: lamina.Driver) -> None:
    with pytest.raises(errors.LaminaError):
        apply(mapped, "l", None, [tb.file("ok", b"x"), tb.file("far", b"x", uid=70000)])
    assert not mapped.exists("l")


def test_id_maps_round_trip_between_stores(driver: lamina.Driver, mapped: lamina.Driver) -> None:
    entries = [tb.file("a", b"a", uid=5, gid=6), tb.directory("d", uid=1000, gid=1000)]
    apply(driver, "plain", None, entries)
    apply(mapped, "l", None, entries)
    with mapped.diff("l") as stream:
        driver.apply_diff("back", None, stream)
    assert_same_tree(tree(driver, "back"), tree(driver, "plain"))
    assert read(driver, "back", "a") == b"a"

"""EROFS images over layer tars (lamina.archive.erofstar): mounted by the kernel, they
show what GNU tar extracts from the same tar.

Each test writes a tar, indexes it with :func:`index_tar`, mounts the image with the
tar as its extra device (read-only; file-backed, or through loop devices where the
kernel cannot take a file), and compares the mounted tree with the tree that
``tar --xattrs --xattrs-include='*' --numeric-owner -xpf`` extracts from the same tar:
names, types, modes, owners, sizes, contents, every xattr, link targets, devices,
hard-link groups and mtimes to the nanosecond (directories' aside).  Whiteouts and
opaque markers, which GNU tar extracts as plain files, are compared as overlayfs
expects them in a lower layer: a 0/0 character device, ``trusted.overlay.opaque``.
The mounting and the pictures are :mod:`tests.erofsimages`'s; so is the second opinion:
every image a test writes is read by erofs-utils' ``fsck.erofs`` at its end.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lamina import errors
from lamina.archive.apply import Applier
from lamina.archive.erofstar import index_tar
from lamina.host.idmap import IdMapper
from tests import tarbuild as tb
from tests.erofsimages import OPQ, check_tar, differences, index, keep, mounted, picture

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("erofs_fsck")]


def test_a_damaged_image_does_not_mount(tmp_path: Path) -> None:
    # The mount helper's own check: a refusal is an error, never a skip.
    tar = tb.write(tmp_path / "layer.tar", [tb.file("f", b"x")])
    image = tmp_path / "meta.erofs"
    index(tar, image)
    with open(image, "r+b") as f:
        f.seek(1024)
        f.write(b"\0\0\0\0")  # the superblock's magic
    with pytest.raises(OSError), mounted(image, tar, tmp_path / "mnt"):
        pass


# -- trees from the builders --------------------------------------------------------------

ENTRIES = [
    tb.directory("etc", mode=0o755),
    tb.file("etc/motd", b"hello\n"),
    tb.file("etc/empty", b""),
    tb.file("etc/block", b"b" * 512),
    tb.file("etc/big", os.urandom(3 << 20), mode=0o4755, uid=70000, gid=80000),
    tb.file("etc/ns", b"ns", pax={"mtime": "1600000000.123456789"}),
    tb.file("etc/old", b"-", mtime=86400),
    tb.directory("tmp", mode=0o1777),
    tb.directory("srv", mode=0o2750, uid=1000, gid=1000),
    tb.symlink("lib", "usr/lib"),
    tb.symlink("abs", "/etc/motd"),
    tb.symlink("srv/long", "x/" * 1500),
    tb.symlink("srv/longest", "y" * 4095),
    tb.fifo("run/xfifo", xattrs={"user.dropped": b"1", "trusted.kept": b"2"}),
    tb.hardlink("etc/motd2", "etc/motd"),
    tb.hardlink("srv/motd3", "etc/motd"),
    tb.chardev("dev/null", 1, 3),
    tb.chardev("dev/big", 4000, 1_000_000),
    tb.blockdev("dev/sda", 8, 0, uid=6),
    tb.fifo("run/fifo", mode=0o600),
    tb.file("bin/ping", b"\x7fELF", mode=0o755,
            xattrs={"security.capability": tb.CAP_NET_RAW, "user.mime": b"x-elf",
                    "trusted.note": b"t" * 3000}),
    tb.directory("xdir", xattrs={"user.a": b"1"}),
    tb.file("deep/" + "d" * 100 + "/" + "e" * 200 + "/file", b"long name"),
    tb.file("replaced", b"first"),
    tb.file("replaced", b"second"),
    tb.file("wasfile", b"then a dir"),
    tb.directory("wasfile", mode=0o700),
    tb.file("./dotted//name", b"cleaned"),
    tb.whiteout("etc/removed"),
    tb.whiteout("etc/motd"),  # this layer's own file stays
    tb.opaque("var/cache"),
    tb.file("var/cache/kept", b"kept"),
    tb.file("missing/parents/here", b"made"),
    *[tb.file(f"many/file-{i:04d}-{'n' * (i % 40)}", str(i)) for i in range(300)],
]


def test_builders_tree_mounts_as_gnu_tar_extracts(tmp_path: Path) -> None:
    tar = tb.write(tmp_path / "layer.tar", ENTRIES)
    got, _ = check_tar(tar, tmp_path)
    assert got["/etc/removed"][0] == "c---------"
    assert ("trusted.overlay.opaque", b"y") in got["/var/cache"][7]


def test_the_same_tar_gives_the_same_image(tmp_path: Path) -> None:
    # No clock, uuid or order of a dict in it: an image can be checked by its digest.
    tar = tb.write(tmp_path / "layer.tar", ENTRIES)
    index(tar, tmp_path / "one.erofs")
    index(tar, tmp_path / "two.erofs")
    assert (tmp_path / "one.erofs").read_bytes() == (tmp_path / "two.erofs").read_bytes()


def test_the_tar_stored_while_it_is_indexed(tmp_path: Path) -> None:
    # One pass: the stream is read once, and the copy written on the way is the device.
    data = tb.build(ENTRIES)
    tar, image = tmp_path / "stored.tar", tmp_path / "meta.erofs"
    with open(tar, "wb") as store, open(image, "wb") as out:
        index_tar(io.BytesIO(data + bytes(512 * 20)), out, store=store)
    keep(image, tar)
    assert tar.read_bytes() == data + bytes(512 * 20)
    with mounted(image, tar, tmp_path / "mnt") as where:
        assert (where / "etc/big").read_bytes() == ENTRIES[4].data


def test_owners_through_id_maps(tmp_path: Path) -> None:
    tar = tb.write(tmp_path / "layer.tar", [
        tb.file("d/f", b"x", uid=1000, gid=1001), tb.whiteout("d/gone"),
    ])
    image = tmp_path / "meta.erofs"
    ids = IdMapper([(0, 100_000, 65536)], [(0, 200_000, 65536)])
    with open(tar, "rb") as src, open(image, "wb") as out:
        index_tar(src, out, ids=ids)
    keep(image, tar)
    with mounted(image, tar, tmp_path / "mnt") as where:
        got, _ = picture(where)
    assert {path: node[1:3] for path, node in got.items()} == {
        "/d": (100_000, 200_000), "/d/f": (101_000, 201_001), "/d/gone": (100_000, 200_000)}
    with open(tar, "rb") as src, open(image, "wb") as out, pytest.raises(errors.UnsafeArchive):
        index_tar(src, out, ids=IdMapper([(0, 100_000, 1000)], [(0, 200_000, 1000)]))


def test_loop_devices_mount_it_too(tmp_path: Path) -> None:
    # What a kernel before 6.12 (no file-backed mounts) needs: the image and the tar
    # each on a loop device, the tar's named in the device= option.
    tar = tb.write(tmp_path / "layer.tar", ENTRIES)
    image = tmp_path / "meta.erofs"
    index(tar, image)
    with mounted(image, tar, tmp_path / "mnt", loops=True) as where:
        assert (where / "etc/big").read_bytes() == ENTRIES[4].data
        assert (where / "srv/long").readlink() == Path("x/" * 1500)


def test_names_that_are_not_utf8(tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(_raw(tb.raw_member(b"caf\xe9", b"latin-1"),
                         tb.raw_member(b"d\xff/f\xfe", b"bytes")))
    got, _ = check_tar(tar, tmp_path)
    assert sorted(got) == sorted(os.fsdecode(n) for n in (b"/caf\xe9", b"/d\xff",
                                                          b"/d\xff/f\xfe"))


def test_deep_nesting_within_the_limit(tmp_path: Path) -> None:
    name = "d/" * 500 + "f"
    tar = tb.write(tmp_path / "layer.tar", [tb.file(name, b"deep")])
    image = tmp_path / "meta.erofs"
    index(tar, image)
    with mounted(image, tar, tmp_path / "mnt") as where:
        assert (where / name).read_bytes() == b"deep"


@pytest.mark.slow
def test_a_file_past_4_gib(tmp_path: Path) -> None:
    # Extended inode (64-bit size), chunk indexes of 2^24 blocks; the tar is sparse.
    size = (5 << 30) + 3
    tar = tmp_path / "layer.tar"
    with open(tar, "wb") as f:
        f.write(tb.raw_header("big", size=size))
        f.seek(size - 3, os.SEEK_CUR)
        f.write(b"end" + bytes(-size % 512) + tb.END)
    image = tmp_path / "meta.erofs"
    index(tar, image)
    with mounted(image, tar, tmp_path / "mnt") as where, open(where / "big", "rb") as f:
        assert os.fstat(f.fileno()).st_size == size
        f.seek(size - 5)
        assert f.read() == b"\0\0end"
        f.seek(1 << 32)
        assert f.read(4) == bytes(4)


def test_chunks_of_a_file_past_the_largest_chunk() -> None:
    from lamina.archive import erofs

    size = (512 << 31) + 1  # 1 TiB and a byte: the 5-bit chunk size is 1 TiB at most
    fmt, chunks = erofs.chunk_format(size)
    assert (fmt, chunks) == (erofs.CHUNK_FORMAT_INDEXES | 31, 2)
    indexes = erofs.chunk_indexes(100, size)
    assert [int.from_bytes(indexes[i + 4 : i + 8], "little") for i in (0, 8)] == [
        100, 100 + (1 << 31)]
    assert [int.from_bytes(indexes[i + 2 : i + 4], "little") for i in (0, 8)] == [1, 1]
    assert erofs.chunk_format(512) == (erofs.CHUNK_FORMAT_INDEXES, 1)
    assert erofs.chunk_format(513) == (erofs.CHUNK_FORMAT_INDEXES | 1, 1)


def test_a_file_replaces_a_directory(tmp_path: Path) -> None:
    # GNU tar does not remove a directory that is not empty ("File exists"): checked
    # here against what contract §2 says instead.
    tar = tb.write(tmp_path / "layer.tar", [
        tb.file("wasdir/inner", b"linked"),
        tb.file("wasdir/sub/gone", b"gone"),
        tb.hardlink("keep", "wasdir/inner"),
        tb.file("wasdir", b"now a file"),
    ])
    image = tmp_path / "meta.erofs"
    index(tar, image)
    with mounted(image, tar, tmp_path / "mnt") as where:
        got, links = picture(where)
        assert (where / "wasdir").read_bytes() == b"now a file"
        assert (where / "keep").read_bytes() == b"linked"
    assert sorted(got) == ["/keep", "/wasdir"]
    assert got["/keep"][9] == 1 and not links


def test_gnu_format_tree(tmp_path: Path) -> None:
    entries = [e for e in ENTRIES if not e.pax and not e.xattrs and e.uid < 1 << 21]
    tar = tb.write(tmp_path / "layer.tar", entries, format=tarfile.GNU_FORMAT)
    check_tar(tar, tmp_path)


def test_overlay_xattrs_from_the_tar_are_dropped(tmp_path: Path) -> None:
    tar = tb.write(tmp_path / "layer.tar", [
        tb.directory("d", xattrs={"trusted.overlay.opaque": b"y",
                                  "trusted.overlay.redirect": b"/x", "user.ok": b"1"}),
        tb.file("f", b"x", xattrs={"user.overlay.origin": b"o"}),
    ])
    got, _ = check_tar(tar, tmp_path)
    assert got["/d"][7] == (("user.ok", b"1"),)
    assert got["/f"][7] == ()


# -- generated trees ----------------------------------------------------------------------

_names = st.sampled_from(["a", "b", "c", "a/b", "a/c", "b/a", "a/b/c", "c/a/b", "é", "a/é"])
_member = st.one_of(
    st.builds(lambda n, d, m, u: tb.file(n, d, mode=m, uid=u), _names,
              st.binary(max_size=1500), st.sampled_from([0o644, 0o755, 0o4711, 0o600]),
              st.sampled_from([0, 1, 65535, 65536, 4_000_000])),
    st.builds(lambda n, m: tb.directory(n, mode=m), _names,
              st.sampled_from([0o755, 0o700, 0o1777])),
    # Relative targets only: GNU tar delays symlinks to absolute or ``..`` targets to the
    # end, where they win over a later member of the same name.
    st.builds(lambda n, t: tb.symlink(n, t), _names, st.sampled_from(["a", "x/y", "é"])),
    st.builds(lambda n, t: tb.hardlink(n, t), _names, _names),
    st.builds(lambda n: tb.fifo(n), _names),
    st.builds(lambda n, x: tb.file(n, b"x", xattrs={"user.k": x}), _names, st.binary(max_size=40)),
    st.builds(lambda n: tb.whiteout(n), _names),
    st.builds(lambda n: tb.opaque(n), st.sampled_from(["a", "b", "a/b"])),
)


def _layer(members: list[tb.Entry]) -> list[tb.Entry]:
    """Members that GNU tar and the index take the same way: a hard link only to an
    earlier file still there, no member under a non-directory, no non-directory over a
    directory (GNU tar keeps the directory: "File exists")."""
    kept: list[tb.Entry] = []
    kinds: dict[str, bytes] = {}
    for m in members:
        parts = m.name.split("/")
        if any(kinds.get("/".join(parts[:i]), tarfile.DIRTYPE) != tarfile.DIRTYPE
               for i in range(1, len(parts))):
            continue
        if m.type == tarfile.LNKTYPE and kinds.get(m.linkname) not in (tarfile.REGTYPE,):
            continue
        if m.type == tarfile.LNKTYPE and m.linkname == m.name:
            continue
        if m.type != tarfile.DIRTYPE and not parts[-1].startswith(".wh.") and (
                kinds.get(m.name) == tarfile.DIRTYPE
                or any(k.startswith(m.name + "/") for k in kinds)):
            continue
        for i in range(1, len(parts)):
            kinds.setdefault("/".join(parts[:i]), tarfile.DIRTYPE)
        if not parts[-1].startswith(".wh."):
            kinds[m.name] = tarfile.REGTYPE if m.type == tarfile.LNKTYPE else m.type
        kept.append(m)
    return kept


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(_member, max_size=25))
def test_generated_tars_mount_as_gnu_tar_extracts(tmp_path: Path,
                                                  members: list[tb.Entry]) -> None:
    work = tmp_path / f"case-{time.monotonic_ns()}"
    work.mkdir()
    check_tar(tb.write(work / "layer.tar", _layer(members)), work)


# -- over lower layers --------------------------------------------------------------------


def make_lower(root: Path) -> Path:
    """A lower layer: merged /usr, a private /var, files to delete, a directory to hide."""
    (root / "usr/lib").mkdir(parents=True)
    os.chown(root / "usr/lib", 5, 6)
    os.chmod(root / "usr/lib", 0o750)
    os.setxattr(root / "usr/lib", "user.lower", b"1")
    os.utime(root / "usr/lib", ns=(1_500_000_000_000_000_000, 1_500_000_000_123_456_789))
    os.symlink("usr/lib", root / "lib")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_bytes(b"root:x:0:0\n")
    (root / "var").mkdir(mode=0o700)
    os.chown(root / "var", 7, 7)
    (root / "srv/old").mkdir(parents=True)
    (root / "opt").mkdir()
    return root


OVER_LOWERS = {
    "parents and whiteouts": [
        tb.file("lib/new.so", b"through the lower's symlink"),
        tb.file("var/log/new", b"under a copied-up parent"),
        tb.whiteout("etc/passwd"),
        tb.whiteout("etc/nothing"),
        tb.whiteout("nodir/x"),
        tb.whiteout("opt"),
        tb.opaque("srv"),
        tb.file("srv/new", b"in an opaque directory"),
    ],
    "opaque root": [
        tb.file("etc/new", b"new"),
        tb.opaque(""),
        tb.file("top", b"top"),
    ],
}


@pytest.mark.parametrize("case", sorted(OVER_LOWERS))
def test_over_lowers_as_the_applier_writes(tmp_path: Path, case: str) -> None:
    lower = make_lower(tmp_path / "lower")
    tar = tb.write(tmp_path / "layer.tar", OVER_LOWERS[case])
    applied = tmp_path / "applied"
    applied.mkdir()
    with open(tar, "rb") as f:
        Applier(applied, overlay_whiteouts=True, lowers=[str(lower)]).apply(f)
    want, _ = picture(applied)
    image = tmp_path / "meta.erofs"
    index(tar, image, lowers=[str(lower)])
    with mounted(image, tar, tmp_path / "mnt") as where:
        got, _ = picture(where)
    # Both copy the lower's xattrs up with the directory (the applier lost them once: it
    # set them on /proc/self/fd/N without following the link, and EPERM was ignored).
    if case == "parents and whiteouts":
        assert "/usr/lib/new.so" in got and "/nodir" not in got
        assert got["/usr/lib"][7] == want["/usr/lib"][7] == (("user.lower", b"1"),)
    else:
        assert {got[p][0] for p in ("/lib", "/opt", "/srv", "/usr", "/var")} == {"c---------"}
    for tree in (got, want):
        for path, node in tree.items():
            # Whiteouts: the applier's are made now, without a member's time; directories:
            # the applier leaves those it copied up or made with the time of their making.
            if (node[0] == "c---------" and node[6] == (0, 0)) or node[0].startswith("d"):
                tree[path] = (*node[:8], None, node[9])
    assert not differences(got, want), "\n".join(differences(got, want))


# -- damaged tars -------------------------------------------------------------------------

_SEED = tb.build([e for e in ENTRIES[:24] if len(e.data) < 4096] + ENTRIES[-5:])


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_SEED) - 1), st.integers(0, 255)), max_size=4),
       st.one_of(st.just(len(_SEED)), st.integers(0, len(_SEED))))
def test_damaged_tars_are_refused_or_mount_whole(tmp_path: Path, flips: list[tuple[int, int]],
                                                 cut: int) -> None:
    # Bytes flipped and the tar cut anywhere: a LaminaError, or an image the kernel
    # mounts and reads to the end without an error (fuzz/erofs_index.py goes further,
    # without mounting).
    data = bytearray(_SEED)
    for at, value in flips:
        data[at] = value
    work = tmp_path / f"case-{time.monotonic_ns()}"
    work.mkdir()
    tar = work / "layer.tar"
    tar.write_bytes(bytes(data[:cut]) if cut < len(data) else bytes(data))
    try:
        index(tar, work / "meta.erofs")
    except errors.LaminaError as e:
        event(f"refused: {type(e).__name__}")
        return
    event("mounted")
    with mounted(work / "meta.erofs", tar, work / "mnt") as where:
        picture(where)


# -- the corpus ---------------------------------------------------------------------------


@pytest.mark.corpus
@pytest.mark.slow
def test_corpus_rootfs(tmp_path: Path, corpus_dir: Path) -> None:
    tar = corpus_dir / "rootfs.tar"
    got, took = check_tar(tar, tmp_path)
    size = (tmp_path / "meta.erofs").stat().st_size
    print(f"\nrootfs.tar: {len(got)} paths, {tar.stat().st_size} bytes of tar; "
          f"index {size} bytes in {took:.3f} s")


# -- hostile and unsupported tars ---------------------------------------------------------


def _raw(*members: bytes) -> bytes:
    return b"".join(members) + tb.END


HOSTILE = {
    "dotdot": _raw(tb.raw_member("../evil", b"x")),
    "inner dotdot": _raw(tb.raw_member("a/../../evil", b"x")),
    "slash dotdot": _raw(tb.raw_member("/../evil", b"x")),
    "path past PATH_MAX": _raw(tb.raw_pax({"path": "/".join(["x" * 250] * 20)}),
                               tb.raw_member("f", b"x")),
    "a symlink leads past PATH_MAX": _raw(
        tb.raw_pax({"linkpath": "/".join(["y" * 200] * 19)}),
        tb.raw_member("s", type=tarfile.SYMTYPE),
        tb.raw_pax({"path": "s/" + "z" * 250 + "/" + "w" * 200 + "/f"}),
        tb.raw_member("f", b"x")),
    "empty name": _raw(tb.raw_member("", b"x")),
    "NUL in a PAX path": _raw(tb.raw_pax({"path": "a\0b"}), tb.raw_member("ab", b"x")),
    "bare whiteout": _raw(tb.raw_member(".wh.", b"")),
    "whiteout of dotdot": _raw(tb.raw_member("a/.wh...", b"")),
    "root not a directory": _raw(tb.raw_member("./", b"x")),
    "hard link to a directory": _raw(tb.raw_member("d", type=tarfile.DIRTYPE),
                                     tb.raw_member("l", type=tarfile.LNKTYPE, linkname="d")),
    "hard link to the root": _raw(tb.raw_member("l", type=tarfile.LNKTYPE, linkname="./")),
    "too deep": _raw(tb.raw_pax({"path": "d/" * 600 + "f"}), tb.raw_member("f", b"x")),
    "name too long": _raw(tb.raw_pax({"path": "n" * 256}), tb.raw_member("f", b"x")),
    "truncated": tb.raw_member("f", b"x" * 2000)[:1024],
    "empty symlink": _raw(tb.raw_member("s", type=tarfile.SYMTYPE, linkname="")),
    "symlink past PATH_MAX": _raw(tb.raw_pax({"linkpath": "x" * 4096}),
                                  tb.raw_member("s", type=tarfile.SYMTYPE)),
    "symlink loop": _raw(tb.raw_member("a", type=tarfile.SYMTYPE, linkname="b"),
                         tb.raw_member("b", type=tarfile.SYMTYPE, linkname="a"),
                         tb.raw_member("a/f", b"x")),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tars_are_refused(tmp_path: Path, case: str) -> None:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(HOSTILE[case])
    with pytest.raises(errors.UnsafeArchive):
        index(tar, tmp_path / "meta.erofs")


def test_absolute_names_are_the_layers_own(tmp_path: Path) -> None:
    """``/x`` is the layer's ``x``, as the applier (and Docker) have it."""
    tar = tmp_path / "layer.tar"
    tar.write_bytes(_raw(tb.raw_member("/etc/evil", b"x"), tb.raw_member("//abs", b"y")))
    image = tmp_path / "meta.erofs"
    index(tar, image)
    with mounted(image, tar, tmp_path / "mnt") as where:
        got, _ = picture(where)
        assert (where / "etc/evil").read_bytes() == b"x"
    assert sorted(got) == ["/abs", "/etc", "/etc/evil"]


def test_symlinks_in_parents_stay_inside_the_layer(tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    tar.write_bytes(_raw(
        tb.raw_member("up", type=tarfile.SYMTYPE, linkname="../../../../.."),
        tb.raw_member("root", type=tarfile.SYMTYPE, linkname="/"),
        tb.raw_member("up/etc/a", b"a"),
        tb.raw_member("root/etc/b", b"b"),
    ))
    image = tmp_path / "meta.erofs"
    index(tar, image)
    with mounted(image, tar, tmp_path / "mnt") as where:
        got, _ = picture(where)
    assert sorted(got) == ["/etc", "/etc/a", "/etc/b", "/root", "/up"]


def test_a_symlink_is_0777_whatever_its_member_says(tmp_path: Path) -> None:
    # As symlink(2) makes it, and the directory applier; the image kept the member's
    # bits once (found by fsck.erofs's extraction, compared with the mount).
    tar = tmp_path / "layer.tar"
    tar.write_bytes(_raw(tb.raw_member("s", type=tarfile.SYMTYPE, linkname="/", mode=0o644)))
    index(tar, tmp_path / "meta.erofs")
    applied = tmp_path / "applied"
    applied.mkdir()
    with open(tar, "rb") as f:
        Applier(applied, overlay_whiteouts=True).apply(f)
    with mounted(tmp_path / "meta.erofs", tar, tmp_path / "mnt") as where:
        got, _ = picture(where)
    assert got["/s"][0] == picture(applied)[0]["/s"][0] == "lrwxrwxrwx"


def test_huge_directory(tmp_path: Path) -> None:
    count = 20_000
    tar = tmp_path / "layer.tar"
    with open(tar, "wb") as f:
        for i in range(count):
            f.write(tb.raw_member(f"d/{i:08d}-{'x' * (i % 90)}", b""))
        f.write(tb.END)
    image = tmp_path / "meta.erofs"
    index(tar, image)
    with mounted(image, tar, tmp_path / "mnt") as where:
        names = os.listdir(where / "d")
        assert len(names) == count
        assert (where / "d" / names[-1]).is_file()
        assert os.stat(where / "d" / f"{count - 1:08d}-{'x' * ((count - 1) % 90)}").st_size == 0


UNSUPPORTED = {
    "sparse": (_raw(tb.raw_gnu_sparse("sparse", [(0, b"a" * 512), (1 << 20, b"b")], 2 << 20)),
               "sparse"),
    "hard link to a lower layer's file": (
        _raw(tb.raw_member("l", type=tarfile.LNKTYPE, linkname="lower/file")), "l"),
    "PAX sparse": (_raw(tb.raw_pax_sparse_1_0("p", [(0, b"a" * 512), (4096, b"b")], 8192)),
                   "p"),
    "opaque root": (_raw(tb.raw_member(OPQ, b"")), OPQ),
    "whiteout device": (_raw(tb.raw_member("wh", type=tarfile.CHRTYPE)), "wh"),
    "xattrs past an inode's area": (_raw(
        tb.raw_pax({f"SCHILY.xattr.user.x{i:05d}": b"v" * 64000 for i in range(5)}),
        tb.raw_member("x", b"")), "x"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_what_cannot_be_an_image_is_unsupported(tmp_path: Path, case: str) -> None:
    data, path = UNSUPPORTED[case]
    tar = tmp_path / "layer.tar"
    tar.write_bytes(data)
    with pytest.raises(errors.Unsupported) as caught:
        index(tar, tmp_path / "meta.erofs")
    assert caught.value.path == path


# -- memory -------------------------------------------------------------------------------


@pytest.mark.slow
def test_memory_of_a_100k_entry_layer(tmp_path: Path) -> None:
    tar = tmp_path / "layer.tar"
    with open(tar, "wb") as f:
        for d in range(1000):
            f.write(tb.raw_member(f"usr/share/d{d:04d}", type=tarfile.DIRTYPE))
            for i in range(99):
                f.write(tb.raw_member(f"usr/share/d{d:04d}/file-{i:03d}.txt", b"x" * (i % 3)))
        f.write(tb.END)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec (the child would
    # report this test process's peak), while VmHWM belongs to the new address space.
    script = textwrap.dedent(f"""
        import re, time
        from lamina.archive.erofstar import index_tar
        def hwm():
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\\s+(\\d+)", f.read()).group(1))
        base = hwm()
        t = time.perf_counter()
        with open({str(tar)!r}, "rb") as src, open({str(tmp_path / 'meta.erofs')!r}, "wb") as out:
            stats = index_tar(src, out)
        print(stats.inodes, stats.image_size, time.perf_counter() - t, base, hwm())
    """)
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                          text=True)
    inodes, size, took, base, peak = done.stdout.split()
    print(f"\n100k entries: {inodes} inodes, index {size} bytes in {float(took):.2f} s, "
          f"peak RSS {int(peak) // 1024} MiB ({int(base) // 1024} MiB before)")
    assert int(inodes) == 100_003  # the root, usr, usr/share, 1,000 directories, 99,000 files
    assert (int(peak) - int(base)) * 1024 < 30 * 1_000_000  # 300 MB for 1,000,000 entries

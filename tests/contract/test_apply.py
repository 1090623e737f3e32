"""Conformance, part 2: applying layer tars (contract §2), on every backend.

The cases follow the OCI image spec's ``layer.md`` and moby's ``pkg/archive`` tests:
whiteouts and opaque directories, hard links into lower layers, special files, xattrs,
type replacements, long names, sparse files and compressed streams.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import stat
import tarfile
from collections.abc import Callable

import pytest

import lamina
from lamina import errors
from tests import tarbuild as tb
from tests.layers import apply, kind, links, lstat, mounted, names, read, tree
from tests.snapshot import Node, assert_same_tree

pytestmark = pytest.mark.root

M = tb.MTIME


def node(
    kind: str,
    mode: int,
    *,
    uid: int = 0,
    gid: int = 0,
    data: bytes | None = None,
    link: str | None = None,
    rdev: tuple[int, int] | None = None,
    cap: bytes | None = None,
    mtime: int = M,
) -> Node:
    """The :class:`Node` a tar entry should become."""
    return Node(
        type=kind,
        mode=mode,
        uid=uid,
        gid=gid,
        size=len(data) if data is not None else None,
        sha256=hashlib.sha256(data).hexdigest() if data is not None else None,
        link=link,
        rdev=rdev,
        cap=cap,
        mtime=None if kind == "dir" else mtime,
    )


# --- what a tar carries -----------------------------------------------------------------------


def test_returns_size_of_regular_file_data(driver: lamina.Driver) -> None:
    size = apply(
        driver,
        "l",
        None,
        [
            tb.directory("d"),
            tb.file("d/three", b"abc"),
            tb.file("ten", b"0123456789"),
            tb.file("empty", b""),
            tb.hardlink("d/link", "ten"),
            tb.symlink("sym", "ten"),
            tb.fifo("fifo"),
        ],
    )
    assert size == 13


def test_exact_metadata(driver: lamina.Driver) -> None:
    apply(
        driver,
        "l",
        None,
        [
            tb.directory("d", mode=0o2750, uid=11, gid=12, mtime=M - 1000),
            tb.file("d/f", b"data", mode=0o4755, uid=13, gid=14, mtime=M - 2000),
            tb.symlink("d/s", "f", uid=15, gid=16, mtime=M - 3000),
            tb.directory("sticky", mode=0o1777, mtime=M - 4000),
            tb.file("sticky/g", b"", mode=0o2711, uid=17, gid=18),
            tb.file("old", b"1970", mtime=0),
        ],
    )
    want = {
        "/d": node("dir", 0o2750, uid=11, gid=12),
        "/d/f": node("file", 0o4755, uid=13, gid=14, data=b"data", mtime=M - 2000),
        "/d/s": node("symlink", 0o777, uid=15, gid=16, link="f", mtime=M - 3000),
        "/sticky": node("dir", 0o1777),
        "/sticky/g": node("file", 0o2711, uid=17, gid=18, data=b""),
        "/old": node("file", 0o644, data=b"1970", mtime=0),
    }
    got = tree(driver, "l")
    got.pop("/")
    assert_same_tree(got, want)
    # directories' mtimes are set after their contents
    assert int(lstat(driver, "l", "d").st_mtime) == M - 1000
    assert int(lstat(driver, "l", "sticky").st_mtime) == M - 4000


def test_missing_parent_directories_are_created(driver: lamina.Driver) -> None:
    apply(driver, "l", None, [tb.file("a/b/c/file", b"x")])
    for d in ("a", "a/b", "a/b/c"):
        st = lstat(driver, "l", d)
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o755
    assert read(driver, "l", "a/b/c/file") == b"x"


def test_dot_slash_names(driver: lamina.Driver) -> None:
    apply(
        driver,
        "l",
        None,
        [tb.directory("./", mode=0o755), tb.directory("./d/"), tb.file("./d/./f", b"x")],
    )
    assert names(driver, "l") == {"/d", "/d/f"}


def test_special_files(driver: lamina.Driver) -> None:
    apply(
        driver,
        "l",
        None,
        [
            tb.fifo("fifo", mode=0o620, uid=3, gid=4),
            tb.chardev("null", 1, 3, mode=0o666),
            tb.chardev("tty9", 4, 9, mode=0o620, uid=0, gid=5),
            tb.blockdev("loop0", 7, 0, mode=0o660, gid=6),
        ],
    )
    got = tree(driver, "l")
    assert got["/fifo"] == node("fifo", 0o620, uid=3, gid=4)
    assert got["/null"] == node("char", 0o666, rdev=(1, 3))
    assert got["/tty9"] == node("char", 0o620, gid=5, rdev=(4, 9))
    assert got["/loop0"] == node("block", 0o660, gid=6, rdev=(7, 0))


def test_capability_xattr(driver: lamina.Driver) -> None:
    apply(
        driver,
        "l",
        None,
        [
            tb.file("ping", b"\x7fELF", mode=0o755, xattrs={"security.capability": tb.CAP_NET_RAW}),
            tb.file("plain", b"x"),
        ],
    )
    got = tree(driver, "l")
    assert got["/ping"].cap == tb.CAP_NET_RAW
    assert got["/ping"].mode == 0o755
    assert got["/plain"].cap is None


def test_capability_survives_chown_and_setuid(driver: lamina.Driver) -> None:
    # chown clears security.capability and setuid bits: they must be set after it.
    apply(
        driver,
        "l",
        None,
        [
            tb.file(
                "bin",
                b"x",
                mode=0o4755,
                uid=1000,
                gid=1000,
                xattrs={"security.capability": tb.CAP_NET_BIND_SERVICE},
            )
        ],
    )
    got = tree(driver, "l")["/bin"]
    assert (got.mode, got.uid, got.gid, got.cap) == (0o4755, 1000, 1000, tb.CAP_NET_BIND_SERVICE)


def test_trusted_overlay_xattrs_are_never_applied(driver: lamina.Driver) -> None:
    apply(driver, "base", None, [tb.directory("d"), tb.file("d/old", b"old")])
    apply(
        driver,
        "l",
        "base",
        [
            tb.directory("d", xattrs={"trusted.overlay.opaque": b"y"}),
            tb.file("d/new", b"new", xattrs={"trusted.overlay.redirect": b"/d/old"}),
            tb.file("top", b"t", xattrs={"trusted.overlay.metacopy": b""}),
        ],
    )
    assert names(driver, "l") == {"/d", "/d/old", "/d/new", "/top"}
    assert read(driver, "l", "d/old") == b"old"
    places = [driver.get("l")]
    try:
        meta = driver.metadata("l")
        places += [meta[k] for k in ("dir", "UpperDir") if k in meta]
        for place in places:
            for rel in ("d", "d/new", "top"):
                path = os.path.join(place, rel)
                if os.path.lexists(path):
                    found = [x for x in os.listxattr(path) if x.startswith("trusted.overlay.")]
                    assert found == [], f"{path}: {found}"
    finally:
        driver.put("l")


# --- whiteouts --------------------------------------------------------------------------------

LOWER = [
    tb.directory("d"),
    tb.file("d/a", b"a"),
    tb.file("d/b", b"b"),
    tb.directory("d/sub"),
    tb.file("d/sub/deep", b"deep"),
    tb.directory("keep"),
    tb.file("keep/k", b"k"),
    tb.file("top", b"top"),
]


def test_whiteout_deletes_lower_file(driver: lamina.Driver) -> None:
    apply(driver, "base", None, LOWER)
    apply(driver, "l", "base", [tb.whiteout("d/a"), tb.whiteout("top")])
    assert names(driver, "l") == {"/d", "/d/b", "/d/sub", "/d/sub/deep", "/keep", "/keep/k"}
    assert "/d/a" in names(driver, "base")


def test_whiteout_deletes_lower_directory(driver: lamina.Driver) -> None:
    apply(driver, "base", None, LOWER)
    apply(driver, "l", "base", [tb.whiteout("d/sub"), tb.whiteout("keep")])
    assert names(driver, "l") == {"/d", "/d/a", "/d/b", "/top"}


def test_whiteout_of_missing_path_is_ignored(driver: lamina.Driver) -> None:
    apply(driver, "base", None, LOWER)
    apply(driver, "l", "base", [tb.whiteout("d/nothing"), tb.whiteout("nowhere/x")])
    assert names(driver, "l") == names(driver, "base")


def test_whiteout_then_recreate_in_same_tar(driver: lamina.Driver) -> None:
    apply(driver, "base", None, LOWER)
    apply(driver, "l", "base", [tb.whiteout("d/sub"), tb.file("d/sub", b"now a file", mode=0o600)])
    got = tree(driver, "l")
    assert got["/d/sub"] == node("file", 0o600, data=b"now a file")
    assert "/d/sub/deep" not in got


def test_whiteout_never_hides_same_tar_entries(driver: lamina.Driver) -> None:
    # OCI layer.md: whiteouts apply to lower layers only.
    apply(driver, "base", None, LOWER)
    apply(driver, "l", "base", [tb.file("d/new", b"new"), tb.whiteout("d/new")])
    assert read(driver, "l", "d/new") == b"new"


@pytest.mark.parametrize("where", ["first", "last", "middle"])
def test_opaque_directory(driver: lamina.Driver, where: str) -> None:
    apply(driver, "base", None, LOWER)
    entries = [
        tb.directory("d", mode=0o750),
        tb.file("d/new", b"new"),
        tb.file("d/b", b"b again"),
        tb.directory("d/fresh"),
    ]
    marker = tb.opaque("d")
    index = {"first": 1, "last": len(entries), "middle": 2}[where]
    entries.insert(index, marker)
    apply(driver, "l", "base", entries)
    got = tree(driver, "l")
    assert {p for p in got if p.startswith("/d/")} == {"/d/new", "/d/b", "/d/fresh"}
    assert got["/d"].mode == 0o750
    assert read(driver, "l", "d/b") == b"b again"
    assert "/keep/k" in got and "/top" in got
    assert "/d/sub/deep" in names(driver, "base")


def test_opaque_directory_with_no_lower(driver: lamina.Driver) -> None:
    apply(driver, "base", None, LOWER)
    apply(driver, "l", "base", [tb.directory("new"), tb.opaque("new"), tb.file("new/f", b"f")])
    assert {p for p in names(driver, "l") if p.startswith("/new")} == {"/new", "/new/f"}


def test_opaque_root(driver: lamina.Driver) -> None:
    apply(driver, "base", None, LOWER)
    apply(driver, "l", "base", [tb.opaque(""), tb.file("only", b"o")])
    assert names(driver, "l") == {"/only"}


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "d/.wh.", "d/.wh..", "d/.wh..."])
def test_bad_whiteout_names_are_unsafe(driver: lamina.Driver, name: str) -> None:
    apply(driver, "base", None, LOWER)
    with pytest.raises(errors.UnsafeArchive):
        apply(driver, "l", "base", [tb.file("before", b"x"), tb.file(name, b"")])
    assert not driver.exists("l")
    assert names(driver, "base") == {"/" + e.name for e in LOWER}


# --- links, replacements, merges --------------------------------------------------------------


def test_hard_links_in_one_tar(driver: lamina.Driver) -> None:
    apply(
        driver,
        "l",
        None,
        [
            tb.file("a", b"shared", mode=0o4750, uid=7),
            tb.hardlink("b", "a"),
            tb.directory("d"),
            tb.hardlink("d/c", "b"),
        ],
    )
    got = tree(driver, "l")
    want = node("file", 0o4750, uid=7, data=b"shared")
    assert got["/a"] == got["/b"] == got["/d/c"] == want
    assert links(driver, "l") == {frozenset({"/a", "/b", "/d/c"})}


def test_hard_link_to_file_only_a_lower_layer_has(driver: lamina.Driver) -> None:
    # What Docker writes when a layer hard-links a lower file: overlay copies the file
    # up, so the tar carries it in full under one name and links the other to it.
    python = b"\x7fELF python" * 100
    apply(
        driver,
        "base",
        None,
        [tb.directory("usr/bin"), tb.file("usr/bin/python3", python, mode=0o755)],
    )
    apply(
        driver,
        "l",
        "base",
        [
            tb.directory("app"),
            tb.file("app/python", python, mode=0o755),
            tb.directory("usr"),
            tb.directory("usr/bin"),
            tb.hardlink("usr/bin/python3", "app/python", mode=0o755),
        ],
    )
    got = tree(driver, "l")
    assert got["/app/python"] == got["/usr/bin/python3"] == node("file", 0o755, data=python)
    assert frozenset({"/app/python", "/usr/bin/python3"}) in links(driver, "l")
    assert links(driver, "base") == set()


def test_file_replaced_by_directory_and_back(driver: lamina.Driver) -> None:
    apply(
        driver,
        "base",
        None,
        [
            tb.file("was-file", b"f"),
            tb.directory("was-dir"),
            tb.file("was-dir/child", b"c"),
            tb.directory("was-dir/sub"),
            tb.symlink("was-link", "was-file"),
            tb.file("was-fifo", b"x"),
        ],
    )
    apply(
        driver,
        "l",
        "base",
        [
            tb.directory("was-file", mode=0o700),
            tb.file("was-file/inner", b"i"),
            tb.file("was-dir", b"now a file"),
            tb.directory("was-link"),
            tb.fifo("was-fifo"),
        ],
    )
    got = tree(driver, "l")
    assert got["/was-file"] == node("dir", 0o700)
    assert got["/was-file/inner"] == node("file", 0o644, data=b"i")
    assert got["/was-dir"] == node("file", 0o644, data=b"now a file")
    assert not any(p.startswith("/was-dir/") for p in got)
    assert got["/was-link"].type == "dir"
    assert got["/was-fifo"].type == "fifo"
    assert read(driver, "base", "was-dir/child") == b"c"


def test_directory_over_directory_merges(driver: lamina.Driver) -> None:
    apply(driver, "base", None, LOWER)
    apply(
        driver,
        "l",
        "base",
        [
            tb.directory("d", mode=0o711, uid=5, gid=6),
            tb.file("d/c", b"c"),
            tb.directory("d/sub", mode=0o700),
            tb.file("d/a", b"A", mode=0o600),
        ],
    )
    got = tree(driver, "l")
    assert {p for p in got if p.startswith("/d/")} == {
        "/d/a",
        "/d/b",
        "/d/c",
        "/d/sub",
        "/d/sub/deep",
    }
    assert got["/d"] == node("dir", 0o711, uid=5, gid=6)
    assert got["/d/sub"] == node("dir", 0o700)
    assert got["/d/a"] == node("file", 0o600, data=b"A")


def test_symlinked_parent_inside_layer_is_followed(driver: lamina.Driver) -> None:
    # merged /usr: lib -> usr/lib; a later layer writes lib/x, which lands in usr/lib.
    apply(
        driver,
        "base",
        None,
        [
            tb.directory("usr"),
            tb.directory("usr/lib"),
            tb.symlink("lib", "usr/lib"),
            tb.symlink("bin", "/usr/bin"),
            tb.directory("usr/bin"),
        ],
    )
    apply(driver, "l", "base", [tb.file("lib/x", b"x"), tb.file("bin/y", b"y")])
    assert kind(driver, "l", "lib") == "symlink"
    assert kind(driver, "l", "bin") == "symlink"
    assert read(driver, "l", "usr/lib/x") == b"x"
    assert read(driver, "l", "usr/bin/y") == b"y"


# --- names, formats, codecs ------------------------------------------------------------------

LONG_DIR = "/".join(f"directory-with-a-long-name-{i:02d}" for i in range(10))
LONG_FILE = f"{LONG_DIR}/{'f' * 200}"
LONG_TARGET = "../" * 3 + "t" * 150


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_names_and_link_targets(driver: lamina.Driver, fmt: int) -> None:
    entries = [
        tb.directory(LONG_DIR),
        tb.file(LONG_FILE, b"long"),
        tb.symlink("s" * 120, LONG_TARGET),
        tb.hardlink(f"{LONG_DIR}/{'h' * 180}", LONG_FILE),
    ]
    driver.apply_diff("l", None, io.BytesIO(tb.build(entries, format=fmt)))
    got = tree(driver, "l")
    assert got["/" + LONG_FILE].sha256 == node("file", 0o644, data=b"long").sha256
    assert got["/" + "s" * 120].link == LONG_TARGET
    assert frozenset({"/" + LONG_FILE, f"/{LONG_DIR}/{'h' * 180}"}) in links(driver, "l")


def test_raw_gnu_long_name_and_link_records(driver: lamina.Driver) -> None:
    name = "n" * 150
    target = "t" * 160
    data = b"".join(
        [
            tb.raw_gnu_long(name),
            tb.raw_member("short-name-ignored", b"content"),
            tb.raw_gnu_long(target, type=tarfile.GNUTYPE_LONGLINK),
            tb.raw_gnu_long("l" * 140),
            tb.raw_member("x", type=tarfile.SYMTYPE, linkname="short-target-ignored"),
            tb.END,
        ]
    )
    driver.apply_diff("l", None, io.BytesIO(data))
    assert names(driver, "l") == {"/" + name, "/" + "l" * 140}
    assert read(driver, "l", name) == b"content"
    assert tree(driver, "l")["/" + "l" * 140].link == target


def test_pax_global_header_is_ignored(driver: lamina.Driver) -> None:
    data = b"".join(
        [
            tb.raw_pax({"comment": "made by a test", "uid": "77"}, type=tarfile.XGLTYPE),
            tb.raw_member("a", b"a"),
            tb.END,
        ]
    )
    driver.apply_diff("l", None, io.BytesIO(data))
    got = tree(driver, "l")
    assert set(got) == {"/", "/a"}
    assert got["/a"].uid == 0


SPARSE_CHUNKS = [(0, b"head" * 256), (1 << 20, b"m" * 512), (3 << 20, b"tail!")]
SPARSE_SIZE = (3 << 20) + 4096
SPARSE: dict[str, Callable[..., bytes]] = {
    "gnu-S": tb.raw_gnu_sparse,
    "pax-1.0": tb.raw_pax_sparse_1_0,
    "pax-0.1": tb.raw_pax_sparse_0_1,
}


@pytest.mark.parametrize("build", SPARSE.values(), ids=SPARSE.keys())
def test_sparse_files_are_expanded(driver: lamina.Driver, build: Callable[..., bytes]) -> None:
    data = b"".join(
        [
            tb.raw_member("before", b"1"),
            build("dir/sparse", SPARSE_CHUNKS, SPARSE_SIZE),
            tb.raw_member("after", b"2"),
            tb.END,
        ]
    )
    driver.apply_diff("l", None, io.BytesIO(data))
    assert names(driver, "l") == {"/before", "/dir", "/dir/sparse", "/after"}
    assert read(driver, "l", "dir/sparse") == tb.expand_sparse(SPARSE_CHUNKS, SPARSE_SIZE)
    assert read(driver, "l", "after") == b"2"


def random_tree() -> list[tb.Entry]:
    rng = random.Random(42)
    entries: list[tb.Entry] = [tb.directory("data")]
    for i in range(40):
        size = rng.choice([0, 1, 511, 512, 513, 4096, 70_000, 300_000])
        entries.append(tb.file(f"data/f{i:02d}", rng.randbytes(size), mode=0o640, uid=i))
    entries += [tb.symlink("data/link", "f01"), tb.hardlink("data/hard", "data/f02")]
    return entries


CODECS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": tb.gzipped,
    "zstd": tb.zstd_compressed,
    "gzip-multi-member": lambda data: tb.gzipped(data, members=3),
    "zstd-multi-frame": lambda data: tb.zstd_compressed(data, frames=3),
}


@pytest.mark.parametrize("compress", CODECS.values(), ids=CODECS.keys())
def test_compressed_streams_are_sniffed(
    driver: lamina.Driver, compress: Callable[[bytes], bytes]
) -> None:
    plain = tb.build(random_tree())
    size = driver.apply_diff("plain", None, io.BytesIO(plain))
    assert driver.apply_diff("packed", None, io.BytesIO(compress(plain))) == size
    assert_same_tree(tree(driver, "packed"), tree(driver, "plain"))


def test_apply_reads_a_pipe_like_stream(driver: lamina.Driver) -> None:
    # A stream that gives a few bytes at a time and cannot seek, as a socket does.
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = memoryview(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
            n = min(len(buf), 1000, len(self.data))
            buf[:n] = self.data[:n]
            self.data = self.data[n:]
            return n

    plain = tb.build(random_tree())
    driver.apply_diff("plain", None, io.BytesIO(plain))
    driver.apply_diff("trickle", None, Trickle(tb.gzipped(plain)))  # type: ignore[arg-type]
    assert_same_tree(tree(driver, "trickle"), tree(driver, "plain"))


def test_empty_tar_makes_an_empty_layer(driver: lamina.Driver) -> None:
    assert driver.apply_diff("l", None, io.BytesIO(b"")) == 0
    assert driver.exists("l")
    assert names(driver, "l") == set()
    assert driver.apply_diff("m", "l", io.BytesIO(tb.END)) == 0
    assert names(driver, "m") == set()


def test_apply_into_base_layer_keeps_root_sane(driver: lamina.Driver) -> None:
    apply(driver, "l", None, [tb.directory(".", mode=0o750, uid=9, gid=9), tb.file("f", b"f")])
    with mounted(driver, "l") as root:
        st = os.lstat(root)
        assert stat.S_ISDIR(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 9, 9)


# --- order and odd headers --------------------------------------------------------------------


def test_later_entry_replaces_earlier(driver: lamina.Driver) -> None:
    apply(
        driver,
        "l",
        None,
        [
            tb.file("x", b"first"),
            tb.file("x", b"second", mode=0o600),
            tb.file("y", b"file"),
            tb.directory("y"),
            tb.file("y/inside", b"i"),
        ],
    )
    got = tree(driver, "l")
    assert got["/x"] == node("file", 0o600, data=b"second")
    assert got["/y"].type == "dir"


def test_rewritten_link_target_leaves_the_link_alone(driver: lamina.Driver) -> None:
    # Docker removes a path before it writes a new entry there: b keeps the old inode.
    apply(driver, "l", None, [tb.file("a", b"one"), tb.hardlink("b", "a"), tb.file("a", b"two")])
    assert read(driver, "l", "a") == b"two"
    assert read(driver, "l", "b") == b"one"


def test_directory_entry_after_its_children(driver: lamina.Driver) -> None:
    apply(
        driver,
        "l",
        None,
        [tb.file("d/f", b"f"), tb.directory("d", mode=0o700, uid=3, gid=4, mtime=M - 50)],
    )
    got = tree(driver, "l")
    assert got["/d"] == node("dir", 0o700, uid=3, gid=4)
    assert int(lstat(driver, "l", "d").st_mtime) == M - 50


def test_type_bits_in_mode_field_are_ignored(driver: lamina.Driver) -> None:
    # Some old tools write st_mode whole (S_IFREG | 0755) into the mode field.
    data = b"".join(
        [
            tb.raw_member("f", b"x", mode=0o100755),
            tb.raw_member("d", type=tarfile.DIRTYPE, mode=0o40700),
            tb.END,
        ]
    )
    driver.apply_diff("l", None, io.BytesIO(data))
    got = tree(driver, "l")
    assert got["/f"] == node("file", 0o755, data=b"x")
    assert got["/d"] == node("dir", 0o700)


def test_pax_owner_and_time_records(driver: lamina.Driver) -> None:
    apply(
        driver,
        "l",
        None,
        [
            tb.file("big-ids", b"x", uid=3_000_000, gid=4_000_000),
            tb.file("fraction", b"y", mtime=M + 0.75),
            tb.file("ancient", b"z", mtime=-86400),
        ],
    )
    got = tree(driver, "l")
    assert (got["/big-ids"].uid, got["/big-ids"].gid) == (3_000_000, 4_000_000)
    assert got["/fraction"].mtime == M
    assert got["/ancient"].mtime == -86400


# --- chains -----------------------------------------------------------------------------------


def test_chain_through_whiteouts_and_opaque_directories(driver: lamina.Driver) -> None:
    apply(driver, "base", None, LOWER)
    apply(driver, "l1", "base", [tb.whiteout("top"), tb.opaque("d"), tb.file("d/l1", b"1")])
    apply(driver, "l2", "l1", [tb.file("top", b"back"), tb.file("d/l2", b"2")])
    assert "/top" not in names(driver, "l1")
    assert read(driver, "l2", "top") == b"back"
    assert {p for p in names(driver, "l2") if p.startswith("/d/")} == {"/d/l1", "/d/l2"}
    assert driver.changes("l2") == sorted(
        [
            lamina.Change("/d", lamina.ChangeKind.MODIFY),
            lamina.Change("/d/l2", lamina.ChangeKind.ADD),
            lamina.Change("/top", lamina.ChangeKind.ADD),
        ]
    )


@pytest.mark.parametrize("with_child", [True, False], ids=["with-child", "alone"])
def test_opaque_marker_without_directory_entry(driver: lamina.Driver, with_child: bool) -> None:
    apply(driver, "base", None, LOWER)
    entries = [tb.opaque("d")] + ([tb.file("d/new", b"n")] if with_child else [])
    apply(driver, "l", "base", entries)
    inside = {p for p in names(driver, "l") if p.startswith("/d/")}
    assert inside == ({"/d/new"} if with_child else set())
    assert kind(driver, "l", "d") == "dir"


def test_hard_links_of_parent_stay_links_in_children(driver: lamina.Driver) -> None:
    apply(driver, "base", None, [tb.file("a", b"shared"), tb.hardlink("b", "a")])
    driver.create("snap", "base")
    driver.create_rw("ctr", "snap")
    for id in ("base", "snap", "ctr"):
        assert links(driver, id) == {frozenset({"/a", "/b"})}, id


def test_character_device_zero_zero(driver: lamina.Driver) -> None:
    # overlayfs reads a 0/0 character device as a whiteout; the union must not differ
    # between backends, so such an entry is kept as a device or refused, never lost.
    apply(driver, "base", None, [tb.file("other", b"o")])
    try:
        apply(driver, "l", "base", [tb.chardev("zero-zero", 0, 0)])
    except errors.LaminaError:
        assert not driver.exists("l")
        return
    got = tree(driver, "l")
    assert got["/zero-zero"].type == "char"
    assert got["/zero-zero"].rdev == (0, 0)

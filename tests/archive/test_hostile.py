"""Hostile and malformed layer tars (contract §2, "Safety").

Each tar here tries to reach outside the layer being written: through ``..``, absolute
names, symlinks (in the tar or in a lower layer), hard links, whiteouts or a root entry
that is not a directory; or it is malformed.  Whatever lamina does with it, refuse it
(``UnsafeArchive``, and then no layer is left) or clamp it inside the layer, the
:class:`Guard` checks that nothing outside the home changed: a sentinel directory beside
the home is compared byte for byte, inode for inode, and ``tmp_path`` may not gain
anything.  The lower layer may not change either.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lamina
from lamina import errors
from tests import tarbuild as tb
from tests.layers import apply, kind, mounted, names, read, tree
from tests.snapshot import assert_same_tree

pytestmark = pytest.mark.root
EACH_FORMAT = True  # with overlay+dir too (tests/conftest.py)

DEEP = "../" * 40
"""Enough ``..`` to climb from any layer directory to ``/``."""


def fingerprint(root: Path, *, skip: Path) -> dict[str, tuple[object, ...]]:
    """Everything ``lstat`` and ``listxattr`` say about ``root`` and each path under it
    (but ``skip`` and what is below it).

    ctime is in it: a chmod, chown, link or xattr change that was undone still shows.
    """
    out = {".": _facts(str(root))}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = _facts(path)
    return out


def _facts(path: str) -> tuple[object, ...]:
    st = os.lstat(path)
    digest = link = None
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        link = os.readlink(path)
    xattrs = {
        key: os.getxattr(path, key, follow_symlinks=False)
        for key in os.listxattr(path, follow_symlinks=False)
    }
    return (
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_nlink,
        st.st_ino,
        st.st_mtime_ns,
        st.st_ctime_ns,
        digest,
        link,
        xattrs,
    )


class Guard:
    """Remembers everything outside the home, and the lower layer, to check them after."""

    def __init__(self, drv: lamina.Driver, tmp_path: Path, outside: Path, lower: str) -> None:
        self.drv = drv
        self.tmp_path = tmp_path
        self.outside = outside
        self.lower = lower
        self.canary = f"lamina-hostile-{uuid.uuid4().hex}"
        self.before = fingerprint(tmp_path, skip=drv.home)
        self.lower_before = tree(drv, lower)

    def check(self) -> None:
        after = fingerprint(self.tmp_path, skip=self.drv.home)
        changed = sorted(
            path
            for path in set(self.before) | set(after)
            if self.before.get(path) != after.get(path)
        )
        assert not changed, f"changed outside the home: {changed}"
        assert not os.path.lexists(f"/{self.canary}"), f"/{self.canary} was written"
        assert_same_tree(tree(self.drv, self.lower), self.lower_before)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A sentinel directory beside the home: a file, a directory, a file with an xattr."""
    path = tmp_path / "outside"
    (path / "dir").mkdir(parents=True)
    (path / "file").write_bytes(b"sentinel")
    os.chmod(path / "file", 0o640)
    (path / "dir/inner").write_bytes(b"inner")
    os.chmod(path / "dir", 0o750)
    (path / "capped").write_bytes(b"capped")
    os.setxattr(path / "capped", "user.lamina-test", b"keep")
    return path


BASE = [
    tb.directory("usr"),
    tb.directory("usr/lib"),
    tb.file("usr/lib/libc.so", b"libc"),
    tb.directory("etc"),
    tb.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
]


@pytest.fixture
def guard(driver: lamina.Driver, tmp_path: Path, outside: Path) -> Iterator[Guard]:
    """A base layer ``base``, then a :class:`Guard`; checked again after the test."""
    apply(driver, "base", None, BASE)
    g = Guard(driver, tmp_path, outside, "base")
    yield g
    g.check()


def attempt(
    drv: lamina.Driver,
    guard: Guard,
    data: bytes,
    *,
    id: str = "l",
    parent: str = "base",
    unsafe: bool = False,
    expect: str | None = None,
) -> bool:
    """Apply ``data``; True if it was applied, False if refused (and then nothing is left).

    A refusal must be a ``LaminaError`` (an ``UnsafeArchive`` when ``unsafe``); ``expect``
    (``"applied"`` or ``"refused"``) says which outcome the contract requires, if only one.
    """
    existed = drv.exists(id)
    before = tree(drv, id) if existed else None
    try:
        drv.apply_diff(id, parent, io.BytesIO(data))
    except errors.LaminaError as e:
        if unsafe:
            assert isinstance(e, errors.UnsafeArchive), f"{type(e).__name__}: {e}"
        if existed:
            assert before is not None
            assert_same_tree(tree(drv, id), before)
        else:
            assert not drv.exists(id), "a refused apply left its layer"
            assert id not in set(drv.layers())
        guard.check()
        assert expect != "applied", f"refused: {type(e).__name__}: {e}"
        return False
    guard.check()
    assert expect != "refused", "a tar that must be refused was applied"
    return True


def entries(*items: tb.Entry) -> bytes:
    return tb.build(items)


def check_landed(drv: lamina.Driver, id: str, path: str, data: bytes) -> None:
    """``path`` (inside the layer) holds ``data``: the name was clamped inside."""
    assert read(drv, id, path) == data


# --- names that climb -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/../../x", "./../x", "a/b/../../../x", DEEP + "x"])
def test_dot_dot_names(driver: lamina.Driver, guard: Guard, name: str) -> None:
    if attempt(driver, guard, entries(tb.file(name, b"climbed")), unsafe=True):
        check_landed(driver, "l", "x", b"climbed")


def test_dot_dot_to_the_sentinel(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    target = DEEP + str(outside / "file").lstrip("/")
    data = entries(tb.file(target, b"overwritten"), tb.file(DEEP + guard.canary, b"x"))
    if attempt(driver, guard, data, unsafe=True):
        check_landed(driver, "l", str(outside / "file"), b"overwritten")


def test_absolute_names_land_inside(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    # Docker makes absolute names relative: /x is the layer's x.
    data = entries(
        tb.file(f"/{guard.canary}", b"abs"),
        tb.file(str(outside / "file"), b"overwritten"),
        tb.directory("/abs-dir"),
        tb.file("/abs-dir/f", b"f"),
    )
    if attempt(driver, guard, data, unsafe=True):
        check_landed(driver, "l", guard.canary, b"abs")
        check_landed(driver, "l", str(outside / "file"), b"overwritten")
        check_landed(driver, "l", "abs-dir/f", b"f")


# --- symlinks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/", "../../..", DEEP, "./../."])
def test_write_through_symlink_to_root(driver: lamina.Driver, guard: Guard, target: str) -> None:
    data = entries(tb.symlink("evil", target), tb.file(f"evil/{guard.canary}", b"x"))
    if attempt(driver, guard, data):
        check_landed(driver, "l", guard.canary, b"x")  # chroot-style: / is the layer's root
        assert kind(driver, "l", "evil") == "symlink"


@pytest.mark.parametrize("style", ["absolute", "relative"])
def test_write_through_symlink_to_outside(
    driver: lamina.Driver, guard: Guard, outside: Path, style: str
) -> None:
    target = str(outside) if style == "absolute" else DEEP + str(outside).lstrip("/")
    data = entries(
        tb.symlink("evil", target),
        tb.file("evil/new", b"new"),
        tb.file("evil/file", b"overwritten"),
        tb.directory("evil/newdir"),
        tb.symlink("evil/newlink", "/etc/shadow"),
        tb.fifo("evil/newfifo"),
    )
    attempt(driver, guard, data)


def test_write_through_symlink_from_lower_layer(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    apply(driver, "mid", "base", [tb.symlink("evil", str(outside)), tb.symlink("up", DEEP)])
    data = entries(
        tb.file("evil/file", b"overwritten"),
        tb.file("evil/new", b"new"),
        tb.file(f"up/{guard.canary}", b"x"),
        tb.file("up" + str(outside / "new2"), b"x"),
    )
    attempt(driver, guard, data, parent="mid")


def test_nested_symlinks_climbing(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    data = entries(
        tb.directory("a/b/c"),
        tb.symlink("a/b/c/l1", "../../.."),
        tb.symlink("a/b/l2", "c/l1/../.."),
        tb.symlink("l3", "a/b/l2/../../../.."),
        tb.file(f"l3/{guard.canary}", b"x"),
        tb.file("l3" + str(outside / "new"), b"x"),
    )
    if attempt(driver, guard, data):
        check_landed(driver, "l", guard.canary, b"x")


def test_symlink_loop_is_a_lamina_error(driver: lamina.Driver, guard: Guard) -> None:
    data = entries(tb.symlink("loop1", "loop2"), tb.symlink("loop2", "loop1"), tb.file("loop1/x"))
    attempt(driver, guard, data)  # refused with a LaminaError (not an OSError), or clamped


def test_file_entry_replaces_symlink_not_its_target(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    apply(driver, "mid", "base", [tb.symlink("lower-link", str(outside / "file"))])
    data = entries(
        tb.symlink("link", str(outside / "file")),
        tb.file("link", b"overwritten", mode=0o777),
        tb.file("lower-link", b"overwritten", mode=0o777),
    )
    if attempt(driver, guard, data, parent="mid"):
        for name in ("link", "lower-link"):
            assert kind(driver, "l", name) == "file"
            check_landed(driver, "l", name, b"overwritten")


def test_metadata_of_symlink_is_not_applied_to_its_target(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    data = entries(
        tb.symlink(
            "s",
            str(outside / "file"),
            uid=1234,
            gid=1234,
            mtime=1,
            xattrs={"user.evil": b"1", "security.capability": tb.CAP_NET_RAW},
        ),
        tb.symlink("d", str(outside / "dir"), uid=1234, mtime=1),
        tb.symlink("c", str(outside / "capped"), xattrs={"user.lamina-test": b"changed"}),
    )
    attempt(driver, guard, data)


def test_directory_replaced_by_symlink_between_entries(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    for i, target in enumerate([str(outside), DEEP + str(outside).lstrip("/")]):
        data = entries(
            tb.directory("d"),
            tb.file("d/a", b"a"),
            tb.symlink("d", target),
            tb.file("d/b", b"b"),
            tb.file("d/file", b"overwritten"),
        )
        attempt(driver, guard, data, id=f"l{i}")


def test_directory_entry_over_symlink_to_outside(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    apply(driver, "mid", "base", [tb.symlink("lower-dir", str(outside / "dir"))])
    data = entries(
        tb.symlink("sdir", str(outside / "dir")),
        tb.directory("sdir", mode=0o777, uid=1234),
        tb.file("sdir/inner", b"overwritten"),
        tb.directory("lower-dir", mode=0o777, uid=1234),
        tb.file("lower-dir/inner", b"overwritten"),
    )
    if attempt(driver, guard, data, parent="mid"):
        assert kind(driver, "l", "sdir") == "dir"
        check_landed(driver, "l", "sdir/inner", b"overwritten")


def test_every_kind_of_entry_through_a_symlink(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    data = entries(
        tb.file("x", b"x"),
        tb.symlink("evil", str(outside)),
        tb.hardlink("evil/stolen", "x"),
        tb.chardev("evil/null", 1, 3),
        tb.blockdev("evil/disk", 7, 0),
        tb.fifo("evil/fifo"),
        tb.symlink("evil/link", "/"),
        tb.directory("evil/dir", mode=0o777),
        tb.file("evil/dir/inner", b"overwritten"),
    )
    attempt(driver, guard, data)


def test_name_component_too_long_is_a_lamina_error(driver: lamina.Driver, guard: Guard) -> None:
    attempt(driver, guard, entries(tb.file("n" * 300, b"x")), expect="refused")


def test_path_longer_than_path_max(driver: lamina.Driver, guard: Guard) -> None:
    deep = "abcdefgh/" * 600  # 5400 characters: past PATH_MAX, each name well under NAME_MAX
    attempt(driver, guard, entries(tb.file(deep + "f", b"deep"), tb.file("after", b"a")))


# --- hard links -------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["dot-dot", "deep", "absolute", "via-symlink"])
def test_hardlink_to_outside(
    driver: lamina.Driver, guard: Guard, outside: Path, style: str
) -> None:
    target = {
        "dot-dot": "../outside/file",
        "deep": DEEP + str(outside / "file").lstrip("/"),
        "absolute": str(outside / "file"),
        "via-symlink": "evil/file",
    }[style]
    data = entries(
        tb.symlink("evil", str(outside)),
        tb.hardlink("stolen", target, mode=0o777),
        tb.file("stolen", b"overwritten through the link", mode=0o777),
    )
    if attempt(driver, guard, data):
        assert read(driver, "l", "stolen") == b"overwritten through the link"


def test_hardlink_to_symlink_then_chmod(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    # CVE-2021-32760: a hard link to a symlink, then an entry that chmods the link's name;
    # the symlink's target outside must keep its mode.
    data = entries(
        tb.symlink("link", str(outside / "file")),
        tb.hardlink("hl", "link", mode=0o777),
        tb.symlink("dlink", str(outside / "dir")),
        tb.hardlink("dhl", "dlink", mode=0o777),
        tb.directory("dhl", mode=0o777),
        tb.hardlink("hl2", "link", mode=0o4777, uid=1234),
    )
    attempt(driver, guard, data)


def test_hardlink_to_lower_symlink_then_chmod(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    apply(driver, "mid", "base", [tb.symlink("link", str(outside / "file"))])
    data = entries(tb.hardlink("hl", "link", mode=0o777, uid=1234))
    attempt(driver, guard, data, parent="mid")


def test_hardlink_to_directory_is_a_lamina_error(driver: lamina.Driver, guard: Guard) -> None:
    data = entries(tb.directory("d"), tb.hardlink("x", "d"))
    attempt(driver, guard, data, expect="refused")


def test_hardlink_to_missing_target_is_a_lamina_error(driver: lamina.Driver, guard: Guard) -> None:
    attempt(driver, guard, entries(tb.hardlink("x", "no/such/file")), expect="refused")


# --- whiteouts --------------------------------------------------------------------------------


def test_whiteout_through_symlink(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    data = entries(
        tb.symlink("evil", str(outside)),
        tb.whiteout("evil/file"),
        tb.whiteout("evil/dir"),
        tb.opaque("evil"),
    )
    attempt(driver, guard, data)


def test_whiteout_through_lower_symlink(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    apply(
        driver,
        "mid",
        "base",
        [tb.symlink("evil", str(outside)), tb.symlink("up", DEEP + str(outside).lstrip("/"))],
    )
    data = entries(
        tb.whiteout("evil/file"),
        tb.opaque("evil/dir"),
        tb.whiteout("up/file"),
        tb.opaque("up"),
        tb.whiteout(DEEP + str(outside / "file").lstrip("/")),
    )
    attempt(driver, guard, data, parent="mid")


def test_whiteout_climbing(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    data = entries(tb.whiteout("../outside/file"), tb.opaque("../outside"))
    attempt(driver, guard, data, unsafe=True)


# --- the root entry ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "root",
    [
        lambda o: tb.symlink(".", str(o)),
        lambda o: tb.symlink("./", DEEP + str(o).lstrip("/")),
        lambda o: tb.symlink("/", str(o)),
        lambda o: tb.file(".", b"root is a file"),
        lambda o: tb.fifo("."),
        lambda o: tb.hardlink(".", str(o / "file")),
    ],
    ids=["symlink", "symlink-relative", "symlink-slash", "file", "fifo", "hardlink"],
)
def test_root_entry_that_is_not_a_directory(
    driver: lamina.Driver, guard: Guard, outside: Path, root: Callable[[Path], tb.Entry]
) -> None:
    # CVE-2021-29136 (umoci): a root that is not a directory, then files through it.
    data = entries(root(outside), tb.file("file", b"overwritten"), tb.file("x", b"x"))
    if attempt(driver, guard, data):
        with mounted(driver, "l") as top:
            assert stat.S_ISDIR(os.lstat(top).st_mode)
        check_landed(driver, "l", "x", b"x")


# --- chroot-style resolution that stays inside ------------------------------------------------


@pytest.mark.parametrize("target", ["usr/lib", "/usr/lib", "./usr/../usr/lib", "../../../usr/lib"])
def test_parent_symlink_inside_is_followed(
    driver: lamina.Driver, guard: Guard, target: str
) -> None:
    # merged /usr: lib -> usr/lib; the upper layer's lib/x lands in usr/lib, lib stays a link.
    apply(driver, "mid", "base", [tb.symlink("lib", target)])
    attempt(driver, guard, entries(tb.file("lib/x", b"x")), parent="mid", expect="applied")
    assert kind(driver, "l", "lib") == "symlink"
    assert read(driver, "l", "usr/lib/x") == b"x"
    assert read(driver, "l", "usr/lib/libc.so") == b"libc"
    assert "/lib/x" not in names(driver, "mid")


def test_parent_symlink_in_same_tar_is_followed(driver: lamina.Driver, guard: Guard) -> None:
    data = entries(
        tb.directory("opt/real"),
        tb.symlink("opt/alias", "/opt/real"),
        tb.file("opt/alias/f", b"f"),
    )
    attempt(driver, guard, data, expect="applied")
    assert read(driver, "l", "opt/real/f") == b"f"
    assert kind(driver, "l", "opt/alias") == "symlink"


# --- malformed streams ------------------------------------------------------------------------

GOOD = tb.raw_member("good", b"good data") + tb.raw_member("dir/", type=tarfile.DIRTYPE)
BIG = tb.raw_member("big", b"x" * 5000)


def _bad_octal() -> bytes:
    header = bytearray(tb.raw_header("bad", size=10))
    header[124:136] = b"12345678xyz\0"
    header[148:156] = b"%06o\0 " % tb.checksum(bytes(header))
    return bytes(header) + tb.pad(b"0123456789")


MALFORMED = {
    "garbage": b"this is not a tar archive, nor gzip, nor zstd\n" * 40,
    "truncated-in-data": (GOOD + BIG)[: len(GOOD) + 512 + 2000],
    "truncated-in-header": (GOOD + BIG)[: len(GOOD) + 300],
    "bad-checksum-first": tb.raw_member("a", b"1", chksum=1234) + tb.END,
    "bad-checksum-later": GOOD + tb.raw_member("b", b"2", chksum=1234) + BIG + tb.END,
    "size-beyond-stream": GOOD + tb.raw_header("huge", size=10_000_000) + b"x" * 1024,
    "bad-octal-size": GOOD + _bad_octal() + tb.END,
    "nul-in-pax-path": GOOD + tb.raw_pax({"path": b"a\0b"}) + tb.raw_member("x", b"1") + tb.END,
    "pax-size-beyond-stream": GOOD + tb.raw_pax({"size": "99999999"}) + tb.raw_member("x", b"1"),
    "pax-bad-record-length": GOOD
    + tb.raw_member("PaxHeaders/x", b"999 path=x\n", type=tarfile.XHDTYPE)
    + tb.raw_member("x", b"1")
    + tb.END,
    "gnu-longname-beyond-stream": GOOD + tb.raw_header("././@LongLink", size=100_000, type=b"L"),
    "truncated-gzip": tb.gzipped(GOOD + BIG + tb.END)[:-30],
    "truncated-zstd": tb.zstd_compressed(GOOD + BIG + tb.END)[:-30],
    "corrupt-gzip-crc": (lambda z: z[:-8] + bytes([z[-8] ^ 0xFF]) + z[-7:])(
        tb.gzipped(GOOD + BIG + tb.END)
    ),
    "truncated-in-padding": GOOD[:700],
    # Values no system call takes (uid_t, time_t): refused, not an OverflowError.
    "uid-past-32-bits": GOOD + tb.build([tb.file("x", b"1", pax={"uid": str(1 << 32)})]),
    "gid-past-64-bits": GOOD + tb.build([tb.file("x", b"1", pax={"gid": str(1 << 64)})]),
    "mtime-past-time_t": GOOD + tb.build([tb.file("x", b"1", pax={"mtime": "1" + "0" * 30})]),
    "atime-before-time_t": GOOD + tb.build([tb.file("x", b"1", pax={"atime": "-" + "9" * 30})]),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_is_unsafe(driver: lamina.Driver, guard: Guard, data: bytes) -> None:
    attempt(driver, guard, data, unsafe=True, expect="refused")


def test_refused_apply_into_existing_layer_leaves_it_as_it_was(
    driver: lamina.Driver, guard: Guard
) -> None:
    apply(driver, "pre", "base", [tb.file("pre-file", b"pre")])
    before = tree(driver, "pre")
    data = GOOD + tb.raw_member("b", b"2", chksum=1234) + tb.END
    attempt(driver, guard, data, id="pre", unsafe=True, expect="refused")
    assert driver.exists("pre")
    assert_same_tree(tree(driver, "pre"), before)


@pytest.mark.parametrize("data", [b"", tb.END, tb.END * 4], ids=["empty", "end", "end-x4"])
def test_empty_tar_is_an_empty_layer(driver: lamina.Driver, guard: Guard, data: bytes) -> None:
    attempt(driver, guard, data, expect="applied")
    assert names(driver, "l") == names(driver, "base")

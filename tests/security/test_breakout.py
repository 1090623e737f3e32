"""The breakout suite: layer tars that try to reach outside the layer being written.

Each test names the CVE or the upstream test it covers: moby's ``pkg/archive`` tests
(``TestUntarInvalidFilenames``, ``TestUntarInvalidHardlink``, ``TestUntarInvalidSymlink``),
containerd's ``archive.TestBreakouts`` cases, umoci's CVE-2021-29136.  Every test runs on
every backend, in lamina's isolated child and inline (``LAMINA_NOREEXEC=1``), and the
:class:`~tests.archive.test_hostile.Guard` checks that nothing outside the home changed
(byte for byte, inode for inode, ctime included), that the lower layer did not change,
and that no canary appeared at ``/``.  A tar may be refused (``UnsafeArchive`` or another
``LaminaError``, and then no layer is left) or clamped inside the layer, as Docker's
chrooted extraction clamps it; where the contract says which, the test says so too.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

import lamina
from tests import tarbuild as tb
from tests.archive.test_hostile import DEEP, Guard, attempt, check_landed, entries
from tests.layers import apply, kind, mounted, read

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("isolation")]


def rel_outside(outside: Path, *more: str) -> str:
    """``outside`` (and ``more`` below it) as a name that climbs to it from any layer."""
    return DEEP + str(outside.joinpath(*more)).lstrip("/")


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "style", ["dotdot", "slash-dotdot", "deep", "deep-absolute", "dot-dotdot", "inner-dotdot"]
)
def test_dot_dot_and_absolute_names(
    driver: lamina.Driver, guard: Guard, outside: Path, style: str
) -> None:
    """moby TestUntarInvalidFilenames (``../victim/dotdot``, ``/../victim/slash-dotdot``),
    CVE-2014-6407: names that climb are refused; absolute names land inside."""
    name = {
        "dotdot": "../outside/file",
        "slash-dotdot": "/../outside/file",
        "deep": rel_outside(outside, "file"),
        "deep-absolute": "/" + rel_outside(outside, "file"),
        "dot-dotdot": "./../outside/file",
        "inner-dotdot": "a/b/../../../outside/file",
    }[style]
    data = entries(tb.file(name, b"overwritten"), tb.file(f"{DEEP}{guard.canary}", b"x"))
    attempt(driver, guard, data, unsafe=True)


def test_absolute_names_land_inside(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    """CVE-2014-6407 (absolute names), as Docker does it: ``/x`` is the layer's ``x``."""
    data = entries(
        tb.file(f"/{guard.canary}", b"abs"),
        tb.file(str(outside / "file"), b"overwritten"),
        tb.directory(str(outside / "dir"), mode=0o777),
        tb.file(str(outside / "dir/inner"), b"overwritten"),
    )
    attempt(driver, guard, data, expect="applied")
    check_landed(driver, "l", guard.canary, b"abs")
    check_landed(driver, "l", str(outside / "file"), b"overwritten")
    check_landed(driver, "l", str(outside / "dir/inner"), b"overwritten")


# --- symlinks in the tar ----------------------------------------------------------------------


@pytest.mark.parametrize("style", ["absolute", "relative", "slash-dotdot", "to-root"])
def test_symlink_then_write_through_it(
    driver: lamina.Driver, guard: Guard, outside: Path, style: str
) -> None:
    """moby TestUntarInvalidSymlink (``loophole-victim`` then ``loophole-victim/file``),
    containerd SymlinkAbsolute; CVE-2014-6407, CVE-2014-9356 (absolute symlink targets).

    Every kind of entry is written through the link; a target that stays inside when
    resolved as a chroot would (``/``) is followed, inside the layer."""
    target = {
        "absolute": str(outside),
        "relative": rel_outside(outside),
        "slash-dotdot": "/.." + str(outside),
        "to-root": "/",
    }[style]
    prefix = "" if style == "to-root" else str(outside).lstrip("/") + "/"
    data = entries(
        tb.file("x", b"x"),
        tb.symlink("evil", target),
        tb.file("evil/file", b"overwritten", mode=0o777),
        tb.file("evil/new", b"new"),
        tb.directory("evil/dir", mode=0o777, uid=1234),
        tb.file("evil/dir/inner", b"overwritten"),
        tb.symlink("evil/newlink", "/etc/shadow"),
        tb.hardlink("evil/stolen", "x"),
        tb.fifo("evil/fifo"),
        tb.chardev("evil/null", 1, 3),
        tb.file(f"evil/{guard.canary}", b"x"),
    )
    if attempt(driver, guard, data):
        assert kind(driver, "l", "evil") == "symlink"
        check_landed(driver, "l", prefix + "file", b"overwritten")


def test_nested_symlinks_to_dot_dot(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    """containerd SymlinkUpAndOut, SymlinkMultipleRelative, HardlinkRelative,
    HardlinkDownAndOut: chains of symlinks to ``../../`` climb no higher than the root."""
    data = entries(
        tb.directory("a/b/c"),
        tb.symlink("a/b/c/l1", "../../.."),
        tb.symlink("a/b/l2", "c/l1/../.."),
        tb.symlink("l3", "a/b/l2/../../../.."),
        tb.directory("dummy"),
        tb.symlink("up", "/dummy/../../.."),
        tb.symlink("dummy/l4", "../up/" + DEEP),
        tb.file(f"l3/{guard.canary}", b"x"),
        tb.file("l3" + str(outside / "file"), b"overwritten"),
        tb.file("dummy/l4" + str(outside / "new"), b"new"),
        tb.hardlink("hl", "l3" + str(outside / "file")),
    )
    if attempt(driver, guard, data):
        check_landed(driver, "l", guard.canary, b"x")
        check_landed(driver, "l", str(outside / "file"), b"overwritten")


def test_symlink_loop(driver: lamina.Driver, guard: Guard) -> None:
    """A loop of symlinks in a parent position is a LaminaError, not an OSError or a hang."""
    data = entries(tb.symlink("loop1", "loop2/x"), tb.symlink("loop2", "loop1/y"),
                   tb.file("loop1/z", b"z"))
    attempt(driver, guard, data, expect="refused")


# --- hard links ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "style", ["dotdot", "deep", "absolute", "via-symlink", "via-relative-symlink", "dir-link"]
)
def test_hardlink_out(driver: lamina.Driver, guard: Guard, outside: Path, style: str) -> None:
    """moby TestUntarInvalidHardlink (``loophole-victim`` → ``../victim``), CVE-2014-6407;
    containerd HardlinkDirectRelative, HardlinkDirectAbsolute, HardlinkRelativeLong,
    HardlinkAbsolute: a link never reaches a file outside, and writing or chmod-ing the
    link's name afterwards changes nothing outside."""
    target = {
        "dotdot": "../outside/file",
        "deep": rel_outside(outside, "file"),
        "absolute": str(outside / "file"),
        "via-symlink": "evil/file",
        "via-relative-symlink": "revil/file",
        "dir-link": str(outside / "dir"),
    }[style]
    data = entries(
        tb.symlink("evil", str(outside)),
        tb.symlink("revil", rel_outside(outside)),
        tb.hardlink("stolen", target, mode=0o4777, uid=1234),
        tb.file("stolen", b"overwritten through the link", mode=0o777),
        tb.hardlink("stolen2", target),
        tb.directory("stolen2", mode=0o777),
    )
    if attempt(driver, guard, data):
        assert read(driver, "l", "stolen") == b"overwritten through the link"


def test_hardlink_to_symlink_then_chmod(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    """CVE-2021-32760 (containerd HardlinkSymlinkChmod): a hard link to a symlink that points
    outside, then entries that chmod and chown the link's names; the target keeps its mode,
    owner and ctime."""
    data = entries(
        tb.symlink("link", str(outside / "file")),
        tb.hardlink("hl", "link", mode=0o777, uid=1234),
        tb.hardlink("hl2", "link", mode=0o4777, uid=1234, gid=1234),
        tb.symlink("dlink", rel_outside(outside, "dir")),
        tb.hardlink("dhl", "dlink", mode=0o777),
        tb.directory("dhl", mode=0o777),
        tb.file("hl2", b"replaced", mode=0o777),
    )
    attempt(driver, guard, data)
    assert stat.S_IMODE(os.lstat(outside / "file").st_mode) == 0o640


def test_hardlink_to_lower_symlink_then_chmod(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    """CVE-2021-32760 through a lower layer: the symlink comes from the parent (overlay
    copies it up to link it), the chmod from this tar."""
    apply(driver, "mid", "base", [tb.symlink("link", str(outside / "file"))])
    data = entries(tb.hardlink("hl", "link", mode=0o777, uid=1234),
                   tb.hardlink("link", "link", mode=0o4777))
    attempt(driver, guard, data, parent="mid")


# --- whiteouts ---------------------------------------------------------------------------------


def test_whiteout_through_symlink(driver: lamina.Driver, guard: Guard, outside: Path) -> None:
    """containerd WhiteoutSymlinkPath, WhiteoutDeadSymlinkParent, WhiteoutRelativePath:
    a whiteout or opaque marker below a symlink never deletes what the symlink points to."""
    data = entries(
        tb.symlink("evil", str(outside)),
        tb.symlink("revil", rel_outside(outside)),
        tb.symlink("dead", "/does/not/exist"),
        tb.whiteout("evil/file"),
        tb.whiteout("revil/capped"),
        tb.whiteout("evil/dir"),
        tb.opaque("evil"),
        tb.opaque("revil/dir"),
        tb.whiteout("dead/etc"),
    )
    attempt(driver, guard, data)


@pytest.mark.parametrize("name", [".wh..", ".wh...", "etc/.wh..", "etc/.wh...", ".wh."])
def test_whiteout_of_dot_or_dot_dot(driver: lamina.Driver, guard: Guard, name: str) -> None:
    """containerd WhiteoutRoot, WhiteoutRootParent, WhiteoutCurrentDirectory,
    WhiteoutParent: refused, nothing wiped."""
    attempt(driver, guard, entries(tb.file(name)), unsafe=True, expect="refused")


# --- the root entry ---------------------------------------------------------------------------


ROOTS: dict[str, Callable[[Path], tb.Entry]] = {
    "symlink-dot": lambda o: tb.symlink(".", str(o)),
    "symlink-dot-slash": lambda o: tb.symlink("./", rel_outside(o)),
    "symlink-slash": lambda o: tb.symlink("/", str(o)),
    "symlink-empty": lambda o: tb.symlink("", str(o)),
    "symlink-dotdot": lambda o: tb.symlink("..", str(o)),
    "file": lambda o: tb.file(".", b"root is a file"),
    "fifo": lambda o: tb.fifo("."),
    "hardlink": lambda o: tb.hardlink(".", str(o / "file")),
    "device": lambda o: tb.chardev(".", 1, 3),
}


@pytest.mark.parametrize("root", ROOTS.values(), ids=ROOTS.keys())
def test_root_entry_that_is_not_a_directory(
    driver: lamina.Driver, guard: Guard, outside: Path, root: Callable[[Path], tb.Entry]
) -> None:
    """CVE-2021-29136 (umoci): a root entry that is a symlink (or any non-directory), then
    files through it; containerd SymlinkParentDirectory, SymlinkEmptyFilename."""
    data = entries(root(outside), tb.file("file", b"overwritten"), tb.file("x", b"x"),
                   tb.directory("dir", mode=0o777))
    if attempt(driver, guard, data):
        with mounted(driver, "l") as top:
            assert stat.S_ISDIR(os.lstat(top).st_mode)
        check_landed(driver, "l", "x", b"x")


# --- symlinks in lower layers ------------------------------------------------------------------


def test_lower_layer_symlinks_pointing_out(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    """containerd DirectoryOverrideSymlink, SymlinkOverrideDirectory: the parent chain has
    symlinks that point outside (absolute and relative, one layer down and two); every kind
    of entry written below them, hard links through them and whiteouts below them stay
    in the layer."""
    apply(driver, "mid", "base", [tb.symlink("evil", str(outside)),
                                  tb.symlink("up", DEEP), tb.directory("sub")])
    apply(driver, "top", "mid", [tb.symlink("sub/revil", rel_outside(outside))])
    data = entries(
        tb.file("evil/file", b"overwritten"),
        tb.file("sub/revil/new", b"new"),
        tb.directory("evil/dir", mode=0o777, uid=1234),
        tb.file("evil/dir/inner", b"overwritten"),
        tb.fifo("sub/revil/fifo"),
        tb.symlink("evil/newlink", "/"),
        tb.file(f"up/{guard.canary}", b"x"),
        tb.file("up" + str(outside / "new2"), b"x"),
        tb.hardlink("stolen", "evil/file"),
        tb.whiteout("evil/capped"),
        tb.opaque("sub/revil/dir"),
        tb.hardlink("stolen2", "sub/revil/capped"),  # not in the layer: refused
    )
    attempt(driver, guard, data, parent="top")


def test_directory_entry_over_lower_symlink(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    """containerd DirectoryOverrideSymlink: a directory entry named like a lower symlink
    replaces the symlink in this layer; its metadata and children never reach the target."""
    apply(driver, "mid", "base", [tb.symlink("localetc", str(outside / "dir"))])
    data = entries(
        tb.directory("localetc", mode=0o777, uid=1234),
        tb.file("localetc/inner", b"overwritten"),
    )
    attempt(driver, guard, data, parent="mid", expect="applied")
    assert kind(driver, "l", "localetc") == "dir"
    check_landed(driver, "l", "localetc/inner", b"overwritten")


# --- a directory swapped for a symlink ----------------------------------------------------------


@pytest.mark.parametrize("style", ["absolute", "relative"])
def test_directory_swapped_for_symlink_between_entries(
    driver: lamina.Driver, guard: Guard, outside: Path, style: str
) -> None:
    """CVE-2018-15664's symlink exchange, inside one tar (containerd
    SymlinkOverrideDirectory): a directory is written into, then replaced by a symlink to
    outside, then written into again; nothing resolved for the directory may be reused
    for the symlink."""
    target = str(outside) if style == "absolute" else rel_outside(outside)
    data = entries(
        tb.directory("d"),
        tb.directory("d/sub"),
        tb.file("d/a", b"a"),
        tb.file("d/sub/a", b"a"),
        tb.symlink("d", target),
        tb.file("d/b", b"b"),
        tb.file("d/file", b"overwritten"),
        tb.file("d/dir/inner", b"overwritten"),
        tb.symlink("d/sub", target),
        tb.hardlink("d/hl", "d/file"),
        tb.whiteout("d/capped"),
    )
    attempt(driver, guard, data)


def test_lower_directory_swapped_for_symlink(
    driver: lamina.Driver, guard: Guard, outside: Path
) -> None:
    """CVE-2018-15664 across layers: the parent has a directory, this tar replaces it
    with a symlink to outside and then writes below it."""
    apply(driver, "mid", "base", [tb.directory("d"), tb.file("d/a", b"a")])
    data = entries(
        tb.file("d/b", b"b"),
        tb.symlink("d", str(outside)),
        tb.file("d/file", b"overwritten"),
        tb.whiteout("d/capped"),
        tb.opaque("d/dir"),
    )
    attempt(driver, guard, data, parent="mid")

"""Conformance, part 3: ``changes`` (Docker's ``Changes``), on every backend.

Docker's semantics: a changed file is MODIFY (mode, owner, size, mtime, device or
capability differ), a directory that contains changes is MODIFY too (its own mtime and
size are not looked at), a deleted directory is one DELETE (its children are not
listed), an added directory is ADD along with everything in it, and ``/`` itself is
never listed.  The list is sorted by path.
"""

from __future__ import annotations

import os
import shutil

import pytest

import lamina
from lamina import Change, ChangeKind
from tests import tarbuild as tb
from tests.layers import apply, mounted

pytestmark = pytest.mark.root

A, C, D = ChangeKind.ADD, ChangeKind.MODIFY, ChangeKind.DELETE

BASE = [
    tb.directory("etc"),
    tb.file("etc/a", b"a"),
    tb.file("etc/b", b"b"),
    tb.file("etc/keep", b"k"),
    tb.directory("gone"),
    tb.file("gone/x", b"x"),
    tb.directory("gone/sub"),
    tb.file("gone/sub/y", b"y"),
    tb.directory("keep"),
    tb.file("keep/k", b"k"),
    tb.directory("mod"),
    tb.file("mod/m", b"m"),
    tb.file("top", b"t"),
    tb.symlink("link", "etc/a"),
    tb.directory("owned"),
    tb.file("owned/o", b"o"),
]


def changes_of(*pairs: tuple[ChangeKind, str]) -> list[Change]:
    return sorted((Change(path, kind) for kind, path in pairs), key=lambda c: c.path)


def test_change_kind_values() -> None:
    assert (int(C), int(A), int(D)) == (0, 1, 2)
    assert [k.letter for k in (C, A, D)] == ["C", "A", "D"]
    change = Change("/x", A)
    assert (change.path, change.kind) == ("/x", A)


def test_changes_of_a_container(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    driver.create_rw("ctr", "base")
    with mounted(driver, "ctr") as root:
        (root / "etc/a").write_bytes(b"A!")
        os.unlink(root / "etc/b")
        (root / "etc/new").write_bytes(b"new")
        shutil.rmtree(root / "gone")
        os.chmod(root / "mod/m", 0o600)
        (root / "newdir/sub").mkdir(parents=True)
        (root / "newdir/f").write_bytes(b"f")
        (root / "newdir/sub/g").write_bytes(b"g")
        os.chown(root / "top", 1000, 1000)
        os.unlink(root / "link")
        os.symlink("etc/keep", root / "link")
        os.chown(root / "owned", 5, 5)
    want = changes_of(
        (C, "/etc"),
        (C, "/etc/a"),
        (D, "/etc/b"),
        (A, "/etc/new"),
        (D, "/gone"),
        (C, "/link"),
        (C, "/mod"),
        (C, "/mod/m"),
        (A, "/newdir"),
        (A, "/newdir/f"),
        (A, "/newdir/sub"),
        (A, "/newdir/sub/g"),
        (C, "/owned"),
        (C, "/top"),
    )
    got = driver.changes("ctr")
    assert got == want
    assert driver.changes("ctr", "base") == want
    assert all(isinstance(c.kind, ChangeKind) for c in got)


def test_no_changes(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    driver.create_rw("ctr", "base")
    driver.create("snap", "base")
    assert driver.changes("ctr") == []
    assert driver.changes("snap") == []


def test_changes_of_a_base_layer_are_all_additions(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    want = sorted({Change("/" + e.name, A) for e in BASE}, key=lambda c: c.path)
    assert driver.changes("base") == want


def test_changes_of_an_applied_layer(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    apply(
        driver,
        "l",
        "base",
        [
            tb.whiteout("etc/b"),
            tb.file("etc/new", b"n"),
            tb.whiteout("gone"),
            tb.directory("fresh"),
            tb.file("fresh/f", b"f"),
            tb.file("top", b"changed!", mtime=tb.MTIME + 1),
        ],
    )
    assert driver.changes("l") == changes_of(
        (C, "/etc"),
        (D, "/etc/b"),
        (A, "/etc/new"),
        (A, "/fresh"),
        (A, "/fresh/f"),
        (D, "/gone"),
        (C, "/top"),
    )


def test_changes_against_an_older_ancestor(driver: lamina.Driver) -> None:
    apply(driver, "a", None, BASE)
    apply(driver, "b", "a", [tb.file("etc/from-b", b"b"), tb.whiteout("top")])
    apply(driver, "c", "b", [tb.file("keep/from-c", b"c")])
    assert driver.changes("c") == changes_of((C, "/keep"), (A, "/keep/from-c"))
    assert driver.changes("c", "a") == changes_of(
        (C, "/etc"), (A, "/etc/from-b"), (C, "/keep"), (A, "/keep/from-c"), (D, "/top")
    )


def test_changes_sorted_by_path(driver: lamina.Driver) -> None:
    apply(driver, "base", None, [tb.directory("e")])
    driver.create_rw("ctr", "base")
    with mounted(driver, "ctr") as root:
        for name in ("e/z", "e-x", "e/a", "e0", "E", "e.d"):
            (root / name).write_bytes(b"")
    got = driver.changes("ctr")
    assert [c.path for c in got] == sorted(c.path for c in got)
    assert {c.path for c in got} == {"/E", "/e", "/e-x", "/e.d", "/e/a", "/e/z", "/e0"}


def test_changes_of_replacements_and_recreated_directories(driver: lamina.Driver) -> None:
    # Paths are compared with the parent's by path, as Docker does on every driver
    # (overlay2 looks the path up in the lower layers too): a file that is there again
    # in a directory removed and made again is MODIFY, a new one ADD.  The directory
    # itself is where Docker's drivers differ: vfs (a tree comparison) says MODIFY and
    # DELETE for each child not made again, overlay2 says DELETE for the opaque directory.
    apply(
        driver,
        "base",
        None,
        [
            tb.directory("rec"),
            tb.file("rec/old", b"1"),
            tb.file("rec/kept", b"kept"),
            tb.file("was-file", b"f"),
            tb.directory("was-dir"),
            tb.file("was-dir/child", b"c"),
            tb.directory("a/b"),
            tb.file("a/b/c", b"c"),
            tb.file("renamed", b"x"),
        ],
    )
    driver.create_rw("ctr", "base")
    with mounted(driver, "ctr") as root:
        shutil.rmtree(root / "rec")
        (root / "rec").mkdir()
        (root / "rec/kept").write_bytes(b"kept, again")
        (root / "rec/new").write_bytes(b"n")
        os.unlink(root / "was-file")
        (root / "was-file").mkdir()
        (root / "was-file/inner").write_bytes(b"i")
        shutil.rmtree(root / "was-dir")
        (root / "was-dir").write_bytes(b"now a file")
        shutil.rmtree(root / "a")
        os.rename(root / "renamed", root / "new-name")
    got = driver.changes("ctr")
    assert got == sorted(got, key=lambda c: c.path)
    recreated = {(c.kind, c.path) for c in got if c.path in ("/rec", "/rec/old")}
    assert recreated in ({(C, "/rec"), (D, "/rec/old")}, {(D, "/rec")}), recreated
    assert [c for c in got if c.path not in ("/rec", "/rec/old")] == changes_of(
        (D, "/a"),
        (A, "/new-name"),
        (C, "/rec/kept"),
        (A, "/rec/new"),
        (D, "/renamed"),
        (C, "/was-dir"),
        (C, "/was-file"),
        (A, "/was-file/inner"),
    )

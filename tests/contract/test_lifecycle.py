"""Conformance, part 1: the life cycle of layers (contract §1, §4).

Every test runs against every registered backend, as moby's graphtest and containerd's
snapshotter testsuite do.  Layers are made with ``apply_diff`` (read-only layers) or
``create_rw`` and written through ``get`` (a container's layer).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import lamina
from lamina import errors, registry
from tests import tarbuild as tb
from tests.conftest import Opener, Stores, mounts_under
from tests.layers import apply, listing, mounted, names, read, tree

pytestmark = pytest.mark.root

# graphtest's base: odd modes, owners, setuid and sticky bits, set through a tar.
BASE = [
    tb.directory("a subdir", mode=0o1705, uid=1, gid=2),
    tb.file("a file", b"Some data", mode=0o4222),
    tb.directory("setgid", mode=0o2775, uid=3, gid=4),
    tb.file("setgid/prog", b"#!/bin/sh\n", mode=0o6755, uid=5, gid=6),
    tb.directory("tmp", mode=0o1777),
    tb.file("private", b"secret", mode=0o600, uid=1000, gid=1000),
]
BASE_EXPECTED = {
    # path: (type bits, permission bits, uid, gid)
    "/a subdir": (stat.S_IFDIR, 0o1705, 1, 2),
    "/a file": (stat.S_IFREG, 0o4222, 0, 0),
    "/setgid": (stat.S_IFDIR, 0o2775, 3, 4),
    "/setgid/prog": (stat.S_IFREG, 0o6755, 5, 6),
    "/tmp": (stat.S_IFDIR, 0o1777, 0, 0),
    "/private": (stat.S_IFREG, 0o600, 1000, 1000),
}


def verify_base(drv: lamina.Driver, id: str) -> None:
    with mounted(drv, id) as root:
        for path, (kind, mode, uid, gid) in BASE_EXPECTED.items():
            st = os.lstat(root / path.lstrip("/"))
            assert stat.S_IFMT(st.st_mode) == kind, path
            assert stat.S_IMODE(st.st_mode) == mode, f"{path}: {oct(st.st_mode)}"
            assert (st.st_uid, st.st_gid) == (uid, gid), path
        assert (root / "a file").read_bytes() == b"Some data"
    assert names(drv, id) == set(BASE_EXPECTED)


# --- create, get, remove --------------------------------------------------------------------


def test_name_and_status(driver: lamina.Driver, backend: str) -> None:
    assert driver.name == backend
    status = driver.status()
    assert isinstance(status, list)
    for pair in status:
        assert len(pair) == 2 and all(isinstance(s, str) for s in pair), pair


def test_home_is_created_private(driver: lamina.Driver, home: Path) -> None:
    assert home.is_dir()
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_create_empty(driver: lamina.Driver) -> None:
    driver.create("empty")
    assert driver.exists("empty")
    assert "empty" in set(driver.layers())
    assert driver.parent("empty") is None
    with mounted(driver, "empty") as root:
        assert isinstance(root, Path)
        st = os.lstat(root)
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o755
        assert (st.st_uid, st.st_gid) == (0, 0)
        assert [n for n in os.listdir(root) if n != "lost+found"] == []
    driver.remove("empty")
    assert not driver.exists("empty")
    assert "empty" not in set(driver.layers())


def test_create_base(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    verify_base(driver, "base")


def test_modes_do_not_depend_on_umask(driver: lamina.Driver) -> None:
    old = os.umask(0o077)
    try:
        apply(driver, "base", None, BASE)
    finally:
        os.umask(old)
    verify_base(driver, "base")


def test_create_snapshot_sees_parent(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    driver.create("snap", "base")
    assert driver.parent("snap") == "base"
    verify_base(driver, "snap")
    driver.create_rw("ctr", "snap")
    assert driver.parent("ctr") == "snap"
    verify_base(driver, "ctr")


def test_writes_to_child_do_not_reach_parent(driver: lamina.Driver) -> None:
    apply(driver, "base", None, BASE)
    before = tree(driver, "base")
    driver.create_rw("ctr", "base")
    with mounted(driver, "ctr") as root:
        (root / "a file").write_bytes(b"changed through the child")
        (root / "new").write_bytes(b"new")
        os.chmod(root / "private", 0o644)
        os.chown(root / "setgid/prog", 7, 7)
        os.rmdir(root / "tmp")
        shutil.rmtree(root / "a subdir")
    assert tree(driver, "base") == before
    assert read(driver, "ctr", "a file") == b"changed through the child"


def test_deep_chain(driver: lamina.Driver) -> None:
    depth = 64
    parent = None
    for i in range(depth):
        apply(driver, f"layer{i}", parent, [tb.file(f"file-{i}", f"content of layer {i}\n")])
        parent = f"layer{i}"
    with mounted(driver, f"layer{depth - 1}") as root:
        for i in range(depth):
            assert (root / f"file-{i}").read_text() == f"content of layer {i}\n"
        assert sorted(os.listdir(root)) == sorted(f"file-{i}" for i in range(depth))
    assert names(driver, "layer31") == {f"/file-{i}" for i in range(32)}
    assert driver.parent("layer63") == "layer62"


def test_get_put_are_counted(driver: lamina.Driver) -> None:
    apply(driver, "l", None, [tb.file("f", "x")])
    assert driver.mount_count("l") == 0
    first = driver.get("l")
    second = driver.get("l")
    assert isinstance(first, Path)
    assert first == second
    assert driver.mount_count("l") == 2
    driver.put("l")
    assert driver.mount_count("l") == 1
    assert (first / "f").read_bytes() == b"x"
    driver.put("l")
    assert driver.mount_count("l") == 0
    driver.put("l")  # a put of an unmounted layer is a no-op
    assert driver.mount_count("l") == 0
    # and it can be mounted again
    with mounted(driver, "l") as root:
        assert (root / "f").read_bytes() == b"x"


def test_mount_counts_are_shared_by_stores_on_one_home(stores: Stores) -> None:
    one = stores.open()
    apply(one, "l", None, [tb.file("f", "x")])
    two = stores.open()
    assert two.exists("l")
    path = one.get("l")
    assert two.mount_count("l") == 1
    assert two.get("l") == path
    assert one.mount_count("l") == 2
    two.put("l")
    assert one.mount_count("l") == 1
    one.put("l")
    assert two.mount_count("l") == 0


def test_metadata(driver: lamina.Driver, backend: str) -> None:
    driver.create("base")
    driver.create_rw("ctr", "base")
    for id in ("base", "ctr"):
        meta = driver.metadata(id)
        assert isinstance(meta["dir"], str)
        assert Path(meta["dir"]).is_absolute()
        assert os.path.lexists(meta["dir"])
    if backend == "overlay":
        meta = driver.metadata("ctr")
        for key in ("LowerDir", "UpperDir", "WorkDir", "MergedDir"):
            assert key in meta, key


MISSING_CALLS: dict[str, Callable[[lamina.Driver], object]] = {
    "get": lambda d: d.get("nope"),
    "metadata": lambda d: d.metadata("nope"),
    "changes": lambda d: d.changes("nope"),
    "diff": lambda d: d.diff("nope").close(),
    "diff_size": lambda d: d.diff_size("nope"),
    "parent": lambda d: d.parent("nope"),
    "diff_parent": lambda d: d.diff("l", "nope").close(),
    "changes_parent": lambda d: d.changes("l", "nope"),
    "diff_size_parent": lambda d: d.diff_size("l", "nope"),
}


@pytest.mark.parametrize("call", MISSING_CALLS.values(), ids=MISSING_CALLS.keys())
def test_missing_layer_is_not_found(driver: lamina.Driver, call: Callable[..., object]) -> None:
    driver.create("l")
    with pytest.raises(errors.NotFound):
        call(driver)
    assert not driver.exists("nope")


def test_remove_missing_is_not_an_unexpected_error(driver: lamina.Driver) -> None:
    # Docker's drivers treat it as done; NotFound is fine too.
    with contextlib.suppress(errors.NotFound):
        driver.remove("nope")
    assert not driver.exists("nope")


# --- ids --------------------------------------------------------------------------------------

BAD_IDS = [
    "",
    ".",
    "..",
    "/",
    "a/b",
    "/abs",
    "../up",
    "a/../b",
    "x" * 129,
    "x-removing",
    "-dash",
    ".hidden",
    "_under",
    "sp ace",
    "nul\0byte",
    "tab\t",
    "new\nline",
    "caf\u00e9",
]
GOOD_IDS = ["a" * 128, "0" * 64, "A.b_c-d", "abc-init", "9", "x-removingx", "x-removing.1"]
EMPTY_TAR = tb.build([])

ID_CALLS: dict[str, Callable[[lamina.Driver, str], object]] = {
    "create": lambda d, i: d.create(i),
    "create_rw": lambda d, i: d.create_rw(i),
    "create_parent": lambda d, i: d.create("fresh", i),
    "create_rw_parent": lambda d, i: d.create_rw("fresh", i),
    "remove": lambda d, i: d.remove(i),
    "get": lambda d, i: d.get(i),
    "put": lambda d, i: d.put(i),
    "exists": lambda d, i: d.exists(i),
    "metadata": lambda d, i: d.metadata(i),
    "mount_count": lambda d, i: d.mount_count(i),
    "parent": lambda d, i: d.parent(i),
    "changes": lambda d, i: d.changes(i),
    "changes_parent": lambda d, i: d.changes("l", i),
    "diff": lambda d, i: d.diff(i).close(),
    "diff_parent": lambda d, i: d.diff("l", i).close(),
    "diff_size": lambda d, i: d.diff_size(i),
    "diff_size_parent": lambda d, i: d.diff_size("l", i),
    "apply_diff": lambda d, i: d.apply_diff(i, None, io.BytesIO(EMPTY_TAR)),
    "apply_diff_parent": lambda d, i: d.apply_diff("fresh", i, io.BytesIO(EMPTY_TAR)),
    "diff_getter": lambda d, i: d.diff_getter(i).close(),
}
PARENT_CALLS = [call for name, call in ID_CALLS.items() if name.endswith("_parent")]


@pytest.mark.parametrize("call", ID_CALLS.values(), ids=ID_CALLS.keys())
def test_bad_ids_are_invalid_before_touching_disk(
    driver: lamina.Driver, home: Path, call: Callable[[lamina.Driver, str], object]
) -> None:
    apply(driver, "l", None, [tb.file("f", "x")])
    before = listing(home)
    wrong = []
    for bad in BAD_IDS:
        if bad == "" and call in PARENT_CALLS:
            continue  # Docker's "no parent"; the Python API's is None, but "" is fair too
        try:
            call(driver, bad)
        except errors.InvalidArgument:
            continue
        except Exception as e:  # reported below, with the id
            wrong.append(f"{bad!r}: {type(e).__name__}: {e}")
        else:
            wrong.append(f"{bad!r}: accepted")
    assert not wrong, "ids not refused with InvalidArgument:\n" + "\n".join(wrong)
    assert listing(home) == before
    assert not driver.exists("fresh")


def test_good_ids(driver: lamina.Driver) -> None:
    for good in GOOD_IDS:
        driver.create(good)
        assert driver.exists(good)
    assert set(GOOD_IDS) <= set(driver.layers())
    for good in GOOD_IDS:
        driver.remove(good)
        assert not driver.exists(good)


# --- parents, duplicates, options -------------------------------------------------------------

MAKERS: dict[str, Callable[[lamina.Driver, str, str], object]] = {
    "create": lambda d, i, p: d.create(i, p),
    "create_rw": lambda d, i, p: d.create_rw(i, p),
    "apply_diff": lambda d, i, p: d.apply_diff(i, p, tb.stream([tb.file("f", "x")])),
}


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_missing_parent_is_not_found_and_leaves_nothing(
    driver: lamina.Driver, home: Path, make: Callable[[lamina.Driver, str, str], object]
) -> None:
    driver.create("other")
    before = listing(home)
    with pytest.raises(errors.NotFound):
        make(driver, "child", "nope")
    assert not driver.exists("child")
    assert "child" not in set(driver.layers())
    left = {
        path
        for path in listing(home) - before
        if ("child" in path or "nope" in path) and "lock" not in path.lower()
    }
    assert not left, f"left behind: {sorted(left)}"


def test_create_existing_is_already_exists(driver: lamina.Driver) -> None:
    driver.create("a")
    driver.create_rw("b")
    for make in (driver.create, driver.create_rw):
        for id in ("a", "b"):
            with pytest.raises(errors.AlreadyExists):
                make(id)
    assert driver.exists("a") and driver.exists("b")


def test_apply_diff_into_existing_layer_checks_its_parent(driver: lamina.Driver) -> None:
    apply(driver, "base", None, [tb.file("base-file", "b")])
    apply(driver, "other", None, [tb.file("other-file", "o")])
    driver.create("x", "base")
    apply(driver, "x", "base", [tb.file("x-file", "x")])
    assert names(driver, "x") == {"/base-file", "/x-file"}
    for wrong in (None, "other"):
        with pytest.raises(errors.InvalidArgument):
            apply(driver, "x", wrong, [tb.file("wrong", "w")])
    assert names(driver, "x") == {"/base-file", "/x-file"}
    assert driver.parent("x") == "base"


def test_size_option_on_read_only_layer_is_invalid(driver: lamina.Driver) -> None:
    with pytest.raises(errors.InvalidArgument):
        driver.create("ro", storage_opts={"size": "10M"})
    assert not driver.exists("ro")


def test_unknown_storage_option_is_invalid(driver: lamina.Driver) -> None:
    with pytest.raises(errors.InvalidArgument):
        driver.create_rw("rw", storage_opts={"bogus": "1"})
    assert not driver.exists("rw")


def test_size_quota_on_writable_layer(driver: lamina.Driver) -> None:
    try:
        driver.create_rw("rw", storage_opts={"size": "1M"})
    except errors.Unsupported as e:
        pytest.skip(f"no quota here: {e}")
    with (
        mounted(driver, "rw") as root,
        pytest.raises(OSError) as excinfo,
        open(root / "big", "wb") as f,
    ):
        for _ in range(4):
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    assert excinfo.value.errno in (28, 122)  # ENOSPC, EDQUOT


@pytest.mark.parametrize(
    "options",
    [["{b}.bogus=1"], {"{b}.bogus": "1"}, ["bogus=1"], ["novalue"], ["{b}.=1"]],
    ids=["list", "mapping", "no-prefix", "no-value", "empty-key"],
)
def test_unknown_driver_option_is_invalid(
    backend: str, tmp_path: Path, options: list[str] | dict[str, str], open_store: Opener
) -> None:
    if isinstance(options, dict):
        options = {k.format(b=backend): v for k, v in options.items()}
    else:
        options = [o.format(b=backend) for o in options]
    with pytest.raises(errors.InvalidArgument):
        open_store(tmp_path / "home", options=options).close()


def test_vfs_copy_option(tmp_path: Path) -> None:
    """vfs's own option (run once, not skipped for every other backend)."""
    drv = lamina.open_driver(tmp_path / "home", backend="vfs", options=["vfs.copy=copy"])
    try:
        apply(drv, "base", None, BASE)
        drv.create("snap", "base")
        verify_base(drv, "snap")
        with pytest.raises(errors.InvalidArgument):
            lamina.open_driver(tmp_path / "other", backend="vfs", options=["vfs.copy=bogus"])
    finally:
        drv.cleanup()
        drv.close()


def test_unknown_backend_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument):
        lamina.open_driver(tmp_path / "home", backend="no-such-backend")


def test_home_remembers_its_backend(
    stores: Stores, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    drv = stores.open()
    apply(drv, "l", None, [tb.file("f", "x")])
    stores.close(drv)
    auto = lamina.open_driver(drv.home, backend="auto")
    try:
        assert auto.name == backend
        assert auto.exists("l")
    finally:
        auto.close()

    def factory(*args: object) -> lamina.Driver:
        raise AssertionError("a home made with another backend must not reach its factory")

    # A second backend, registered for this test only.
    monkeypatch.setitem(registry._backends, "other-test-backend", factory)
    with pytest.raises(errors.InvalidArgument) as excinfo:
        lamina.open_driver(drv.home, backend="other-test-backend")
    assert backend in str(excinfo.value) and "other-test-backend" in str(excinfo.value)


def test_driver_is_a_context_manager(backend: str, tmp_path: Path, open_store: Opener) -> None:
    try:
        with open_store(tmp_path / "home") as drv:
            drv.create("l")
            assert drv.exists("l")
    except errors.Unsupported as e:
        pytest.skip(f"backend {backend} cannot work here: {e}")
    drv2 = open_store(tmp_path / "home")
    try:
        assert drv2.exists("l")
    finally:
        drv2.cleanup()
        drv2.close()


# --- remove -----------------------------------------------------------------------------------


def test_remove_parent_with_children_is_busy(driver: lamina.Driver) -> None:
    apply(driver, "base", None, [tb.file("f", "x")])
    driver.create("child", "base")
    with pytest.raises(errors.Busy):
        driver.remove("base")
    assert driver.exists("base") and driver.exists("child")
    assert read(driver, "child", "f") == b"x"
    driver.remove("child")
    driver.remove("base")
    assert not driver.exists("base")
    assert list(driver.layers()) == []


def test_remove_mounted_layer_unmounts_it(driver: lamina.Driver) -> None:
    apply(driver, "l", None, [tb.file("f", "x")])
    driver.get("l")
    driver.get("l")
    driver.remove("l")
    assert not driver.exists("l")


def test_remove_then_recreate(driver: lamina.Driver) -> None:
    apply(driver, "l", None, [tb.file("f", "x")])
    driver.remove("l")
    driver.create("l")
    assert names(driver, "l") == set()


def layers_dir(drv: lamina.Driver, id: str) -> Path:
    """The directory where the backend keeps layer ``id``'s directory, named ``id``."""
    here = Path(drv.metadata(id)["dir"])
    for candidate in (here, *here.parents):
        if candidate.name == id:
            return candidate.parent
        if candidate == drv.home:
            break
    for dirpath, dirnames, _ in os.walk(drv.home):
        if id in dirnames:
            return Path(dirpath)
    pytest.fail(f"no directory named {id} under {drv.home}")


def make_leftover(path: Path, outside: Path) -> None:
    """A half-deleted layer: nested dirs, a fifo, an unreadable dir, a symlink out."""
    (path / "usr/lib/deep").mkdir(parents=True)
    (path / "usr/lib/deep/file").write_bytes(b"x" * 10000)
    os.mkfifo(path / "fifo")
    (path / "locked").mkdir()
    (path / "locked/file").write_bytes(b"y")
    os.chmod(path / "locked", 0)
    os.symlink(outside, path / "out")
    os.symlink(outside / "file", path / "usr/out-file")


def test_removing_leftover_is_swept_on_open(stores: Stores, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(b"keep me")
    drv = stores.open()
    apply(drv, "victim", None, [tb.file("f", "x")])
    ghost = layers_dir(drv, "victim") / "ghost-removing"
    stores.close(drv)
    ghost.mkdir()
    make_leftover(ghost, outside)
    drv = stores.open()
    assert not os.path.lexists(ghost)
    assert drv.exists("victim")
    assert read(drv, "victim", "f") == b"x"
    assert (outside / "file").read_bytes() == b"keep me"
    assert sorted(os.listdir(outside)) == ["file"]


def test_removing_leftover_is_swept_by_cleanup(driver: lamina.Driver, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(b"keep me")
    apply(driver, "victim", None, [tb.file("f", "x")])
    ghost = layers_dir(driver, "victim") / "ghost-removing"
    ghost.mkdir()
    make_leftover(ghost, outside)
    driver.cleanup()
    assert not os.path.lexists(ghost)
    assert driver.exists("victim")
    assert (outside / "file").read_bytes() == b"keep me"


def test_remove_interrupted_after_its_rename_is_finished_on_open(stores: Stores) -> None:
    # remove() renames the layer to <id>-removing first (§4): a kill right after that
    # rename must read, once the store is opened again, as a finished removal.
    drv = stores.open()
    apply(drv, "keep", None, [tb.file("k", "k")])
    apply(drv, "victim", None, [tb.file("f", "x")])
    parent_dir = layers_dir(drv, "victim")
    stores.close(drv)
    os.rename(parent_dir / "victim", parent_dir / "victim-removing")
    drv = stores.open()
    assert not drv.exists("victim")
    assert "victim" not in set(drv.layers())
    assert not os.path.lexists(parent_dir / "victim-removing")
    assert not os.path.lexists(parent_dir / "victim")
    assert read(drv, "keep", "k") == b"k"
    drv.create("victim")  # the id is free again


# --- several users of one home ----------------------------------------------------------------


def test_concurrent_create_of_one_id(stores: Stores) -> None:
    # Mutations of one layer are serialized: exactly one of many racing creates wins.
    drivers = [stores.open() for _ in range(8)]
    barrier = threading.Barrier(len(drivers))
    outcomes: list[str] = []

    def create(drv: lamina.Driver) -> None:
        barrier.wait()
        try:
            drv.apply_diff("same", None, tb.stream([tb.file("f", b"x")]))
            outcomes.append("created")
        except errors.AlreadyExists:
            outcomes.append("exists")
        except BaseException as e:  # reported below
            outcomes.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=create, args=(d,)) for d in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # apply_diff into an existing layer on the same parent is allowed, so each racer
    # either made the layer, applied into it, or was told it exists; never a broken one.
    assert all(o in ("created", "exists") for o in outcomes), outcomes
    assert drivers[0].exists("same")
    assert names(drivers[0], "same") == {"/f"}


def test_concurrent_create_rw_of_one_id(stores: Stores) -> None:
    drivers = [stores.open() for _ in range(8)]
    barrier = threading.Barrier(len(drivers))
    outcomes: list[str] = []

    def create(drv: lamina.Driver) -> None:
        barrier.wait()
        try:
            drv.create_rw("same")
            outcomes.append("created")
        except errors.AlreadyExists:
            outcomes.append("exists")
        except BaseException as e:  # reported below
            outcomes.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=create, args=(d,)) for d in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created"] + ["exists"] * 7, outcomes


def test_cleanup_releases_every_view(driver: lamina.Driver, home: Path) -> None:
    apply(driver, "a", None, [tb.file("f", b"a")])
    driver.create_rw("b", "a")
    driver.get("a")
    driver.get("b")
    driver.get("b")
    driver.cleanup()
    assert mounts_under(home) == []
    # the store is still usable
    assert read(driver, "b", "f") == b"a"
    assert driver.exists("a") and driver.exists("b")

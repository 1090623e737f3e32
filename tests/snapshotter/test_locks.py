"""Nothing slow holds the snapshotter's lock: a removal deleting a big tree, a commit's
syncfs, a layer being built run beside the calls on other snapshots (issue 22).

The removal is made slow on purpose: the store's tree deletion waits for the test to let
it go (the deletion itself is the real one), so the test does not depend on how fast
this machine deletes files.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from lamina import errors
from lamina.backends.contract import Backend
from lamina.frontends.containerd.snapshotter import Snapshotter
from lamina.store.layers import Store

pytestmark = pytest.mark.root

BACKENDS = ["overlay", "vfs"]


@pytest.fixture
def sn(backend: str, tmp_path: Path) -> Iterator[Snapshotter]:
    drv = lamina.open_driver(tmp_path / "home", backend=backend)
    assert isinstance(drv, Backend)
    s = Snapshotter(drv)
    try:
        yield s
    finally:
        s.close()
        drv.close()


def test_a_slow_removal_holds_up_no_other_call(sn: Snapshotter,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    sn.prepare("base-a", "", {})
    sn.commit("base", "base-a", {})
    sn.prepare("doomed", "base", {})
    sn.prepare("other", "base", {})
    deleting = threading.Event()
    let_go = threading.Event()
    real_delete = Store._delete

    def slow_delete(store: Store, path: Path) -> None:
        if path.name.endswith("-removing"):  # a removal's; not a build's staging dir
            deleting.set()
            assert let_go.wait(30), "the test never let the deletion go"
        real_delete(store, path)

    monkeypatch.setattr(Store, "_delete", slow_delete)
    remover = threading.Thread(target=sn.remove, args=("doomed",))
    remover.start()
    try:
        assert deleting.wait(30), "the removal never reached its deletion"
        # The Remove answers without waiting for its tree (the store's reaper deletes it).
        remover.join(10)
        assert not remover.is_alive(), "the Remove waited for its tree to be deleted"
        t0 = time.monotonic()
        assert sn.stat("other").name == "other"
        stat_took = time.monotonic() - t0
        t0 = time.monotonic()
        sn.prepare("new", "base", {})
        prepare_took = time.monotonic() - t0
        t0 = time.monotonic()
        names = sorted(r.name for r in sn.list([]))
        list_took = time.monotonic() - t0
        assert list(sn.drv.store.layers_dir.glob("*-removing")), \
            "the deletion finished: it was not slow"
    finally:
        let_go.set()
        remover.join(30)
    assert sn.drv.store.wait_deleted(30)
    assert not list(sn.drv.store.layers_dir.glob("*-removing"))
    print(f"\nwhile a removal's tree was being deleted: Stat {stat_took * 1000:.1f} ms, "
          f"Prepare {prepare_took * 1000:.1f} ms, List {list_took * 1000:.1f} ms")
    assert names == ["base", "new", "other"]  # "doomed" was gone from the start
    assert stat_took < 1.0 and prepare_took < 5.0 and list_took < 1.0
    assert sorted(r.name for r in sn.list([])) == ["base", "new", "other"]


def test_a_slow_build_holds_up_no_other_call(sn: Snapshotter,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A Prepare whose layer takes long to build (its syncfs, a slow disk) lets a Stat
    and a Remove of other snapshots through, and its key is taken meanwhile."""
    sn.prepare("other", "", {})
    building = threading.Event()
    let_go = threading.Event()
    drv = sn.drv
    real_make = type(drv).make

    def slow_make(self: Backend, *args: object, **kw: object) -> None:
        building.set()
        assert let_go.wait(30)
        real_make(self, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(type(drv), "make", slow_make)
    errors_seen: list[BaseException] = []

    def prepare() -> None:
        try:
            sn.prepare("slow", "", {})
        except BaseException as e:  # reported below
            errors_seen.append(e)

    maker = threading.Thread(target=prepare)
    maker.start()
    try:
        assert building.wait(30)
        t0 = time.monotonic()
        assert sn.stat("other").name == "other"
        with pytest.raises(errors.AlreadyExists):
            sn.prepare("slow", "", {})  # the name is taken while it is being made
        sn.remove("other")
        took = time.monotonic() - t0
    finally:
        let_go.set()
        maker.join(30)
    assert not errors_seen, errors_seen
    assert took < 5.0
    assert [r.name for r in sn.list([])] == ["slow"]

"""Each graph driver call reaches the driver with Docker's fields, as
:mod:`lamina.frontends.docker.plugin` says.

In process, on a recording stand-in for the driver: no socket, no store, no root.
"""

from __future__ import annotations

import http.client
import io
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

import lamina
from lamina import Change, ChangeKind, errors
from lamina.frontends.docker.plugin import Plugin


@pytest.fixture
def drv(monkeypatch: pytest.MonkeyPatch) -> mock.MagicMock:
    """The driver ``Init`` opens: a recording stand-in; ``opened`` holds open_driver's args."""
    fake = mock.create_autospec(lamina.Driver, instance=True)
    fake.opened = []
    fake.home, fake.name = Path("/h"), "fake"  # annotations on Driver, not in its spec

    def open_driver(home: Path, **kw: Any) -> Any:
        fake.opened.append((home, kw))
        return fake

    monkeypatch.setattr(lamina, "open_driver", open_driver)
    return fake


def test_init_opens_dockers_home_with_options_and_maps(drv: mock.MagicMock, tmp_path: Path) -> None:
    state = tmp_path / "x.sock.init.json"
    plugin = Plugin(backend="vfs", options=["vfs.copy=copy"], state=state)
    maps = [{"container_id": 0, "host_id": 1000, "size": 10}]
    plugin.init({"Home": "/var/lib/docker/lamina", "Opts": ["overlay.size=1G"],
                 "UIDMaps": maps, "GIDMaps": [{"ContainerID": 0, "HostID": 2000, "Size": 5}]})
    assert drv.opened == [(Path("/var/lib/docker/lamina"), {
        "backend": "vfs", "options": ["vfs.copy=copy", "overlay.size=1G"],
        "uid_map": [(0, 1000, 10)], "gid_map": [(0, 2000, 5)]})]
    # the same Init again (Docker restarted) keeps the driver; a restarted serve resumes it
    plugin.init({"Home": "/var/lib/docker/lamina", "Opts": ["overlay.size=1G"],
                 "UIDMaps": maps, "GIDMaps": [{"ContainerID": 0, "HostID": 2000, "Size": 5}]})
    assert len(drv.opened) == 1
    again = Plugin(backend="vfs", options=["vfs.copy=copy"], state=state)
    again.resume()
    assert again.opened and drv.opened[1] == drv.opened[0]


def test_home_given_to_serve_wins(drv: mock.MagicMock) -> None:
    Plugin(home=Path("/srv/lamina")).init({"Home": "/var/lib/docker/lamina"})
    assert drv.opened[0][0] == Path("/srv/lamina")


def test_fields_reach_the_driver(drv: mock.MagicMock) -> None:
    plugin = Plugin()
    plugin.init({"Home": "/h"})
    label = "system_u:object_r:container_file_t:s0:c1,c2"
    plugin.create({"ID": "img", "Parent": "", "MountLabel": label})
    drv.create.assert_called_once_with("img", None, storage_opts=None)
    plugin.create_rw({"ID": "c-init", "Parent": "img", "MountLabel": label,
                      "StorageOpt": {"size": "10G"}})
    drv.create_rw.assert_called_once_with("c-init", "img", mount_label=label,
                                          storage_opts={"size": "10G"})
    drv.get.return_value = Path("/h/layers/c-init/merged")
    assert plugin.get({"ID": "c-init", "MountLabel": label}) == {
        "Dir": "/h/layers/c-init/merged"}
    drv.get.assert_called_once_with("c-init", label)
    drv.changes.return_value = [Change("/a", ChangeKind.ADD), Change("/b", ChangeKind.DELETE)]
    assert plugin.changes({"ID": "c", "Parent": "c-init"}) == {
        "Changes": [{"Path": "/a", "Kind": 1}, {"Path": "/b", "Kind": 2}]}
    drv.changes.assert_called_once_with("c", "c-init")
    drv.diff_size.return_value = 7
    assert plugin.diff_size({"ID": "c"}) == {"Size": 7}
    drv.diff_size.assert_called_once_with("c", None)
    drv.apply_diff.return_value = 3
    body = io.BytesIO(b"tar")
    assert plugin.apply_diff("l", "", body) == {"Size": 3}
    drv.apply_diff.assert_called_once_with("l", None, body)
    drv.status.return_value = [("Home", "/h")]
    assert plugin.status({}) == {"Status": [["Backend", "fake"], ["Home", "/h"]]}


def test_remove_and_exists_answer_as_dockers_drivers(drv: mock.MagicMock) -> None:
    plugin = Plugin()
    plugin.init({"Home": "/h"})
    drv.remove.side_effect = errors.NotFound("no such layer", layer="gone")
    assert plugin.remove({"ID": "gone"}) == {}
    drv.remove.side_effect = errors.Busy("layer is the parent of x", layer="base")
    with pytest.raises(errors.Busy):
        plugin.remove({"ID": "base"})
    drv.exists.side_effect = errors.InvalidArgument("invalid layer id '..'")
    assert plugin.exists({"ID": ".."}) == {"Exists": False}


def test_bad_requests_are_invalid_arguments(drv: mock.MagicMock) -> None:
    plugin = Plugin()
    with pytest.raises(errors.InvalidArgument, match="not initialized"):
        plugin.get({"ID": "a"})
    with pytest.raises(errors.InvalidArgument, match="without a Home"):
        plugin.init({})
    with pytest.raises(errors.InvalidArgument, match="Opts"):
        plugin.init({"Home": "/h", "Opts": "a=b"})
    with pytest.raises(errors.InvalidArgument, match="UIDMaps"):
        plugin.init({"Home": "/h", "UIDMaps": [{"container_id": 0}]})
    plugin.init({"Home": "/h"})
    with pytest.raises(errors.InvalidArgument, match="StorageOpt"):
        plugin.create_rw({"ID": "a", "StorageOpt": {"size": 5}})
    with pytest.raises(errors.InvalidArgument, match="ID must be a string"):
        plugin.put({"ID": ["a"]})


class FailingTar(io.RawIOBase):
    """A diff stream that gives ``good`` bytes, then fails as an export can."""

    def __init__(self, good: int) -> None:
        self.good = good
        self.closed_by_server = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self.good <= 0:
            raise errors.LaminaError("file vanished", layer="c", path="/big")
        n = min(len(buf), self.good)
        buf[:n] = b"x" * n
        self.good -= n
        return n

    def close(self) -> None:
        self.closed_by_server = True
        super().close()


def test_a_diff_that_fails_is_an_error_or_cut_short(drv: mock.MagicMock, tmp_path: Path) -> None:
    from lamina.frontends.docker.http import PluginServer
    from tests.integration.test_plugin import Client

    plugin = Plugin()
    plugin.init({"Home": "/h"})
    server = PluginServer(tmp_path / "p.sock", plugin)
    server.start()
    try:
        drv.diff.return_value = early = FailingTar(0)
        assert "file vanished" in Client(server.path).err("GraphDriver.Diff", {"ID": "c"})
        assert early.closed_by_server
        drv.diff.return_value = late = FailingTar(3 << 20)
        resp = Client(server.path).diff("c")
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
        # The server closes the stream after it cut the answer, in its own thread:
        # the client can see the cut first (a busy machine shows it).
        deadline = time.monotonic() + 10
        while not late.closed_by_server and time.monotonic() < deadline:
            time.sleep(0.01)
        assert late.closed_by_server
        drv.exists.return_value = True
        assert Client(server.path).ok("GraphDriver.Exists", {"ID": "c"})  # still serving
    finally:
        assert server.stop(grace=10)
    assert not (tmp_path / "p.sock").exists()

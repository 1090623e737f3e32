"""``lamina serve`` speaks Docker's graph driver plugin protocol (contract §5), on every backend.

A real ``lamina serve`` process is driven over its unix socket the way Docker's
plugin client drives it: HTTP/1.1 POSTs with JSON bodies on kept-alive connections,
``ApplyDiff`` bodies sent chunked, ``Diff`` read as a stream.  The Docker engine
itself is in ``test_docker.py``.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import tarbuild as tb
from tests.conftest import mounts_under
from tests.integration.engine import REPO, Serve, remove_plugin_files

pytestmark = pytest.mark.root

MB = 1 << 20
BIG = 256 * MB
RSS_LIMIT = 150 * MB
PATTERN = bytes(range(256)) * 4096  # 1 MiB, not all zeros


class Connection(http.client.HTTPConnection):
    """An HTTP/1.1 connection to a unix socket (kept alive between calls, as Docker's)."""

    def __init__(self, path: Path, timeout: float = 300) -> None:
        super().__init__("lamina", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.socket_path))


class Client:
    """Docker's side of the protocol, on one connection."""

    def __init__(self, path: Path) -> None:
        self.conn = Connection(path)

    def call(self, method: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        """POST ``/method`` with a JSON body (bytes as they are); the status and the answer."""
        data = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
        self.conn.request("POST", f"/{method}", body=data,
                          headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def ok(self, method: str, body: Any = None) -> dict[str, Any]:
        """A call that must succeed."""
        status, doc = self.call(method, body)
        assert status == 200 and "Err" not in doc, (method, status, doc)
        return doc

    def err(self, method: str, body: Any = None, status: int = 500) -> str:
        """A call that must fail; its ``Err``."""
        got, doc = self.call(method, body)
        assert got == status, (method, got, doc)
        return str(doc["Err"])

    def apply(
        self, id: str, parent: str, body: bytes | Iterable[bytes]
    ) -> tuple[int, dict[str, Any]]:
        """``ApplyDiff``: bytes go with a Content-Length, an iterable chunked (as Docker sends)."""
        self.conn.request("POST", f"/GraphDriver.ApplyDiff?id={id}&parent={parent}", body=body)
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def diff(self, id: str, parent: str = "") -> http.client.HTTPResponse:
        """``Diff``: the response, to be read as a stream."""
        body = json.dumps({"ID": id, "Parent": parent})
        self.conn.request("POST", "/GraphDriver.Diff", body=body)
        return self.conn.getresponse()


def chunks_of(data: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    """``data`` cut into pieces of the given sizes, cycling (odd sizes test the framing)."""
    sizes = list(sizes)
    pos = i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        pos += n
        i += 1


def big_layer() -> Iterator[bytes]:
    """A tar of one ``BIG``-byte file, made as it is sent."""
    yield tb.raw_header("big", size=BIG)
    for _ in range(BIG // MB):
        yield PATTERN
    yield tb.END


BASE = [tb.directory("etc"), tb.file("etc/os-release", "lamina\n"), tb.file("etc/motd", "hi\n"),
        tb.directory("usr"), tb.file("usr/tool", b"\x7fELF", mode=0o755)]


@pytest.fixture(scope="module")
def serve(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """A ``lamina serve --home`` on ``backend``, with the layer ``base`` applied."""
    work = tmp_path_factory.mktemp(f"serve-{backend}")
    server = Serve(work / "lamina.sock", work / "serve.log", home=work / "home", backend=backend)
    try:
        server.start()
        status, doc = Client(server.socket).apply("base", "", tb.build(BASE))
        assert status == 200, doc
        yield server
    finally:
        server.stop()
        remove_plugin_files(server.socket)
        assert mounts_under(work) == [], "serve left mounts behind"


@pytest.fixture
def client(serve: Serve) -> Client:
    return Client(serve.socket)


def test_activate_init_and_capabilities(client: Client, serve: Serve) -> None:
    assert client.ok("Plugin.Activate") == {"Implements": ["GraphDriver"]}
    assert serve.home is not None
    # --home wins over the Home Docker names
    client.ok("GraphDriver.Init", {"Home": "/nonexistent/elsewhere", "Opts": None,
                                   "UIDMaps": None, "GIDMaps": None})
    assert not Path("/nonexistent/elsewhere").exists()
    caps = client.ok("GraphDriver.Capabilities")
    assert caps == {"Capabilities": {"ReproducesExactDiffs": False}}
    status = dict(client.ok("GraphDriver.Status")["Status"])
    assert status["Backend"] == serve.backend
    assert status["Home"] == str(serve.home)


def test_container_life_cycle(client: Client) -> None:
    # what Docker does for `docker run`: an -init layer, Get/Put it, the container on it
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c1-init", "Parent": "base",
                                              "MountLabel": "", "StorageOpt": {}})
    init = Path(client.ok("GraphDriver.Get", {"ID": "c1-init"})["Dir"])
    (init / "etc/hosts").write_text("127.0.0.1 localhost\n")
    client.ok("GraphDriver.Put", {"ID": "c1-init"})
    client.ok("GraphDriver.CreateReadWrite", {"ID": "c1", "Parent": "c1-init"})
    assert client.ok("GraphDriver.Exists", {"ID": "c1"}) == {"Exists": True}
    root = Path(client.ok("GraphDriver.Get", {"ID": "c1"})["Dir"])
    assert (root / "etc/hosts").read_text() == "127.0.0.1 localhost\n"
    assert (root / "etc/os-release").read_text() == "lamina\n"
    (root / "etc/motd").unlink()
    (root / "new").write_text("x" * 100)
    changes = client.ok("GraphDriver.Changes", {"ID": "c1", "Parent": "c1-init"})["Changes"]
    assert changes == [{"Path": "/etc", "Kind": 0}, {"Path": "/etc/motd", "Kind": 2},
                       {"Path": "/new", "Kind": 1}]
    assert client.ok("GraphDriver.DiffSize", {"ID": "c1", "Parent": "c1-init"}) == {"Size": 100}
    assert "dir" in client.ok("GraphDriver.GetMetadata", {"ID": "c1"})["Metadata"]
    # `docker commit`: the container's Diff, applied as a new image layer
    resp = client.diff("c1", "c1-init")
    assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
    tar = resp.read()
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        assert sorted(tf.getnames()) == ["etc", "etc/.wh.motd", "new"]
    client.ok("GraphDriver.Create", {"ID": "img2", "Parent": "base"})
    assert client.apply("img2", "base", chunks_of(tar, [7, 512, 4096])) == (200, {"Size": 100})
    client.ok("GraphDriver.Put", {"ID": "c1"})
    for id in ("c1", "c1-init", "img2"):
        client.ok("GraphDriver.Remove", {"ID": id})
        assert client.ok("GraphDriver.Exists", {"ID": id}) == {"Exists": False}


def test_errors_carry_lamina_messages(client: Client) -> None:
    assert "layer nope: no such layer" in client.err("GraphDriver.Get", {"ID": "nope"})
    assert "invalid layer id" in client.err("GraphDriver.Create", {"ID": "../x"})
    assert "exists already" in client.err("GraphDriver.Create", {"ID": "base"})
    assert "layer nope" in client.err("GraphDriver.Create", {"ID": "y", "Parent": "nope"})
    # StorageOpt reaches the driver, which refuses a quota on a read-only layer
    assert "size" in client.err("GraphDriver.Create",
                                {"ID": "z", "Parent": "base", "StorageOpt": {"size": "10M"}})
    assert "must be a string" in client.err("GraphDriver.Get", {"ID": 5})
    assert "not JSON" in client.err("GraphDriver.Exists", b"{")
    assert "not a JSON object" in client.err("GraphDriver.Exists", b"[]")
    assert "Diff" not in client.err("GraphDriver.Diff", {"ID": "nope"})  # an Err, not a tar
    client.err("GraphDriver.Nonesuch", {}, status=404)
    # as Docker's own drivers: removing what is not there succeeds; a bad id does not exist
    client.ok("GraphDriver.Remove", {"ID": "never-was"})
    assert client.ok("GraphDriver.Exists", {"ID": "../x"}) == {"Exists": False}
    # the connection stays usable after every one of them
    assert client.ok("GraphDriver.Exists", {"ID": "base"}) == {"Exists": True}


def test_failed_apply_answers_and_keeps_the_connection(client: Client, tmp_path: Path) -> None:
    hostile = tb.build([tb.file("ok", "fine"), tb.file("../../escaped", "no")])
    status, doc = client.apply("bad", "base", chunks_of(hostile, [100]))
    assert status == 500 and "bad" in doc["Err"], doc
    assert client.ok("GraphDriver.Exists", {"ID": "bad"}) == {"Exists": False}
    status, doc = client.apply("bad2", "base", hostile)  # with a Content-Length
    assert status == 500
    assert client.ok("GraphDriver.Exists", {"ID": "base"}) == {"Exists": True}


def test_streams_both_ways_in_bounded_memory(client: Client, serve: Serve) -> None:
    assert client.apply("big", "", big_layer()) == (200, {"Size": BIG})
    assert serve.peak_rss() < RSS_LIMIT, f"serve peaked at {serve.peak_rss() // MB} MiB"
    resp = client.diff("big")
    assert resp.status == 200
    head = resp.read(512)
    assert head[:3] == b"big"
    total = len(head)
    while chunk := resp.read(MB):
        total += len(chunk)
    assert total >= BIG + 512
    assert serve.peak_rss() < RSS_LIMIT, f"serve peaked at {serve.peak_rss() // MB} MiB"
    client.ok("GraphDriver.Remove", {"ID": "big"})


def test_concurrent_calls_share_one_driver(serve: Serve) -> None:
    failures: list[str] = []

    def container(t: int) -> None:
        c = Client(serve.socket)
        try:
            for i in range(4):
                id = f"t{t}-{i}"
                c.ok("GraphDriver.CreateReadWrite", {"ID": id, "Parent": "base"})
                root = Path(c.ok("GraphDriver.Get", {"ID": id})["Dir"])
                (root / f"f{t}").write_text(id)
                assert c.ok("GraphDriver.Changes", {"ID": id, "Parent": "base"})["Changes"] == [
                    {"Path": f"/f{t}", "Kind": 1}]
                c.ok("GraphDriver.Put", {"ID": id})
                c.ok("GraphDriver.Remove", {"ID": id})
        except Exception as e:  # reported below
            failures.append(f"{t}: {e!r}")

    def image() -> None:
        c = Client(serve.socket)
        layer = tb.build([tb.file(f"d/{i}", PATTERN) for i in range(24)])
        try:
            assert c.apply("parallel", "base", chunks_of(layer, [MB])) == (200, {"Size": 24 * MB})
            c.ok("GraphDriver.Remove", {"ID": "parallel"})
        except Exception as e:
            failures.append(f"image: {e!r}")

    threads = [threading.Thread(target=container, args=(t,)) for t in range(6)]
    threads.append(threading.Thread(target=image))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert failures == []
    assert serve.home is not None and mounts_under(serve.home) == []


def test_id_maps_from_init(backend: str, tmp_path: Path) -> None:
    server = Serve(tmp_path / "maps.sock", tmp_path / "serve.log", backend=backend)
    server.start()
    try:
        c = Client(server.socket)
        ranges = [{"container_id": 0, "host_id": 100000, "size": 65536}]
        c.ok("GraphDriver.Init", {"Home": str(tmp_path / "home"), "Opts": [],
                                  "UIDMaps": ranges, "GIDMaps": ranges})
        status, doc = c.apply("l", "", tb.build([tb.file("f", "x", uid=0, gid=0)]))
        assert status == 200, doc
        root = Path(c.ok("GraphDriver.Get", {"ID": "l"})["Dir"])
        st = os.lstat(root / "f")
        assert (st.st_uid, st.st_gid) == (100000, 100000)
        c.ok("GraphDriver.Put", {"ID": "l"})
    finally:
        server.stop()
        remove_plugin_files(server.socket)


def test_sigterm_unmounts_and_restart_resumes(backend: str, tmp_path: Path) -> None:
    sock, home = tmp_path / "resume.sock", tmp_path / "home"
    server = Serve(sock, tmp_path / "serve.log", backend=backend)
    server.start()
    try:
        c = Client(sock)
        assert "not initialized" in c.err("GraphDriver.Create", {"ID": "a"})
        assert "without a Home" in c.err("GraphDriver.Init", {"Home": ""})
        c.ok("GraphDriver.Init", {"Home": str(home), "Opts": None})
        assert json.loads(sock.with_name("resume.sock.init.json").read_text())["Home"] == str(home)
        assert c.apply("a", "", tb.build(BASE))[0] == 200
        c.ok("GraphDriver.CreateReadWrite", {"ID": "ctr", "Parent": "a"})
        c.ok("GraphDriver.Get", {"ID": "ctr"})
        assert server.stop(timeout=30) == 0
        assert not sock.exists()
        assert mounts_under(home) == []
        # restarted without Init (Docker calls Init only when it starts): the same store
        server.start()
        c = Client(sock)
        assert c.ok("GraphDriver.Exists", {"ID": "ctr"}) == {"Exists": True}
        root = Path(c.ok("GraphDriver.Get", {"ID": "ctr"})["Dir"])
        assert (root / "etc/os-release").read_text() == "lamina\n"
        c.ok("GraphDriver.Put", {"ID": "ctr"})
        c.ok("GraphDriver.Init", {"Home": str(home)})  # Docker restarting: the same store
        assert c.ok("GraphDriver.Exists", {"ID": "a"}) == {"Exists": True}
    finally:
        server.stop()
        remove_plugin_files(sock)
    assert mounts_under(home) == []


def test_shutdown_lets_a_running_apply_finish(backend: str, tmp_path: Path) -> None:
    sock, home = tmp_path / "drain.sock", tmp_path / "home"
    server = Serve(sock, tmp_path / "serve.log", home=home, backend=backend)
    server.start()
    go_on = threading.Event()
    answer: list[tuple[int, dict[str, Any]]] = []

    def slow_layer() -> Iterator[bytes]:
        data = tb.build([tb.file("f", PATTERN)])
        yield data[:4096]
        go_on.wait(60)
        yield data[4096:]

    def upload() -> None:
        answer.append(Client(sock).apply("late", "", slow_layer()))

    try:
        uploader = threading.Thread(target=upload)
        uploader.start()
        time.sleep(0.5)
        os.kill(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sock.exists(), "still accepting while stopping"
        time.sleep(0.5)
        assert server.proc is not None and server.proc.poll() is None, "did not wait for the call"
        go_on.set()
        uploader.join(60)
        assert answer == [(200, {"Size": MB})]
        assert server.proc.wait(30) == 0  # and then it stops by itself
        server.start()
        assert Client(sock).ok("GraphDriver.Exists", {"ID": "late"}) == {"Exists": True}
    finally:
        go_on.set()
        server.stop()
        remove_plugin_files(sock)


def test_stale_and_live_sockets(backend: str, tmp_path: Path) -> None:
    sock, home = tmp_path / "s.sock", tmp_path / "home"
    server = Serve(sock, tmp_path / "serve.log", home=home, backend=backend)
    server.start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "lamina", "--home", str(home), "serve", "--socket", str(sock)],
            capture_output=True, text=True, timeout=60, cwd=REPO)
        assert second.returncode == 1
        assert "another server is listening" in second.stderr
        assert server.proc is not None
        server.proc.kill()  # leaves its socket behind
        server.proc.wait()
        assert sock.exists()
        server.start()  # takes the stale socket over
        assert Client(sock).ok("Plugin.Activate") == {"Implements": ["GraphDriver"]}
    finally:
        server.stop()
        remove_plugin_files(sock)


def test_a_home_that_cannot_be_opened_is_an_error(tmp_path: Path) -> None:
    sock = tmp_path / "bad.sock"
    (tmp_path / "file").write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "lamina", "--home", str(tmp_path / "file" / "home"), "serve",
         "--socket", str(sock)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 1
    assert done.stderr.startswith("lamina: ") and "home" in done.stderr
    assert not sock.exists()

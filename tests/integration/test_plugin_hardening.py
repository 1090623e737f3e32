"""``lamina serve`` against hostile and careless clients (issue 15): a real server process,
driven over its socket with raw bytes.

- Every request it cannot take is answered ``{"Err": …}`` as JSON with a 4xx/5xx status,
  and the server goes on serving: two ``Content-Length`` headers, chunk sizes ``-2`` and
  ``zz``, ``GET`` and ``PUT``, JSON nested 100,000 deep, heads too large or malformed.
- Timeouts: a head that stops coming is answered 408 and closed; a chunked ``ApplyDiff``
  that stops is answered 408, its apply is aborted and the lock of its id is released,
  so a ``Create`` of that id proceeds.
- Bounds: with its one worker busy and its one queue place taken, a call is answered 503
  at once; under a flood of thousands of connections that send half a head, a well-formed
  ``Status`` is answered within a second, with a few threads and bounded memory (the
  figures are printed).
- Sizes a caller gets wrong (``size=20T``, ``size=99999999999999999999999P``) are an
  ``Err`` that names the problem, not an internal error.
- ``fuzz/plugin_http.py`` (atheris) for a bounded number of inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lamina.frontends.docker.wire import Limits
from tests import tarbuild as tb
from tests.conftest import lacking
from tests.integration.engine import REPO, Serve, remove_plugin_files
from tests.integration.test_plugin import PATTERN, Client

pytestmark = pytest.mark.root

BACKENDS = ["overlay", "vfs"]  # for the tests that take a backend (the others use vfs)

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
STATUS = b"POST /GraphDriver.Status HTTP/1.1\r\nHost: lamina\r\nContent-Length: 2\r\n\r\n{}"


@contextlib.contextmanager
def serving(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch,
            backend: str = "vfs", **limits: float) -> Iterator[Serve]:
    """A ``lamina serve --home`` with the given ``Limits`` (through ``LAMINA_SERVE_*``)."""
    with monkeypatch.context() as env:
        for key, value in {"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT,
                           **limits}.items():
            env.setenv(f"LAMINA_SERVE_{key.upper()}", str(value))
        server = Serve(tmp_path / f"{name}.sock", tmp_path / f"{name}.log",
                       home=tmp_path / f"{name}-home", backend=backend)
        server.start()
    try:
        yield server
    finally:
        server.stop()
        remove_plugin_files(server.socket)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    work = tmp_path_factory.mktemp("hardening")
    with pytest.MonkeyPatch.context() as mp, serving(work, "h", mp) as server:
        assert Client(server.socket).apply("base", "", tb.build([tb.file("f", "x")]))[0] == 200
        yield server


def connect(path: Path, timeout: float = 10) -> socket.socket:
    """A connection as most clients make it: ``connect`` waits while the backlog is full."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(timeout)
    return s


_readers: dict[int, Any] = {}


def response(s: socket.socket) -> tuple[int, dict[str, str], Any]:
    """The next response on ``s``: status, headers (lower-cased) and its JSON body.

    One buffered reader a socket, kept for its next responses (pipelined ones may have
    arrived with this one).
    """
    f = _readers.get(id(s))
    if f is None or f.closed:
        f = _readers[id(s)] = s.makefile("rb")
    line = f.readline(65537)
    assert line.startswith(b"HTTP/1.1 "), line
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline(65537)) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers["content-length"]))
    return status, headers, json.loads(body)


def exchange(path: Path, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], Any]:
    with connect(path, timeout) as s:
        s.sendall(data)
        return response(s)


def status_latency(path: Path) -> float:
    """Seconds for a well-formed ``Status`` on a new connection (which it must answer)."""
    t0 = time.monotonic()
    status, _, doc = exchange(path, STATUS, timeout=30)
    took = time.monotonic() - t0
    assert status == 200 and "Status" in doc, doc
    return took


def post(call: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"POST /{call} HTTP/1.1\r\nHost: lamina\r\n{head}\r\n".encode() + body


DEEP = b"[" * 100_000 + b"]" * 100_000
BAD: dict[str, tuple[bytes, int, str]] = {
    "two Content-Length": (post("GraphDriver.Status", b"{}", "Content-Length: 2",
                                "Content-Length: 2"), 400, "more than one Content-Length"),
    "Content-Length and chunked": (post("GraphDriver.Status", b"2\r\n{}\r\n0\r\n\r\n",
                                        "Content-Length: 2", "Transfer-Encoding: chunked"),
                                   400, "both Content-Length and Transfer-Encoding"),
    "negative Content-Length": (post("GraphDriver.Status", b"{}", "Content-Length: -2"),
                                400, "bad Content-Length"),
    "chunk size -2": (post("GraphDriver.ApplyDiff?id=neg&parent=", b"-2\r\nab\r\n0\r\n\r\n",
                           "Transfer-Encoding: chunked"), 400, "bad chunk size '-2'"),
    "chunk size zz": (post("GraphDriver.ApplyDiff?id=zz&parent=", b"zz\r\nab\r\n0\r\n\r\n",
                           "Transfer-Encoding: chunked"), 400, "bad chunk size 'zz'"),
    "chunk size zz in a JSON call": (post("GraphDriver.Status", b"zz\r\n{}\r\n0\r\n\r\n",
                                          "Transfer-Encoding: chunked"), 400, "bad chunk size"),
    "no CRLF after a chunk": (post("GraphDriver.Status", b"2\r\n{}XX0\r\n\r\n",
                                   "Transfer-Encoding: chunked"), 400, "bad chunked framing"),
    "gzip coding": (post("GraphDriver.Status", b"", "Transfer-Encoding: gzip"), 501,
                    "transfer coding 'gzip' is not supported"),
    "GET": (b"GET /Plugin.Activate HTTP/1.1\r\nHost: lamina\r\n\r\n", 405, "POST only, not GET"),
    "PUT": (b"PUT /GraphDriver.Create HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405,
            "POST only, not PUT"),
    "HTTP/2.0": (b"POST /Plugin.Activate HTTP/2.0\r\n\r\n", 505, "not supported"),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400,
                "bad request line"),
    "no colon": (b"POST /Plugin.Activate HTTP/1.1\r\nHost lamina\r\n\r\n", 400,
                 "bad header line"),
    "folded header": (b"POST /Plugin.Activate HTTP/1.1\r\nX-A: 1\r\n  2\r\n\r\n", 400,
                      "folded"),
    "huge head": (post("Plugin.Activate", b"", "X-Big: " + "a" * 20_000), 431, "request head"),
    "JSON nested 100,000 deep": (post("GraphDriver.Status", DEEP,
                                      f"Content-Length: {len(DEEP)}"), 500, "nested 100000 deep"),
    "JSON object nested deep": (post("GraphDriver.Exists", b'{"a":' * 5000 + b"1" + b"}" * 5000,
                                     "Content-Length: 30001"), 500, "nested 5000 deep"),
    "JSON over 1 MiB": (post("GraphDriver.Exists", b" " * (1 << 20) + b"{}",
                             f"Content-Length: {(1 << 20) + 2}"), 413, "over 1048576 bytes"),
    "no such call": (post("GraphDriver.Nonesuch", b"{}", "Content-Length: 2"), 404,
                     "no call 'GraphDriver.Nonesuch'"),
}


@pytest.mark.parametrize("case", BAD.keys())
def test_a_bad_request_is_an_err_and_the_server_serves_on(serve: Serve, case: str) -> None:
    data, want_status, want = BAD[case]
    t0 = time.monotonic()
    status, headers, doc = exchange(serve.socket, data)
    took = time.monotonic() - t0
    assert status == want_status, (status, doc)
    assert headers["content-type"] == "application/vnd.docker.plugins.v1.2+json"
    assert set(doc) == {"Err"} and want in doc["Err"], doc
    assert took < 1.5, f"answered in {took:.1f} s"
    assert status_latency(serve.socket) < 1


def test_calls_on_one_connection_pipelined_and_with_expect(serve: Serve) -> None:
    with connect(serve.socket) as s:
        s.sendall(post("Plugin.Activate", b"", "Content-Length: 0") + STATUS + b"\r\n"
                  + post("GraphDriver.Exists", b'{"ID": "base"}', "Content-Length: 14"))
        assert response(s)[2] == {"Implements": ["GraphDriver"]}
        assert "Status" in response(s)[2]
        assert response(s)[2] == {"Exists": True}
        s.sendall(post("GraphDriver.Exists", b"", "Content-Length: 14",
                       "Expect: 100-continue"))
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b'{"ID": "nope"}')
        assert response(s)[2] == {"Exists": False}
        # a chunked JSON body with extensions and trailers, as HTTP allows
        body = b'4;x=y\r\n{"ID\r\na\r\n": "base"}\r\n0\r\nT: 1\r\n\r\n'
        s.sendall(post("GraphDriver.Exists", body, "Transfer-Encoding: chunked"))
        assert response(s)[2] == {"Exists": True}


@pytest.mark.slow
def test_a_head_that_stops_is_answered_408(serve: Serve) -> None:
    with connect(serve.socket) as s:
        s.sendall(b"POST /GraphDriver.Status HTTP/1.1\r\nHost: la")
        t0 = time.monotonic()
        status, _, doc = response(s)
        took = time.monotonic() - t0
        assert status == 408 and "no whole request head" in doc["Err"], doc
        assert HEADER_TIMEOUT - 0.5 < took < HEADER_TIMEOUT + 1.5, took
        assert s.recv(1) == b""  # and closed


@pytest.mark.slow
def test_a_stalled_apply_gives_its_lock_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             backend: str) -> None:
    with serving(tmp_path, "stall", monkeypatch, backend=backend) as server:
        home = server.home
        assert home is not None
        tar = tb.build([tb.file("a", PATTERN), tb.file("b", PATTERN)])
        with connect(server.socket, timeout=30) as s:
            s.sendall(post("GraphDriver.ApplyDiff?id=stalled&parent=", b"",
                           "Transfer-Encoding: chunked"))
            part = tar[:300_000]
            s.sendall(b"%x\r\n%b\r\n" % (len(part), part))  # and then nothing
            time.sleep(0.5)
            # Create of the same id waits for the apply's lock, which the timeout frees
            created: list[tuple[float, str]] = []

            def create() -> None:
                t0 = time.monotonic()
                c = Client(server.socket)
                status, doc = c.call("GraphDriver.Create", {"ID": "stalled"})
                created.append((time.monotonic() - t0, f"{status} {doc}"))

            creator = threading.Thread(target=create)
            creator.start()
            t0 = time.monotonic()
            status, _, doc = response(s)
            took = time.monotonic() - t0
            assert status == 408 and "stopped coming" in doc["Err"], doc
            assert took < BODY_TIMEOUT + 1.5, took
        creator.join(30)
        assert created and created[0][1] == "200 {}", created
        assert created[0][0] < BODY_TIMEOUT + 3, created
        c = Client(server.socket)
        assert c.ok("GraphDriver.Exists", {"ID": "stalled"}) == {"Exists": True}
        assert c.ok("GraphDriver.DiffSize", {"ID": "stalled"}) == {"Size": 0}  # nothing of it
        assert not any((home / "staging").iterdir()), "the aborted apply left its staging"
        # and a whole apply into it now works
        status, doc = c.apply("stalled", "", tar)
        assert status == 200, doc
        assert status_latency(server.socket) < 1


@pytest.mark.slow
def test_a_full_queue_is_answered_503_at_once(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(tmp_path, "q", monkeypatch, workers=1, backlog=1, body_timeout=4) as server:
        with connect(server.socket, timeout=30) as busy, connect(server.socket) as queued:
            busy.sendall(post("GraphDriver.ApplyDiff?id=slow&parent=", b"5\r\nhello\r\n",
                              "Transfer-Encoding: chunked"))  # holds the one worker
            time.sleep(0.5)
            queued.sendall(STATUS)  # takes the one place in the queue
            time.sleep(0.5)
            t0 = time.monotonic()
            status, _, doc = exchange(server.socket, STATUS)
            took = time.monotonic() - t0
            assert status == 503 and "busy" in doc["Err"], doc
            assert took < 0.5, took
            assert response(queued)[0] == 200  # once the worker is free
            assert response(busy)[0] == 408
        assert status_latency(server.socket) < 1


@pytest.mark.parametrize("size", ["20T", "99999999999999999999999P"])
def test_a_size_too_large_is_an_err_that_names_it(serve: Serve, size: str) -> None:
    err = Client(serve.socket).err("GraphDriver.CreateReadWrite",
                                   {"ID": "big", "Parent": "base", "StorageOpt": {"size": size}})
    assert "internal error" not in err
    assert "size" in err and ("too large" in err or "more than" in err), err
    assert Client(serve.socket).ok("GraphDriver.Exists", {"ID": "big"}) == {"Exists": False}


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


FLOOD = 12_000
PARTIAL = b"POST /GraphDriver.Status HTTP/1.1\r\nHost: lam"


@pytest.mark.slow
def test_a_slow_client_flood_does_not_starve_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """12,000 connections that each send half a head, as fast as one client can open them,
    while another asks for ``Status`` every 50 ms, and then after the flood has closed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    flood_size = min(FLOOD, hard - 500)
    if soft < flood_size + 500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (flood_size + 500, hard))
    # the default timeouts (a head gets 10 s): the flood is shed by the connection cap
    with serving(tmp_path, "flood", monkeypatch, header_timeout=10, body_timeout=60) as server:
        pid = server.pid
        warm = status_latency(server.socket)  # the workers have started, the driver answered
        threads_before, rss_before = _threads(pid), _rss(pid)
        flood: list[socket.socket] = []
        failed: list[str] = []
        done = threading.Event()

        def flooder() -> None:
            try:
                for _ in range(flood_size):
                    s = connect(server.socket)
                    flood.append(s)
                    with contextlib.suppress(OSError):  # it may be shed already
                        s.sendall(PARTIAL)
            except OSError as e:
                failed.append(repr(e))
            finally:
                done.set()

        latencies: list[float] = []
        peak_threads = peak_fds = peak_rss = 0
        t0 = time.monotonic()
        thread = threading.Thread(target=flooder)
        thread.start()
        try:
            while not done.is_set():
                latencies.append(status_latency(server.socket))
                peak_threads = max(peak_threads, _threads(pid))
                peak_fds = max(peak_fds, _fds(pid))
                peak_rss = max(peak_rss, _rss(pid))
                done.wait(0.05)
            thread.join()
            flooded = time.monotonic() - t0
            for _ in range(5):  # with every connection of the flood still open
                latencies.append(status_latency(server.socket))
            shed = 0
            for s in flood:
                s.setblocking(False)
                try:
                    if s.recv(1) == b"":
                        shed += 1
                except BlockingIOError:
                    pass
                except OSError:
                    shed += 1
            held = _fds(pid)
        finally:
            for s in flood:
                s.close()
        t1 = time.monotonic()
        after = [status_latency(server.socket) for _ in range(5)]
        after_took = time.monotonic() - t1
        figures = (
            f"\nslow-client flood: {len(flood)} connections of {flood_size} opened in"
            f" {flooded:.1f} s, each with half a head ({shed} closed by the server to make"
            f" room, {failed or 'no'} errors);"
            f"\n  server: {peak_threads} threads at most during the flood ({threads_before}"
            f" before); {peak_fds} open files at most ({held} at the end); RSS"
            f" {rss_before / 2**20:.0f} MiB before, {peak_rss / 2**20:.0f} MiB at most;"
            f"\n  Status latency: {warm * 1000:.0f} ms before the flood; during it max"
            f" {max(latencies) * 1000:.0f} ms, median"
            f" {sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms ({len(latencies)} calls);"
            f" just after it closed, max {max(after) * 1000:.0f} ms"
            f" (5 calls in {after_took:.2f} s)"
        )
        with capsys.disabled():
            print(figures)
        assert not failed, figures
        assert max(latencies) < 1.0, figures
        assert max(after) < 1.0, figures
        assert peak_threads <= Limits().workers + 4, figures  # the pool, the loop, main
        assert peak_rss < rss_before + 64 * 2**20, figures
        assert peak_fds < Limits().max_connections + 200, figures
        assert shed > 0, figures  # more than the cap: the oldest went


# --- atheris --------------------------------------------------------------------------------


@pytest.mark.slow
def test_atheris_plugin_http_runs_clean(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``fuzz/plugin_http.py`` for a bounded number of inputs from its seeds: no finding."""
    execs = run_atheris("plugin_http", 20_000, tmp_path)
    with capsys.disabled():
        print(f"\natheris plugin_http: {execs} inputs, no finding")


def run_atheris(target: str, runs: int, tmp_path: Path, max_len: int = 65536) -> int:
    """``fuzz/TARGET.py`` from its seed corpus for ``runs`` inputs; the number executed."""
    try:
        import atheris  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        lacking("atheris (the dev extra installs it on x86_64)")
    script = REPO / "fuzz" / f"{target}.py"
    corpus = tmp_path / "corpus"
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "LAMINA_FUZZ_WORK": str(work)}
    subprocess.run([sys.executable, str(script), "-seeds", str(corpus)], check=True, env=env)
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(corpus), f"-runs={runs}", f"-max_len={max_len}",
             "-rss_limit_mb=2048", "-timeout=20", "-print_final_stats=1",
             f"-artifact_prefix={tmp_path}/"],
            capture_output=True, text=True, env=env, timeout=900, check=False,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    assert found is not None and int(found.group(1)) >= runs, proc.stderr[-2000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-",
                                                                        "timeout-"))]
    return int(found.group(1))

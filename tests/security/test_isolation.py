"""The isolated child of ``apply_diff`` (:mod:`lamina.archive.isolate`).

What the child can see (only the layer, the lower layers read-only, its own fds), that
nothing is loaded from the layer after the switch (CVE-2014-9357, CVE-2019-14271), that its
errors come back as the same ``LaminaError``, that the fork server survives its own death
and its caller's, and what a child costs per apply.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import lamina
from lamina import errors, progress, registry
from lamina.archive import isolate
from lamina.host import jail, libc
from tests import tarbuild as tb
from tests.archive.test_hostile import MALFORMED
from tests.conftest import DIR_LAYERS, Stores
from tests.layers import apply, names, read

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


def test_the_child_sees_only_the_layer(tmp_path: Path) -> None:
    layer = tmp_path / "staged" / "diff"
    lowers = [tmp_path / f"lower{i}" for i in range(3)]
    layer.mkdir(parents=True)
    for lower in lowers:
        lower.mkdir()
        (lower / "f").write_text("lower")
    host = ["/etc/passwd", "/usr/lib", "/lib", "/bin/sh", "/etc/nsswitch.conf", "/proc/1",
            "/proc/self/mountinfo", "/proc/self/root", "/sys", "/dev/null", "/tmp",
            sys.executable, str(REPO), str(tmp_path), str(layer), str(lowers[0])]
    seen = isolate.probe(layer, [str(p) for p in lowers], host, module="lamina.frontends.cli")
    assert seen["root"] == ["layer", "lower", "proc"]
    assert seen["layer"] == "/layer"
    assert seen["lowers"] == ["/lower/0", "/lower/1", "/lower/2"]
    assert seen["visible"] == [], f"the child sees host paths: {seen['visible']}"
    assert seen["layer_writable"] is True
    assert seen["root_writable"] is False
    assert seen["lowers_writable"] == [False, False, False]
    assert seen["imports"] == "refused"
    kept = sum(1 << cap for cap in jail.KEPT_CAPABILITIES) & jail.capabilities(permitted=True)
    assert seen["capabilities"] == kept
    assert not (layer / ".lamina-probe").exists()
    assert os.listdir(layer) == []
    assert (tmp_path / "staged").is_dir() and os.listdir(tmp_path / "staged") == ["diff"]


def test_nothing_of_the_child_stays_mounted(stores: Stores, home: Path) -> None:
    """The child's mounts live in its namespace only: none reaches the host's."""
    drv = stores.open()
    apply(drv, "a", None, [tb.file("f", b"f")])
    apply(drv, "b", "a", [tb.file("g", b"g")])
    mine = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if " - tmpfs lamina " in line or str(home) in line]
    assert mine == []


@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd", "bzip2"])
def test_no_decompressor_or_library_from_the_layer(
    stores: Stores, tmp_path: Path, compression: str
) -> None:
    """CVE-2014-9357 (Docker ran ``xz`` inside the chroot on a layer), CVE-2019-14271
    (``docker cp`` loaded ``libnss`` from the container): a parent layer full of hostile
    decompressors, loader configuration and NSS modules; the next layer, compressed, is
    applied without running or loading any of them."""
    drv = stores.open()
    canary = tmp_path / "ran"
    script = f"#!/bin/sh\ntouch {canary}\nexit 1\n".encode()
    hostile = [tb.directory(d) for d in ("bin", "usr", "usr/bin", "etc", "lib", "usr/lib",
                                         "lib/x86_64-linux-gnu", "usr/lib/python3.11")]
    hostile += [tb.file(f"{d}/{tool}", script, mode=0o755)
                for d in ("bin", "usr/bin")
                for tool in ("xz", "unxz", "gzip", "gunzip", "unpigz", "zstd", "bzip2", "sh")]
    hostile += [
        tb.file("etc/ld.so.preload", f"/lib/evil.so\n{canary}\n".encode()),
        tb.file("etc/nsswitch.conf", b"passwd: evil\ngroup: evil\n"),
        tb.file("lib/x86_64-linux-gnu/libnss_evil.so.2", b"\x7fELF not really"),
        tb.file("lib/x86_64-linux-gnu/libc.so.6", b"\x7fELF not really"),
        tb.file("lib/x86_64-linux-gnu/liblzma.so.5", b"\x7fELF not really"),
        tb.file("usr/lib/python3.11/json.py", f"open('{canary}', 'w')\n".encode()),
        tb.file("sitecustomize.py", f"open('{canary}', 'w')\n".encode()),
    ]
    apply(drv, "base", None, hostile)
    data = tb.build([tb.file("new", b"new", uid=1000, gid=1000), tb.directory("usr/bin")])
    packed = {"gzip": tb.gzipped, "zstd": tb.zstd_compressed,
              "xz": _xz, "bzip2": _bzip2}[compression](data)
    assert drv.apply_diff("next", "base", io.BytesIO(packed)) == 3
    assert read(drv, "next", "new") == b"new"
    assert not canary.exists()


def _xz(data: bytes) -> bytes:
    import lzma

    return lzma.compress(data)


def _bzip2(data: bytes) -> bytes:
    import bz2

    return bz2.compress(data)


CASES = {
    **MALFORMED,
    "dot-dot": tb.build([tb.file("../x", b"x")]),
    "root-symlink": tb.build([tb.symlink(".", "/tmp")]),
    "whiteout-dot": tb.build([tb.file("a/.wh..", b"")]),
    "hardlink-missing": tb.build([tb.hardlink("x", "no/such/file")]),
    "hardlink-dir": tb.build([tb.directory("d"), tb.hardlink("x", "d")]),
    "symlink-loop": tb.build([tb.symlink("a", "b/x"), tb.symlink("b", "a/y"), tb.file("a/z")]),
    "name-too-long": tb.build([tb.file("n" * 300, b"x")]),
    "too-deep": tb.build([tb.file("d/" * 600 + "f", b"x")]),
    "unmapped-owner": tb.build([tb.file("f", b"x", uid=7_000_000)]),
    "zero-device": tb.build([tb.chardev("c", 0, 0)]),
}


@pytest.mark.parametrize("data", CASES.values(), ids=CASES.keys())
def test_errors_come_back_the_same(
    stores: Stores, backend: str, monkeypatch: pytest.MonkeyPatch, data: bytes
) -> None:
    """The child's error is raised again in the caller as the same class with the same
    message as the inline apply raises (and the decompressor's errors, which happen in
    the caller, too)."""
    drv = stores.open(uid_map=[(0, 0, 65536)], gid_map=[(0, 0, 65536)])
    seen = []
    for mode in ("child", "inline"):
        if mode == "inline":
            monkeypatch.setenv(isolate.NOREEXEC, "1")
        else:
            monkeypatch.delenv(isolate.NOREEXEC, raising=False)
        try:
            drv.apply_diff(f"l-{mode}", None, io.BytesIO(data))
        except errors.LaminaError as e:
            seen.append((type(e), str(e).replace(f"l-{mode}", "ID"), e.path))
        else:
            seen.append((None, names(drv, f"l-{mode}"), None))
    assert seen[0] == seen[1]


def test_a_child_that_cannot_isolate_is_unsupported(tmp_path: Path) -> None:
    root = tmp_path / "staged" / "missing"
    (tmp_path / "staged").mkdir()
    with pytest.raises(errors.Unsupported, match="cannot isolate the apply"):
        isolate.apply_layer(root, io.BytesIO(tb.END))


def test_progress_reaches_the_caller(stores: Stores) -> None:
    drv = stores.open()
    data = tb.build([tb.file(f"f{i}", os.urandom(3000)) for i in range(300)])
    done = [0, 0]

    def report(nbytes: int, nentries: int) -> None:
        done[0] += nbytes
        done[1] += nentries

    with progress.reporting(report):
        drv.apply_diff("l", None, io.BytesIO(data))
    assert done == [len(data), 300]


def test_threads_apply_at_once(stores: Stores) -> None:
    """The plugin server applies on several threads: one child each, through one server."""
    drv = stores.open()
    apply(drv, "base", None, [tb.file("base", b"base")])
    failures: list[BaseException] = []

    def work(i: int) -> None:
        try:
            data = tb.build([tb.file(f"t{i}/f{j}", os.urandom(20_000)) for j in range(40)])
            drv.apply_diff(f"t{i}", "base", io.BytesIO(data))
            assert names(drv, f"t{i}") == {"/base", f"/t{i}"} | {
                f"/t{i}/f{j}" for j in range(40)}
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def test_the_fork_server_comes_back(stores: Stores) -> None:
    drv = stores.open()
    apply(drv, "a", None, [tb.file("f", b"f")])
    server = isolate._fork_server()
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    apply(drv, "b", None, [tb.file("g", b"g")])
    assert isolate._fork_server().proc.pid != server.proc.pid
    isolate.shutdown()
    apply(drv, "c", "b", [tb.file("h", b"h")])
    assert names(drv, "c") == {"/g", "/h"}


CALLER = """
import sys, time, lamina
from lamina.archive import isolate
drv = lamina.open_driver(sys.argv[1], backend=sys.argv[2], options=sys.argv[4:])
tar = open(sys.argv[3], "rb").read()

class Slow:
    # Gives the tar 64 KiB a read; at the third read says the fork server's pid; then hangs.
    def __init__(self):
        self.reads = 0
    def read(self, n=-1):
        self.reads += 1
        if self.reads == 3:
            print(isolate._fork_server().proc.pid, flush=True)
        if self.reads > 3:
            time.sleep(3600)
        return tar[(self.reads - 1) * 65536 : self.reads * 65536]

drv.apply_diff("victim", None, Slow())
"""


def test_a_killed_caller_takes_its_child_along(stores: Stores, backend: str, home: Path,
                                               tmp_path: Path) -> None:
    """A caller killed mid-apply: its fork server and the child exit (nothing keeps writing
    into the staging directory the next opener sweeps)."""
    stores.close(stores.open())
    tar = tmp_path / "big.tar"
    tb.write(tar, [tb.file(f"f{i}", os.urandom(50_000)) for i in range(20)])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(isolate.NOREEXEC, None)
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(home), backend, str(tar),
                               *DIR_LAYERS.get(backend, ())], stdout=subprocess.PIPE, env=env)
    assert caller.stdout is not None
    try:
        server = int(caller.stdout.readline())
        children = _children(server)
        assert children, "no child at work"
    finally:  # killed whatever the asserts say: a failure leaves no caller behind
        caller.kill()
        caller.wait()
        caller.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in [server, *children]):
        time.sleep(0.01)
    assert not any(_alive(p) for p in [server, *children])
    drv = stores.open()
    assert not drv.exists("victim")
    assert os.listdir(home / "staging") == []


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(") ", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_inline_when_asked(stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    drv = stores.open()
    monkeypatch.setenv(isolate.NOREEXEC, "1")
    isolate.shutdown()
    apply(drv, "a", None, [tb.file("f", b"f")])
    assert isolate._server is None
    assert isolate.last_child_usage() is None


def test_overhead_per_apply(stores: Stores, backend: str, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """What the child costs: an apply of a small tar, isolated and inline (printed; the
    bound only catches a child that takes seconds instead of milliseconds)."""
    drv = stores.open()
    data = tb.build([tb.directory("etc"), tb.file("etc/motd", b"hi\n")])
    apply(drv, "warm", None, [])  # the fork server starts once per process

    def timed(mode: str, n: int = 30) -> float:
        if mode == "inline":
            monkeypatch.setenv(isolate.NOREEXEC, "1")
        else:
            monkeypatch.delenv(isolate.NOREEXEC, raising=False)
        took = []
        for i in range(n):
            start = time.perf_counter()
            drv.apply_diff(f"{mode}{i}", None, io.BytesIO(data))
            took.append(time.perf_counter() - start)
        return statistics.median(took) * 1000

    child, inline = timed("child"), timed("inline")
    with capsys.disabled():
        print(f"\n[{backend}] apply_diff of a 2-entry tar: isolated {child:.1f} ms, "
              f"inline {inline:.1f} ms, the child's cost {child - inline:.1f} ms")
    assert child - inline < 250


def test_the_childs_memory_is_reported(stores: Stores) -> None:
    drv = stores.open()
    apply(drv, "a", None, [tb.file("f", b"f" * 100_000)])
    usage = isolate.last_child_usage()
    assert usage is not None
    assert 0 < usage["maxrss_kb"] < 200_000
    assert usage["cpu_s"] >= 0


def test_isolation_of_a_non_root_caller(tmp_path: Path) -> None:
    """As another user, the child makes a user namespace that maps only that user, and the
    same root: the layer, writable, and nothing else."""
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        (base / "layer").mkdir()
        os.chown(base, 65534, 65534)
        os.chown(base / "layer", 65534, 65534)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the forked test child
            answer: dict[str, object] = {}
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                # A process that was root is not dumpable, and its /proc/self files stay
                # root's; one started as the user is dumpable.
                libc.load().prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
                root, _ = jail.enter_jail(str(base / "layer"), [])
                jail.drop_capabilities()
                with open(f"{root}/f", "w") as f:
                    f.write("f")
                os.chown(f"{root}/f", 65534, 65534)
                answer = {"root": sorted(os.listdir("/")), "uid": os.getuid()}
            except OSError as e:
                answer = {"error": str(e), "errno": e.errno}
            finally:
                os.write(write_end, json.dumps(answer).encode())
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            answer = json.loads(f.read())
        os.waitpid(pid, 0)
        if answer.get("errno") in (1, 22, 28) and "user namespace" in str(answer.get("error")):
            pytest.skip(f"no unprivileged user namespaces here: {answer['error']}")
        assert answer == {"root": ["layer", "proc"], "uid": 65534}
        st = os.lstat(base / "layer/f")
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    finally:
        shutil.rmtree(base)


def test_overlay_lowers_reach_the_child(tmp_path: Path) -> None:
    """Union-aware apply in the child: a parent's ``lib -> usr/lib`` symlink is followed
    and a parent file is copied up for a hard link, through the read-only lower mounts."""
    drvs = registry.backends()
    if "overlay" not in drvs:
        pytest.skip("no overlay backend")
    try:
        drv = lamina.open_driver(tmp_path / "home", backend="overlay",
                                 options=DIR_LAYERS["overlay"])
    except errors.Unsupported as e:
        pytest.skip(str(e))
    try:
        apply(drv, "base", None, [tb.directory("usr/lib"), tb.file("usr/lib/libc.so", b"c"),
                                  tb.symlink("lib", "usr/lib")])
        apply(drv, "mid", "base", [tb.file("other", b"o")])
        data = tb.build([tb.file("lib/new.so", b"n"),
                         tb.hardlink("libc-link", "usr/lib/libc.so")])
        drv.apply_diff("top", "mid", io.BytesIO(data))
        assert read(drv, "top", "usr/lib/new.so") == b"n"
        assert read(drv, "top", "libc-link") == b"c"
        diff = Path(drv.metadata("top")["UpperDir"])
        assert (diff / "usr/lib/new.so").is_file() and not (diff / "lib").exists()
        assert (diff / "usr/lib/libc.so").is_file()  # copied up to be linked
    finally:
        drv.cleanup()
        drv.close()

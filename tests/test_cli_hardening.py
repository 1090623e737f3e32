"""What a hostile or careless caller can do to the ``lamina`` command (issue 15, "Tracebacks
a caller can cause"): each case ends in one line ``lamina: …`` on standard error and exit
status 1 (with ``--json``, also ``{"error", "kind"}`` on standard output), never a traceback.

Every test runs the real command in a subprocess (``tests.test_cli.Lamina``).  Most need
root: the store chowns what it writes, and the non-root case drops root with ``setpriv``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

import lamina.host.mount
from tests.conftest import lacking
from tests.test_cli import BASE_TAR, Lamina, make_tar, terminal

__all__ = ["terminal"]  # the pseudo-terminal fixture of tests/test_cli.py, used here

pytestmark = pytest.mark.root

BACKENDS = ["vfs", "overlay"]
"""The backends of the tests that take ``backend`` (conftest parametrizes them)."""


class Store(Lamina):
    """:class:`Lamina` with a backend of choice (``vfs`` by default, as there)."""

    def __init__(self, home: Path, backend: str = "vfs") -> None:
        super().__init__(home)
        self.backend = backend

    def argv(self, *args: str) -> list[str]:
        argv = super().argv(*args)
        argv[argv.index("--backend") + 1] = self.backend
        return argv

    def sh(self, redirect: str, *args: str, input: bytes | None = None,
           ) -> subprocess.CompletedProcess[bytes]:
        """Run a command through ``sh`` with ``redirect`` (``<&-``, ``>&-``, ``>/dev/full``):
        its standard output is captured unless ``redirect`` sends it elsewhere."""
        return subprocess.run(
            ["sh", "-c", f'exec "$@" {redirect}', "sh", *self.argv(*args)],
            input=input, stdout=None if ">" in redirect else subprocess.PIPE,
            stderr=subprocess.PIPE, env=self.env, timeout=120,
        )


def one_line(proc: subprocess.CompletedProcess[bytes], *, names: str | None = None) -> str:
    """The one ``lamina: …`` line of a command that failed with exit 1 (naming ``names``)."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert err.startswith("lamina: ") and err.endswith("\n") and err.count("\n") == 1, err
    if names is not None:
        assert names in err, err
    return err


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "home")


@pytest.fixture
def image(store: Store) -> Store:
    """A store with ``base`` and ``app`` (on ``base``)."""
    store.run("apply", "base", input=BASE_TAR)
    store.run("apply", "app", "--parent", "base", input=make_tar({"app/bin": b"app\n"}))
    return store


# --- closed and full standard streams ------------------------------------------------------


def test_apply_from_closed_stdin(store: Store) -> None:
    one_line(store.sh("<&-", "apply", "x", "-"), names="layer x")
    store.run("exists", "x", code=1)


def test_ls_to_closed_stdout(image: Store) -> None:
    one_line(image.sh(">&-", "ls"), names="standard output is closed")


def test_closed_stdout_refuses_before_writing(image: Store) -> None:
    # A command that prints its result is refused before it changes anything ...
    one_line(image.sh(">&-", "--json", "rm", "app"))
    image.run("exists", "app")
    one_line(image.sh(">&-", "apply", "more", "-", input=make_tar({"f": b"x"})))
    image.run("exists", "more", code=1)
    # ... one that prints nothing just runs.
    proc = image.sh(">&-", "rm", "app")
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    image.run("exists", "app", code=1)


def test_diff_to_a_full_disk(image: Store, tmp_path: Path) -> None:
    one_line(image.sh(">/dev/full", "diff", "app"), names="layer app")
    one_line(image.sh(">/dev/full", "ls"), names="No space left on device")
    one_line(image.sh(">/dev/full", "--json", "ls"))
    # -o onto a full device: its own node, which a failed diff must not remove.
    full = tmp_path / "full"
    subprocess.run(["mknod", "-m", "666", str(full), "c", "1", "7"], check=True)
    proc = image.run("diff", "app", "-o", str(full), code=None)
    one_line(proc, names="layer app")
    assert full.is_char_device()
    proc = image.run("diff", "app", "-o", "/dev/full", code=None)
    one_line(proc, names="No space left on device")
    assert Path("/dev/full").is_char_device()
    # A regular file a failed diff wrote is removed, as before.
    out = tmp_path / "out.tar"
    image.fails("diff", "missing", "-o", str(out))
    assert not out.exists()


# --- sizes ---------------------------------------------------------------------------------


def _loop_quotas(store: Store) -> bool:
    status = store.json("status")
    assert isinstance(status, dict)
    return any(k == "Quota" and v.startswith("loop") for k, v in status["status"])


@pytest.mark.parametrize("size", ["99999999999999999999999P", "9" * 400, "9E", "8192P"])
def test_sizes_beyond_any_file_are_refused(store: Store, size: str) -> None:
    err = one_line(store.run("create", "--rw", "q", "--opt", f"size={size}", code=None),
                   names="layer q")
    assert "Traceback" not in err and len(err) < 300
    store.run("exists", "q", code=1)
    one_line(store.run("--opt", f"vfs.size={size}", "create", "--rw", "q", code=None),
             names="layer q")


def test_quota_larger_than_the_filesystem_takes(store: Store) -> None:
    if not _loop_quotas(store):
        pytest.skip("the home has no loop-image quotas (20T may well fit a project quota)")
    proc = store.run("create", "--rw", "q", "--opt", "size=20T", code=None)
    if proc.returncode == 0:  # a filesystem whose files may be that large (xfs)
        store.run("rm", "q")
    else:
        one_line(proc, names="layer q")
        store.run("exists", "q", code=1)
    store.run("create", "--rw", "q", "--opt", "size=10M")
    for size in ("20T", "99999999999999999999999P"):
        proc = store.run("resize", "q", size, code=None)
        if proc.returncode != 0:
            one_line(proc, names="layer q")
    doc = store.run("--json", "resize", "q", "99999999999999999999999P", code=1)
    assert json.loads(doc.stdout)["kind"] == "InvalidArgument"
    store.run("rm", "q")


# --- a tampered home -----------------------------------------------------------------------


def _edit_meta(store: Store, layer: str, **changes: object) -> None:
    path = store.home / "layers" / layer / "layer.json"
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            doc[outer][inner] = value
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))


def _rows(store: Store, command: str) -> dict[str, dict[str, object]]:
    doc = store.json(command)
    assert isinstance(doc, dict)
    return {row["id"]: row for row in doc["layers"]}


def test_layer_json_of_wrong_types(image: Store) -> None:
    image.run("apply", "other", input=make_tar({"o": b"o"}))
    _edit_meta(image, "other", chain=5, id=7, parent=3)
    for command in ("changes", "diff-size"):
        one_line(image.run(command, "other", code=None), names="layer other")
    # One bad layer: ls and df show it as broken and list the others.
    for listing in ("ls", "df"):
        rows = _rows(image, listing)
        assert set(rows) == {"base", "app", "other"}
        assert "broken" in rows["other"] and "broken" not in rows["app"]
        text = image.out(listing)
        assert "broken: layer other" in text and "app" in text
    image.run("rm", "other")
    assert set(_rows(image, "ls")) == {"base", "app"}


def test_totals_that_are_not_numbers(image: Store) -> None:
    image.run("apply", "other", input=make_tar({"o": b"o"}))
    _edit_meta(image, "other", **{"totals.bytes": "x"})
    rows = _rows(image, "df")
    assert "broken" in rows["other"] and rows["base"]["bytes"] == len(b"".join(
        [b"base-host\n", b"hello\n", b"read me\n", b"#!/bin/sh\n"]))
    assert "totals.bytes" in image.out("df")
    proc = image.run("check", code=1)
    assert b"other" in proc.stdout and b"0 problems" not in proc.stdout
    image.run("rm", "other")
    image.run("check")


@pytest.mark.parametrize("doc", ["[]", "5", '"vfs"', "null"])
def test_lamina_json_not_an_object(image: Store, doc: str) -> None:
    (image.home / "lamina.json").write_text(doc)
    for command in (("ls",), ("df",), ("status",), ("create", "z"), ("check",)):
        one_line(image.run(*command, code=None), names="lamina.json")
    (image.home / "lamina.json").write_text('{"backend": "vfs", "format": 1}')
    image.run("ls")


def _remove_content(layer_dir: Path, backend: str) -> str:
    """Damage a layer's content behind lamina's back; what lamina must say of it."""
    if (layer_dir / "layer.erofs").is_file():  # overlay's EROFS layer: its tar and image
        lamina.host.mount.unmount(str(layer_dir / "diff"))
        (layer_dir / "layer.tar").unlink()
        return "its layer.tar is missing"
    content = {"vfs": "fs", "overlay": "diff"}[backend]
    shutil.rmtree(layer_dir / content)
    return f"its content directory {content}/ is missing"


def test_content_directory_removed(tmp_path: Path, backend: str) -> None:
    # Each kind of layer of the backend: overlay's EROFS layers (its default) and its
    # directory layers (overlay.layers=dir).
    kinds = [(), *([("--opt", "overlay.layers=dir")] if backend == "overlay" else [])]
    for i, opts in enumerate(kinds):
        store = Store(tmp_path / f"home{i}", backend)
        status = store.run("status", code=None)
        if status.returncode != 0:
            pytest.skip(f"no {backend} here: {status.stderr.decode().strip()}")
        store.run(*opts, "apply", "base", input=BASE_TAR)
        store.run(*opts, "apply", "app", "--parent", "base",
                  input=make_tar({"app/bin": b"app\n"}))
        said = _remove_content(store.home / "layers" / "app", backend)
        for command in (("changes", "app"), ("diff-size", "app"),
                        ("diff", "app", "-o", str(tmp_path / "app.tar"))):
            one_line(store.run(*command, code=None), names=f"layer app: {said}")
        assert not (tmp_path / "app.tar").exists()
        assert set(_rows(store, "ls")) == {"base", "app"}
        store.run("changes", "base")
        store.run("rm", "app")
        assert set(_rows(store, "ls")) == {"base"}


# --- permissions and the home --------------------------------------------------------------


def _as_nobody(store: Store) -> list[str]:
    """A command line that runs as ``nobody``, with no capability but reading files (so
    that root's interpreter can still be loaded): no CAP_CHOWN."""
    if shutil.which("setpriv") is None:
        lacking("setpriv (util-linux) drops root for this test")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def test_not_root_says_so_before_writing(tmp_path: Path) -> None:
    # An ordinary user outside a user namespace: every command refuses in one line,
    # before the home (or anything in it) exists.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    store = Store(shared / "home")
    prefix = _as_nobody(store)
    tar = tmp_path / "base.tar"
    tar.write_bytes(BASE_TAR)

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*prefix, *store.argv(*args)], capture_output=True,
                              env=store.env, timeout=120, stdin=subprocess.DEVNULL)

    for args in (("status",), ("ls",), ("apply", "base", str(tar)), ("create", "base"),
                 ("create", "--rw", "c"), ("snapshotter",), ("image", "ls")):
        done = run(*args)
        assert done.stdout == b"", (args, done)
        one_line(done, names="cannot keep layers as uid 65534 outside a user namespace: "
                 "run it as root, or as an ordinary user inside a user namespace")
    assert os.listdir(shared) == []


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` made read-only (a read-only bind mount on itself: root's writes fail too)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("sub", ["staging", "locks"])
def test_unwritable_store_directory(image: Store, sub: str) -> None:
    with read_only(image.home / sub):
        for args in (("apply", "more", "-"), ("create", "new")):
            proc = image.run(*args, input=make_tar({"f": b"x"}), code=None)
            one_line(proc, names="cannot make a lock file: Read-only file system")
            assert args[1] in proc.stderr.decode()
        image.run("ls")
    image.run("exists", "more", code=1)
    image.run("apply", "more", "-", input=make_tar({"f": b"x"}))


def test_empty_home_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "unused")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for command in ("ls", "status", "serve"):
        argv = store.argv(command)
        argv[argv.index("--home") + 1] = ""
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, env=store.env, timeout=60)
        one_line(proc, names="--home: an empty path")
    assert os.listdir(cwd) == []


# --- messages ------------------------------------------------------------------------------


@pytest.mark.parametrize("inline", [False, True])
def test_garbage_tar_names_the_layer(store: Store, inline: bool) -> None:
    if inline:
        store.env["LAMINA_NOREEXEC"] = "1"
    header = bytearray(512)
    header[148:156] = bytes([0x81]) + b"\x01" * 7  # a checksum in bad base-256
    proc = store.run("apply", "junk", "-", input=bytes(header) + bytes(1024), code=None)
    assert one_line(proc) == ("lamina: layer junk: bad base-256 number in checksum at "
                              "offset 0\n")
    proc = store.run("apply", "junk", "-", input=os.urandom(4096), code=None)
    assert one_line(proc).startswith("lamina: layer junk: ")
    store.run("exists", "junk", code=1)


def test_control_characters_are_escaped(store: Store) -> None:
    evil = "a\x1b[31mb\x07"
    for args in (("rm", evil), ("create", evil), ("changes", evil), ("--json", "rm", evil)):
        proc = store.run(*args, code=1)
        err = one_line(proc)
        assert "\x1b" not in err and "\x07" not in err
        assert "a\\x1b[31mb\\x07" in err


def test_json_errors_are_a_document_on_stdout(image: Store) -> None:
    proc = image.run("--json", "rm", "missing", code=1)
    one_line(proc, names="missing")
    assert json.loads(proc.stdout) == {"error": "layer missing: no such layer",
                                       "kind": "NotFound"}
    proc = image.run("rm", "base", "--json", code=1)
    doc = json.loads(proc.stdout)
    assert doc["kind"] == "Busy" and "app" in doc["error"]
    proc = image.run("--json", "apply", "bad", "-", input=b"\x01" * 1024, code=1)
    assert json.loads(proc.stdout)["kind"] == "UnsafeArchive"
    assert "layer bad" in json.loads(proc.stdout)["error"]
    # Usage errors stay usage errors: exit 2, nothing on stdout.
    assert image.run("--json", "frobnicate", code=2).stdout == b""


# --- the progress bar of a compressed file ---------------------------------------------------


def _compressible_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(30):
            data = (b"lamina layer %d " % i) * 20_000 + os.urandom(4_000)
            info = tarfile.TarInfo(f"f{i}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_SIZES = re.compile(rb"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?) (bytes|kB|MB|GB)")


def test_progress_is_on_the_compressed_file(
    store: Store, tmp_path: Path, terminal: tuple[int, list[bytes]]
) -> None:
    slave, seen = terminal
    raw = _compressible_tar()
    packed = zstandard.ZstdCompressor().compress(raw)
    assert len(raw) > 5 * len(packed)
    path = tmp_path / "layer.tar.zst"
    path.write_bytes(packed)
    proc = subprocess.run(
        store.argv("apply", "big", str(path)),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
        env={**store.env, "TERM": "xterm", "COLUMNS": "160"}, timeout=120,
    )
    assert proc.returncode == 0
    drawn = b""
    for _ in range(50):
        drawn = b"".join(seen)
        if b"30 entries" in drawn:
            break
        threading.Event().wait(0.1)
    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", drawn)
    assert b"Traceback" not in text
    states = _SIZES.findall(text)
    assert states, text[-2000:]
    for done, total, _unit in states:  # never past the file's size
        assert float(done) <= float(total), text[-2000:]
    done, total, unit = states[-1]
    assert done == total  # whole at the end ...
    scale = {b"bytes": 1, b"kB": 1e3, b"MB": 1e6, b"GB": 1e9}[unit]
    assert abs(float(total) * scale - len(packed)) <= 0.05 * scale + 1  # ... the file's size
    assert b"30 entries" in text
    assert re.search(rb"\d:\d\d:\d\d\s+\d:\d\d:\d\d", text)  # elapsed, and time left

"""The ``lamina`` command line (contract §3), run as a user runs it: in a subprocess.

Each test gets its own home and uses the ``vfs`` backend.  The store chowns what
it writes, so these tests need root: locally they skip without it; in CI (which
runs as root) they fail instead, so a misconfigured CI cannot pass by skipping.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# conftest.py skips ``root`` tests without root, and fails them in CI (CI=true).
pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent


# --- helpers -------------------------------------------------------------------------


class Lamina:
    """Runs ``python -m lamina --home HOME --backend vfs ...`` in a subprocess."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if k != "LAMINA_HOME"}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "lamina", "--home", str(self.home), "--backend", "vfs", *args]

    def run(
        self, *args: str, input: bytes | None = None, code: int | None = 0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command; check its exit status is ``code`` (unless None)."""
        proc = subprocess.run(
            self.argv(*args),
            input=input if input is not None else b"",
            capture_output=True,
            env=self.env,
            timeout=120,
        )
        if code is not None:
            assert proc.returncode == code, (
                f"lamina {' '.join(args)}: exit {proc.returncode}, wanted {code}\n"
                f"stdout: {proc.stdout[:2000]!r}\nstderr: {proc.stderr.decode(errors='replace')}"
            )
        return proc

    def out(self, *args: str, input: bytes | None = None) -> str:
        """Standard output of a command that must succeed."""
        return self.run(*args, input=input).stdout.decode()

    def json(self, *args: str, input: bytes | None = None) -> object:
        """The one JSON document a ``--json`` command prints."""
        return json.loads(self.out("--json", *args, input=input))

    def fails(self, *args: str, code: int = 1) -> str:
        """Run a command that must fail with ``code``; its one-line message."""
        proc = self.run(*args, code=code)
        err = proc.stderr.decode()
        assert "Traceback" not in err
        assert proc.stdout == b""
        if code == 1:
            assert err.startswith("lamina: "), err
            assert err.endswith("\n") and err.count("\n") == 1, err
        return err


@pytest.fixture
def lamina(tmp_path: Path) -> Lamina:
    return Lamina(tmp_path / "home")


def make_tar(
    files: dict[str, bytes] | None = None,
    *,
    dirs: tuple[str, ...] = (),
    symlinks: dict[str, str] | None = None,
    mtime: int = 1_700_000_000,
) -> bytes:
    """A layer tar: ``dirs``, then regular ``files`` and ``symlinks`` (name -> target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
            tar.addfile(info)
        for name, data in (files or {}).items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, mtime
            tar.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, mtime
            tar.addfile(info)
    return buf.getvalue()


BASE_FILES = {
    "etc/hostname": b"base-host\n",
    "etc/motd": b"hello\n",
    "usr/share/doc/README": b"read me\n",
    "bin/tool": b"#!/bin/sh\n",
}
BASE_TAR = make_tar(BASE_FILES, dirs=("etc", "usr", "usr/share", "usr/share/doc", "bin"))
# On BASE_TAR: adds a file, deletes README with a whiteout, adds a symlink.
APP_TAR = make_tar(
    {"etc/app.conf": b"x=1\n", "usr/share/doc/.wh.README": b""},
    dirs=("etc", "usr", "usr/share", "usr/share/doc", "usr/bin"),
    symlinks={"usr/bin/tool": "../../bin/tool"},
)


def changes_of(text: str) -> dict[str, str]:
    """``changes`` output as ``{path: letter}``; checks the lines' shape and order."""
    lines = text.splitlines()
    paths = []
    for line in lines:
        letter, _, path = line.partition(" ")
        assert letter in ("A", "C", "D") and path.startswith("/"), line
        paths.append(path)
    assert paths == sorted(paths)
    return {path: letter for letter, _, path in (line.partition(" ") for line in lines)}


@pytest.fixture
def image(lamina: Lamina, tmp_path: Path) -> Lamina:
    """A store with ``base`` (applied from a file) and ``app`` on it (from stdin)."""
    (tmp_path / "base.tar").write_bytes(BASE_TAR)
    lamina.run("apply", "base", str(tmp_path / "base.tar"))
    lamina.run("apply", "app", "--parent", "base", "-", input=APP_TAR)
    return lamina


# --- the life cycle ----------------------------------------------------------------------


def test_life_cycle(lamina: Lamina, tmp_path: Path) -> None:
    (tmp_path / "base.tar").write_bytes(BASE_TAR)
    size = lamina.out("apply", "base", str(tmp_path / "base.tar"))
    assert size == f"{sum(len(d) for d in BASE_FILES.values())}\n"
    assert lamina.out("apply", "app", "--parent", "base", input=APP_TAR) == "4\n"

    app = changes_of(lamina.out("changes", "app"))
    assert app["/etc/app.conf"] == "A"
    assert app["/usr/share/doc/README"] == "D"
    assert app["/usr/bin/tool"] == "A"

    assert lamina.out("create", "--rw", "ctr", "--parent", "app") == "ctr\n"
    root = Path(lamina.out("mount", "ctr").strip())
    assert root.is_dir()
    assert (root / "etc/app.conf").read_bytes() == b"x=1\n"
    assert not (root / "usr/share/doc/README").exists()
    assert os.readlink(root / "usr/bin/tool") == "../../bin/tool"
    (root / "etc/motd").write_bytes(b"changed\n")
    (root / "etc/hostname").unlink()
    (root / "data").mkdir()
    (root / "data/new").write_bytes(b"new\n")

    ctr = changes_of(lamina.out("changes", "ctr"))
    assert ctr["/etc/motd"] == "C"
    assert ctr["/etc/hostname"] == "D"
    assert ctr["/data"] == "A"
    assert ctr["/data/new"] == "A"
    assert "/etc/app.conf" not in ctr

    lamina.run("diff", "ctr", "-o", str(tmp_path / "ctr.tar"))
    with tarfile.open(tmp_path / "ctr.tar") as tar:
        names = {m.name.removeprefix("./").rstrip("/") for m in tar.getmembers()}
        motd = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("etc/motd")))
        assert motd is not None and motd.read() == b"changed\n"
    assert {"etc/motd", "etc/.wh.hostname", "data", "data/new"} <= names
    # To standard output, the same stream.
    assert lamina.run("diff", "ctr").stdout == (tmp_path / "ctr.tar").read_bytes()
    assert int(lamina.out("diff-size", "ctr")) > 0

    # The diff applied on the same parent gives the same changes.
    lamina.run("apply", "commit", "--parent", "app", str(tmp_path / "ctr.tar"))
    assert changes_of(lamina.out("changes", "commit")) == ctr

    lamina.run("unmount", "ctr")
    assert "app" in lamina.fails("rm", "app")  # the parent of ctr and commit
    for layer in ("commit", "ctr", "app", "base"):
        lamina.run("rm", layer)
        lamina.run("exists", layer, code=1)
    assert lamina.json("ls") == {"layers": []}


def test_apply_compressed(lamina: Lamina, tmp_path: Path) -> None:
    import gzip

    (tmp_path / "base.tar.gz").write_bytes(gzip.compress(BASE_TAR))
    lamina.run("apply", "base", str(tmp_path / "base.tar.gz"))
    root = Path(lamina.out("mount", "base").strip())
    assert (root / "etc/motd").read_bytes() == b"hello\n"
    lamina.run("unmount", "base")


def test_rm_parent_is_refused(image: Lamina) -> None:
    err = image.fails("rm", "base")
    assert "base" in err
    assert image.run("exists", "base").returncode == 0


def test_mount_is_counted(image: Lamina) -> None:
    first = image.out("mount", "app")
    assert image.out("mount", "app") == first
    assert _ls(image)["app"]["mounts"] == 2
    image.run("unmount", "app")
    assert _ls(image)["app"]["mounts"] == 1
    image.run("unmount", "app")
    assert _ls(image)["app"]["mounts"] == 0
    image.run("unmount", "app")  # a no-op, as put of an unmounted layer is


def test_create_read_only_and_metadata(lamina: Lamina) -> None:
    lamina.run("create", "base")
    # A size cap is for writable layers only (contract §1): the opt reaches the driver.
    assert "size" in lamina.fails("create", "child", "--parent", "base", "--opt", "size=10M")
    meta = lamina.json("metadata", "base")
    assert isinstance(meta, dict) and "dir" in meta["metadata"]
    assert Path(meta["metadata"]["dir"]).is_dir()
    text = lamina.out("metadata", "base")
    assert text.startswith("dir: ") or "\ndir: " in text


# --- --json ------------------------------------------------------------------------------


def test_json_documents(image: Lamina, tmp_path: Path) -> None:
    status = image.json("status")
    assert isinstance(status, dict) and status["backend"] == "vfs"
    assert all(isinstance(p, list) and len(p) == 2 for p in status["status"])

    assert image.json("apply", "more", "--parent", "app", input=make_tar({"f": b"12345"})) == {
        "id": "more",
        "parent": "app",
        "size": 5,
    }
    changes = image.json("changes", "more")
    assert changes == {"changes": [{"path": "/f", "kind": "A"}]}
    assert image.json("diff-size", "more") == {"size": 5}
    assert image.json("exists", "more") == {"exists": True}
    assert image.json("create", "ctr", "--rw", "--parent", "more") == {
        "id": "ctr",
        "parent": "more",
        "rw": True,
    }
    mounted = image.json("mount", "ctr")
    assert isinstance(mounted, dict) and Path(mounted["path"]).is_dir()
    assert image.json("unmount", "ctr") == {"id": "ctr"}
    out = tmp_path / "more.tar"
    diff = image.json("diff", "more", "-o", str(out))
    assert diff == {"id": "more", "output": str(out), "bytes": out.stat().st_size}
    assert image.json("cleanup") == {"cleanup": True}
    assert image.json("rm", "ctr") == {"id": "ctr"}
    # --json also goes after the command.
    assert json.loads(image.out("exists", "more", "--json")) == {"exists": True}


def test_json_error_is_one_line_on_stderr(lamina: Lamina) -> None:
    # One line on stderr, and on stdout the one JSON document: the error and its kind.
    proc = lamina.run("--json", "rm", "missing", code=1)
    err = proc.stderr.decode()
    assert err.startswith("lamina: ") and err.count("\n") == 1 and "Traceback" not in err
    assert json.loads(proc.stdout) == {"error": "layer missing: no such layer",
                                       "kind": "NotFound"}
    lamina.run("--json", "exists", "missing", code=1)


def test_diff_json_needs_output(image: Lamina) -> None:
    image.fails("--json", "diff", "app", code=2)


# --- errors and exit codes ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("rm", "missing"),
        ("create", "../x"),
        ("create", "x", "--parent", "missing"),
        ("apply", "x", "--parent", "missing", "-"),
        ("changes", "missing"),
        ("mount", "missing"),
        ("metadata", "missing"),
        ("diff-size", "bad/id"),
    ],
)
def test_lamina_error_exits_1_with_one_line(lamina: Lamina, args: tuple[str, ...]) -> None:
    err = lamina.fails(*args)
    assert "missing" in err or args[1] in err  # it names the layer at fault


def test_failed_create_leaves_nothing(lamina: Lamina) -> None:
    lamina.fails("create", "x", "--parent", "missing")
    lamina.run("exists", "x", code=1)
    assert lamina.json("ls") == {"layers": []}


def test_create_existing_is_an_error(image: Lamina) -> None:
    assert "base" in image.fails("create", "base")


def test_unsafe_archive_refused_or_clamped(lamina: Lamina) -> None:
    proc = lamina.run("apply", "bad", "-", input=make_tar({"../escape": b"x"}), code=None)
    if proc.returncode != 0:  # refused; it may also be clamped inside (contract §2)
        assert proc.returncode == 1 and proc.stderr.decode().count("\n") == 1
        lamina.run("exists", "bad", code=1)


def test_unreadable_input_file(lamina: Lamina, tmp_path: Path) -> None:
    err = lamina.fails("apply", "x", str(tmp_path / "nope.tar"))
    assert "nope.tar" in err
    lamina.run("exists", "x", code=1)


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("create",),
        ("--opt", "novalue", "ls"),
        ("create", "x", "--opt", "novalue"),
        ("create", "x", "--mount-label", "l"),
        ("exists",),
    ],
)
def test_usage_error_exits_2(lamina: Lamina, args: tuple[str, ...]) -> None:
    proc = lamina.run(*args, code=2)
    assert b"Traceback" not in proc.stderr
    assert b"usage:" in proc.stderr


def test_exists(image: Lamina) -> None:
    assert image.run("exists", "base").stdout == b""
    proc = image.run("exists", "nope", code=1)
    assert proc.stdout == b"" and proc.stderr == b""
    # An id that cannot exist is absent too (with or without a message).
    assert b"Traceback" not in image.run("exists", "..", code=1).stderr


# --- ls ----------------------------------------------------------------------------------


def _ls(lamina: Lamina) -> dict[str, dict[str, object]]:
    doc = lamina.json("ls")
    assert isinstance(doc, dict)
    return {row["id"]: row for row in doc["layers"]}


def test_ls(image: Lamina) -> None:
    image.run("create", "ctr", "--rw", "--parent", "app")
    image.run("mount", "ctr")
    rows = _ls(image)
    assert set(rows) == {"base", "app", "ctr"}
    assert rows["base"] == {
        "id": "base",
        "parent": None,
        "size": rows["base"]["size"],
        "mounts": 0,
        "format": rows["base"]["format"],
        "diff_id": "sha256:" + hashlib.sha256(BASE_TAR).hexdigest(),
        "sealed": False,
    }
    assert isinstance(rows["base"]["size"], int) and rows["base"]["size"] >= 30
    assert rows["base"]["format"] in ("dir", "erofs")
    assert rows["ctr"]["diff_id"] is None  # writable: no single tar's
    assert rows["app"]["parent"] == "base" and rows["ctr"]["parent"] == "app"
    assert rows["ctr"]["mounts"] == 1

    lines = image.out("ls").splitlines()
    assert lines[0].split() == ["ID", "PARENT", "SIZE", "MOUNTS"]
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert table["base"][1] == "-" and table["app"][1] == "base"
    assert table["ctr"][1:] == ["app", table["ctr"][2], "1"]


# --- progress -----------------------------------------------------------------------------


def test_no_progress_when_stderr_is_not_a_terminal(lamina: Lamina) -> None:
    proc = lamina.run("apply", "base", input=BASE_TAR)
    assert proc.stderr == b""
    proc = lamina.run("diff", "base")
    assert proc.stderr == b""


@pytest.fixture
def terminal() -> Iterator[tuple[int, list[bytes]]]:
    """A pseudo-terminal for standard error, and what is written to it."""
    master, slave = pty.openpty()
    seen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            seen.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    yield slave, seen
    os.close(slave)
    reader.join(timeout=5)
    os.close(master)


def test_progress_bar_on_a_terminal(
    lamina: Lamina, tmp_path: Path, terminal: tuple[int, list[bytes]]
) -> None:
    slave, seen = terminal
    (tmp_path / "base.tar").write_bytes(BASE_TAR)
    proc = subprocess.run(
        lamina.argv("apply", "base", str(tmp_path / "base.tar")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**lamina.env, "TERM": "xterm", "COLUMNS": "120"},
        timeout=120,
    )
    assert proc.returncode == 0
    assert proc.stdout.decode().strip().isdigit()  # the bar never goes to stdout
    # The bar's last state is drawn when the command ends.
    drawn = b"".join(seen)
    for _ in range(50):
        if b"entries" in drawn:
            break
        threading.Event().wait(0.1)
        drawn = b"".join(seen)
    assert b"entries" in drawn
    assert b"Traceback" not in drawn

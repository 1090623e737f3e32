"""A real ordinary user, made for the rootless tests and deleted after them.

:class:`User` runs commands as that user (``setpriv``: its uid, gid and groups, no
capability), outside any user namespace or inside one it makes itself: ``unshare --user
--map-root-user --map-auto --mount`` (its subordinate ids through Debian's ``newuidmap``)
or Debian's ``rootlesskit``.  lamina runs there under Debian's ``/usr/bin/python3``, which
the user can execute (the project's interpreter may live under ``/root``), from a copy of
the package in the user's work directory, with the project's dependencies from the venv
where the user can read them and copied beside the package where it cannot.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.conftest import lacking

REPO = Path(__file__).parents[2]
PYTHON = "/usr/bin/python3"
NAMESPACES = {
    "unshare": ["unshare", "--user", "--map-root-user", "--map-auto", "--mount", "--"],
    "rootlesskit": ["rootlesskit", "--state-dir", "{work}/rootlesskit-{n}", "--"],
}
"""The ways a user enters a user namespace of its own, in which it is root."""


class User:
    """The test's ordinary user and its work directory (``work``, mode 700)."""

    def __init__(self, name: str, work: Path, pythonpath: str) -> None:
        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, entry.pw_uid, entry.pw_gid
        self.work = work
        self.home = work / ".local/share/lamina"
        """lamina's default home for root of a user namespace (``$HOME`` is ``work``)."""
        self.pythonpath = pythonpath
        self.subuid = _subordinate("/etc/subuid", name)
        self.subgid = _subordinate("/etc/subgid", name)
        self._runs = 0

    @property
    def env(self) -> dict[str, str]:
        return {"HOME": str(self.work), "USER": self.name, "LOGNAME": self.name,
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                "PYTHONPATH": self.pythonpath, "PYTHONDONTWRITEBYTECODE": "1",
                "XDG_RUNTIME_DIR": str(self.work / "run")}

    def argv(self, argv: Sequence[str], ns: str | None) -> list[str]:
        """``argv`` as this user, inside a namespace ``ns`` of :data:`NAMESPACES` (None:
        outside any)."""
        self._runs += 1
        enter = [part.format(work=self.work, n=self._runs) for part in NAMESPACES[ns]] \
            if ns is not None else []
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups",
                "--inh-caps=-all", *enter, *argv]

    def run(self, argv: Sequence[str], ns: str | None, *, stdin: int | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv, ns), env=self.env, cwd=self.work, text=True,
                              capture_output=True, stdin=stdin if stdin is not None
                              else subprocess.DEVNULL, timeout=timeout)

    def lamina(self, *args: str, ns: str | None, stdin: int | None = None
               ) -> subprocess.CompletedProcess[str]:
        return self.run([PYTHON, "-m", "lamina", *args], ns, stdin=stdin)

    @staticmethod
    def script_argv(text: str) -> list[str]:
        """A shell script (dedented) as a command line; ``L`` is lamina, ``INSIDE`` the
        inside helper (:mod:`tests.rootless.inside`)."""
        head = (f"set -eu\nL() {{ {PYTHON} -m lamina \"$@\"; }}\n"
                f"INSIDE() {{ {PYTHON} -m tests.rootless.inside \"$@\"; }}\n")
        return ["bash", "-c", head + textwrap.dedent(text)]

    def script(self, text: str, ns: str, *, timeout: float = 600
               ) -> subprocess.CompletedProcess[str]:
        """:meth:`script_argv` run in one namespace (mounts last as long as it does)."""
        return self.run(self.script_argv(text), ns, timeout=timeout)

    def containerd_script(self, out: Path) -> str:
        """The start of a :meth:`script` (run under ``rootlesskit``) that runs Debian's
        containerd as this user, rootless, with ``lamina snapshotter`` in the same
        namespace as its proxy plugin (from lamina's printed config), both stopped when
        the script ends (lamina must exit 0); ``C`` is ``ctr`` on it.  Logs and config
        in ``out``."""
        sock = f"{self.work}/run/containerd/containerd.sock"
        return f"""
            L snapshotter --print-containerd-config | grep -v '^version' > {out}/lamina.toml
            cat > {out}/config.toml <<END
            version = 2
            root = "{self.work}/containerd"
            state = "{self.work}/run/containerd"
            disabled_plugins = ["io.containerd.grpc.v1.cri"]
            [grpc]
              address = "{sock}"
            END
            cat {out}/lamina.toml >> {out}/config.toml
            {PYTHON} -m lamina snapshotter > {out}/lamina.log 2>&1 &
            lamina=$!
            containerd -c {out}/config.toml > {out}/containerd.log 2>&1 &
            containerd=$!
            trap 'kill $containerd; wait $containerd || true; kill $lamina; wait $lamina' EXIT
            for _ in $(seq 300); do [ -S {sock} ] && break; sleep 0.1; done
            C() {{ ctr -a {sock} "$@"; }}
            """

    def host_uid(self, uid: int) -> int:
        """Where the namespace's ``uid`` lands on the host (``--map-root-user --map-auto``
        and rootlesskit map alike: 0 to the user, 1… to its subordinate ids)."""
        return self.uid if uid == 0 else self.subuid + uid - 1

    def host_gid(self, gid: int) -> int:
        return self.gid if gid == 0 else self.subgid + gid - 1


def _subordinate(path: str, name: str) -> int:
    with open(path) as f:
        for line in f:
            owner, start, count = line.strip().split(":")
            if owner == name and int(count) >= 65536:
                return int(start)
    raise AssertionError(f"{name} has no 65536 subordinate ids in {path}")


def _runtime_pythonpath(work: Path, user: str) -> str:
    """Where the user's interpreter finds lamina, the tests' helpers and the dependencies."""
    want = sys.version_info[:2]
    found = subprocess.run([PYTHON, "-c", "import sys; print(*sys.version_info[:2])"],
                           capture_output=True, text=True, check=False).stdout.split()
    if [int(v) for v in found] != list(want):
        lacking(f"{PYTHON} is Python {'.'.join(found)}, the venv's is {want[0]}.{want[1]}: "
                "the dependencies' compiled modules would not load")
    runtime = work / "runtime"
    shutil.copytree(REPO / "lamina", runtime / "lamina",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (runtime / "tests/rootless").mkdir(parents=True)
    for name in ("__init__.py", "snapshot.py", "rootless/__init__.py", "rootless/inside.py"):
        shutil.copy(REPO / "tests" / name, runtime / "tests" / name)
    site = sysconfig.get_paths()["purelib"]
    probe = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", PYTHON, "-c",
         "import grpc, zstandard, isal, rich, urllib3, google.protobuf"],
        env={"PYTHONPATH": site, "PATH": "/usr/bin:/bin"}, cwd="/", capture_output=True,
        check=False)
    if probe.returncode != 0:  # the venv is out of the user's reach: copy what lamina needs
        site = str(runtime / "site")
        _copy_distributions(Path(sysconfig.get_paths()["purelib"]), Path(site))
    return f"{runtime}:{site}"


_NAME = re.compile(r"[A-Za-z0-9._-]+")
"""A requirement's distribution name (what comes before its version and markers)."""


def _copy_distributions(source: Path, dest: Path) -> None:
    """The files of lamina's dependencies and theirs (the installed distributions)."""
    def names(requirements: list[str] | None) -> list[str]:
        return [_NAME.match(req).group(0) for req in requirements or []  # type: ignore[union-attr]
                if "extra ==" not in req]

    todo = names(importlib.metadata.requires("lamina"))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        dist = importlib.metadata.distribution(name)
        for file in dist.files or ():
            src = Path(str(dist.locate_file(file)))
            if src.is_file() and src.is_relative_to(source):
                target = dest / src.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
        todo += names(dist.requires)


@contextlib.contextmanager
def made_user(where: Path = Path("/var/tmp")) -> Iterator[User]:
    """A new ordinary user with 65536 subordinate ids and its work directory in
    ``where`` (pytest's own is root's alone); both gone afterwards.  Root only."""
    for tool in ("useradd", "setpriv", "unshare", "newuidmap", "rootlesskit"):
        if shutil.which(tool) is None:
            lacking(f"no {tool} (make bootstrap installs uidmap and rootlesskit)")
    name = f"lamrl{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--user-group", "--no-create-home", "--shell", "/bin/sh",
                    name], check=True)
    work = where / f"lamina-rootless-{name}"
    try:
        try:
            _subordinate("/etc/subuid", name)
        except AssertionError:  # a login.defs that gives none: give some
            subprocess.run(["usermod", "--add-subuids", "300000-365535", "--add-subgids",
                            "300000-365535", name], check=True)
        work.mkdir(mode=0o700)
        pythonpath = _runtime_pythonpath(work, name)
        (work / "run").mkdir(mode=0o700)
        subprocess.run(["chown", "-R", f"{name}:{name}", str(work)], check=True)
        yield User(name, work, pythonpath)
    finally:
        # Whatever of the user's still runs (a failed run's daemons) goes first:
        # userdel refuses a user with processes.
        subprocess.run(["pkill", "-KILL", "-u", name], check=False, capture_output=True)
        time.sleep(0.2)
        subprocess.run(["userdel", name], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def rootless_user() -> Iterator[User]:
    """The rootless tests' user (:func:`made_user`), for the whole session."""
    if os.geteuid() != 0:
        lacking("needs root: the test makes its own user")
    with made_user() as user:
        yield user

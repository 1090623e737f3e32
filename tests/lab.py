"""The engines' lab: commands run in a Debian sid userland (``scripts/build-lab.sh``).

The lab holds the tools that Debian 12 has too old or not at all (erofs-utils 1.9, whose
``fsck.erofs`` and ``mkfs.erofs`` judge lamina's EROFS writer; containerd 2.x, Docker,
Go with containerd's sources).  :func:`run` runs one command in it:

- in a fresh mount namespace, a slave of the host's: nothing it mounts is seen outside
  or outlives it, and what the host mounts later below a *shared* mount (see
  :func:`tests.engines.daemons.shared_dir`: lamina's EROFS layers) shows inside;
- in a fresh PID namespace, whose first process's end (when the command has ended, or
  the call is interrupted or times out: then it is killed) takes every process the
  command started with it: nothing survives a call;
- with the lab's root bind-mounted onto itself (a mount point, as runc wants ``/``), a
  fresh ``/proc`` (of the new PID namespace), the host's ``/sys`` and ``/dev`` (with
  ``/dev/pts``, the loop devices), a tmpfs on ``/tmp``, and each of ``binds`` (host
  paths) at the same path inside, so that paths the tests make mean the same in the lab;
- as root (the lab is entered with ``chroot``), with a plain ``PATH`` and nothing else
  of the caller's environment but what ``env`` adds.

:func:`lab_root` is where the lab is (``$LAMINA_LAB``, else /var/tmp/lamina-lab); a
test that needs it skips when it is missing (or the user is not root), except in CI
(``make test`` builds it: ``make lab``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tests.conftest import lacking, require_root

__all__ = ["command", "lab_root", "location", "present", "run", "spawn", "stop", "versions"]

DEFAULT = Path("/var/tmp/lamina-lab")
STAMP = ".lamina-lab-stamp"

# Runs as the first process of the new PID namespace (in the new mount namespace):
# mounts what the lab needs, then the command as its child (not exec'd: a command as
# PID 1 would ignore the signals it has no handler for), and exits with its status.
_MOUNTS = r"""
set -eu
root=$1; shift
mount --bind "$root" "$root"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
while [ "$1" != -- ]; do
  if [ -d "$1" ]; then mkdir -p "$root$1"; else mkdir -p "$root${1%/*}"; : >>"$root$1"; fi
  mount --rbind "$1" "$root$1"
  shift
done
shift
"""
_ENTER = _MOUNTS + r"""
status=0
chroot "$root" "$@" || status=$?
exit "$status"
"""
# A daemon's lab (containerd's: its containers) is entered with pivot_root, so that the
# lab's root is its mount namespace's root: `runc exec` (docker exec, the CRI's
# ExecSync, BuildKit's RUN) joins a container's mount namespace with setns, which puts
# the process at that namespace's root mount, and under a chroot that is the host's /.
# `pivot_root . .` stacks the old root on the new one; the lazy unmount takes it (and
# every host mount under it) away from this namespace only (a slave: nothing goes back).
_ENTER_PIVOTED = _MOUNTS + r"""
cd "$root"
pivot_root . .
umount -l .
cd /
status=0
"$@" || status=$?
exit "$status"
"""


def location() -> Path:
    """Where the lab is, or would be (``$LAMINA_LAB``, else /var/tmp/lamina-lab)."""
    return Path(os.environ.get("LAMINA_LAB") or DEFAULT)


def present() -> bool:
    """Whether a whole lab is there and can be entered (as root)."""
    root = location()
    return os.geteuid() == 0 and (root / STAMP).is_file() and (root / "VERSIONS").is_file()


def lab_root() -> Path:
    """The lab's root directory; lacking (a skip, a failure in CI) when it was not built
    or cannot be entered (not root)."""
    require_root()
    root = location()
    if not present():
        lacking(f"no lab at {root} (build it with `make lab`: scripts/build-lab.sh)")
    return root


def versions(root: Path | None = None) -> dict[str, str]:
    """The lab's key packages and their Debian versions (from its VERSIONS file)."""
    text = ((root or location()) / "VERSIONS").read_text()
    return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)


def command(argv: Sequence[str | os.PathLike[str]], *,
            binds: Iterable[str | os.PathLike[str]] = (),
            env: Mapping[str, str] | None = None, cwd: str | None = None,
            pivot: bool = False) -> list[str]:
    """The host's command line that runs ``argv`` in the lab (see :func:`run`); with
    ``pivot``, the lab's root made its mount namespace's root (see :func:`spawn`)."""
    root = lab_root()
    paths = sorted({os.path.abspath(os.fspath(b)) for b in binds},
                   key=lambda p: (p.count("/"), p))
    for path in paths:
        _check_bind(root, path)
    inner = [os.fspath(a) for a in argv]
    if cwd is not None:
        inner = ["/bin/sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", cwd, *inner]
    return [
        # --kill-child: the namespace's first process is killed if unshare dies.
        "unshare", "--mount", "--propagation", "slave", "--pid", "--fork", "--kill-child",
        "--", "/bin/sh", "-c", _ENTER_PIVOTED if pivot else _ENTER, "lab", str(root),
        *paths, "--",
        "/usr/bin/env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root", "LC_ALL=C.UTF-8", *(f"{k}={v}" for k, v in (env or {}).items()),
        *inner]


def run(argv: Sequence[str | os.PathLike[str]], *, binds: Iterable[str | os.PathLike[str]] = (),
        check: bool = True, timeout: float = 300, input: str | None = None,
        env: Mapping[str, str] | None = None, cwd: str | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in the lab (see the module's docstring) and return what it did, its
    output as text.  ``binds`` are host paths (absolute; files or directories) mounted at
    the same paths inside; ``cwd`` a directory inside to start in; ``check`` raises
    ``CalledProcessError`` on a non-zero status.  When the call returns, every process
    it started is gone: on ``timeout`` (``TimeoutExpired``) too."""
    args = command(argv, binds=binds, env=env, cwd=cwd)
    with subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            stop(proc)
            raise
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


def spawn(argv: Sequence[str | os.PathLike[str]], *, log: Path,
          binds: Iterable[str | os.PathLike[str]] = (),
          env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``argv`` in the lab (a daemon: containerd, dockerd), its output appended to
    ``log``; :func:`stop` ends it with every process it started.  The lab is entered
    with ``pivot_root``, not ``chroot``: a container's ``runc exec`` must not land in the
    host's root (:data:`_ENTER_PIVOTED`)."""
    with open(log, "a") as out:
        return subprocess.Popen(command(argv, binds=binds, env=env, pivot=True),
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen[str]) -> None:
    """End what :func:`spawn` started (see :func:`_end`)."""
    _end(proc)


def _check_bind(root: Path, path: str) -> None:
    """Refuse to bind ``path`` where the lab's own tree would lead it astray: the host's
    ``/``, or a path through a symlink of the lab (``/var/run -> /run``: the mount
    point would be made through it, on the host)."""
    if path == "/":
        raise ValueError("the host's / cannot be bound into the lab")
    at = root
    for part in Path(path).parts[1:]:
        at = at / part
        if at.is_symlink():
            raise ValueError(f"{path} goes through the lab's symlink {at}: bind its target")
        if not at.exists():
            return


def _end(proc: subprocess.Popen[str]) -> None:
    """Kill the PID namespace under ``proc`` (unshare) and wait until it is empty.

    The namespace's first process is killed: the kernel then kills every other one
    and lets it die only when they are all gone; unshare, which waits for it, exits
    after that, so once ``proc`` has exited nothing of the namespace is left."""
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            first = [int(pid) for pid in f.read().split()]
    except OSError:
        first = []
    for pid in first or [proc.pid]:  # none yet: unshare has not forked, end it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()

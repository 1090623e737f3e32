"""The engines' lab (tests/lab.py): what a command run in it sees, and that nothing it
started outlives the call."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests import lab

pytestmark = pytest.mark.root


def _processes_with(marker: str) -> list[int]:
    """The host's processes whose command line holds ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue  # gone meanwhile
    return found


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def test_the_lab_is_sid_with_the_oracles() -> None:
    found = lab.versions(lab.lab_root())
    assert {"erofs-utils", "containerd", "runc", "docker.io", "docker-buildx",
            "golang-go"} <= set(found)
    major, minor = (int(n) for n in found["erofs-utils"].split(".")[:2])
    assert (major, minor) >= (1, 8)  # 512-byte blocks
    done = lab.run(["fsck.erofs", "--version"])
    assert found["erofs-utils"].split("-")[0] in done.stdout
    assert "sid" in lab.run(["cat", "/etc/debian_version"]).stdout


def test_binds_root_and_namespaces(tmp_path: Path) -> None:
    (tmp_path / "host-file").write_text("from the host\n")
    lab_dir = lab.lab_root()
    done = lab.run(["/bin/sh", "-c", 'cat "$1"/host-file; echo made >"$1"/lab-file; '
                    'findmnt -n -o TARGET /; findmnt -n -o FSTYPE /tmp; echo $$',
                    "sh", str(tmp_path)], binds=[tmp_path])
    content, root, tmp_type, pid = done.stdout.split("\n")[:4]
    assert content == "from the host"
    assert (tmp_path / "lab-file").read_text() == "made\n"  # the same path, both ways
    assert root == "/" and tmp_type == "tmpfs"  # / a mount point; a fresh /tmp
    assert int(pid) < 10  # a PID namespace of its own
    # Nothing of it is seen outside (other tests may mount elsewhere meanwhile).
    assert [p for p in _mounts() if p == str(lab_dir) or p.startswith(f"{lab_dir}/")] == []
    assert lab.run(["pwd"], cwd=str(tmp_path), binds=[tmp_path]).stdout == f"{tmp_path}\n"
    assert lab.run(["/bin/sh", "-c", 'echo "$X"'], env={"X": "y"}).stdout == "y\n"


def test_every_process_is_gone_when_it_returns() -> None:
    marker = f"3{time.monotonic_ns() % 10**9}"
    # A daemon that leaves its parent behind, and one that escapes into its own session.
    lab.run(["/bin/sh", "-c", f"sleep {marker} & setsid sleep {marker}1 & echo started"])
    assert _processes_with(f"sleep\0{marker}") == []
    with pytest.raises(subprocess.TimeoutExpired):
        lab.run(["/bin/sh", "-c", f"sleep {marker}2 & setsid sleep {marker}3 & sleep {marker}4"],
                timeout=2)
    assert _processes_with(f"sleep\0{marker}") == []


def test_binds_through_the_labs_symlinks_are_refused() -> None:
    root = lab.lab_root()
    assert (root / "var/run").is_symlink()  # Debian's /var/run -> /run
    with pytest.raises(ValueError):
        lab.run(["true"], binds=["/var/run/lamina-test"])
    with pytest.raises(ValueError):
        lab.run(["true"], binds=["/"])


def test_a_failing_command_is_an_error() -> None:
    with pytest.raises(subprocess.CalledProcessError):
        lab.run(["false"])
    assert lab.run(["/bin/sh", "-c", "exit 3"], check=False).returncode == 3

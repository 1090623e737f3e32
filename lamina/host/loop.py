"""Image files as filesystems, through loop devices (util-linux's ``mount`` and ``losetup``).

A loop device shows a regular file as a block device.  lamina mounts filesystem images
through them: the ext4 image of a writable layer capped where the home has no project
quotas (:mod:`lamina.host.quota` makes and grows those), and any other format of layer
kept as an image file.

:func:`mount` attaches the image to a free loop device and mounts it in one step
(``mount -o loop``: util-linux sets the device to free itself, so :func:`unmount`, or
the lazy detach of a busy mount, frees it too); :func:`attach` and :func:`detach` attach
an image alone, to read it as a block device; :func:`device_of` is the device under a
mount point, :func:`refresh_size` has it see its image grown.

Crash model: loop devices and their mounts do not survive a reboot (whoever uses an
image mounts it again); a device that :func:`mount` attached is freed with its last
mount, one that :func:`attach` attached lives until :func:`detach` or the reboot.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from lamina import errors


def run_tool(*argv: str) -> str:
    """Run a system tool (util-linux's, e2fsprogs'…); its standard output.

    ``Unsupported`` when the tool is missing; an ``OSError`` (EIO) with what it said
    when it fails."""
    tool = shutil.which(argv[0])
    if tool is None:
        raise errors.Unsupported(f"{argv[0]} is missing (e2fsprogs, util-linux)", path=argv[0])
    done = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(errno.EIO, f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def mount(image: Path, mount_point: Path, *, options: Sequence[str] = ()) -> None:
    """Mount the filesystem image ``image`` at ``mount_point`` through a free loop device
    (util-linux picks it); ``options``: the mount's others (``ro``…)."""
    run_tool("mount", "-o", ",".join(("loop", *options)), str(image), str(mount_point))


def unmount(mount_point: Path) -> None:
    """Unmount an image that :func:`mount` mounted; its loop device goes with it."""
    run_tool("umount", str(mount_point))


def device_of(mount_point: Path) -> str | None:
    """The device mounted at ``mount_point`` (a loop device, for an image's mount point)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mount_point):
                return fields[fields.index("-") + 2]
    return None


def refresh_size(device: str) -> None:
    """Have the loop ``device`` see its image file's new size (after the file grew)."""
    run_tool("losetup", "-c", device)


def attach(image: Path, *, read_only: bool = False) -> str:
    """Attach ``image`` to a free loop device, without mounting it; the device's path."""
    flags = ("--read-only",) if read_only else ()
    return run_tool("losetup", "--find", "--show", *flags, str(image)).strip()


def detach(device: str) -> None:
    """Free a loop device that :func:`attach` attached (once nothing has it open)."""
    run_tool("losetup", "-d", device)

"""Image files through loop devices (``lamina.host.loop``): mounted, found under their
mount point, unmounted with their device freed; attached alone and detached."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from lamina import errors
from lamina.host import loop, mount

pytestmark = pytest.mark.root

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.fail("mkfs.ext4 or losetup is missing: scripts/bootstrap.sh installs them")
    path = tmp_path / "fs.img"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
    loop.run_tool("mkfs.ext4", "-q", "-F", str(path))
    return path


def _attached(image: Path) -> list[str]:
    """The loop devices backed by ``image``."""
    out = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return [line.split(":", 1)[0] for line in out.splitlines()]


def test_mount_then_unmount_frees_the_device(image: Path, tmp_path: Path) -> None:
    point = tmp_path / "mnt"
    point.mkdir()
    loop.mount(image, point, options=["ro"])
    try:
        device = loop.device_of(point)
        assert device is not None and device.startswith("/dev/loop")
        assert _attached(image) == [device]
        with pytest.raises(OSError):
            (point / "f").write_text("read-only")
    finally:
        if loop.device_of(point) is not None:
            loop.unmount(point)
    assert loop.device_of(point) is None
    assert _attached(image) == []


def test_attach_and_detach(image: Path, tmp_path: Path) -> None:
    device = loop.attach(image, read_only=True)
    try:
        assert device.startswith("/dev/loop")
        assert _attached(image) == [device]
        assert Path(f"/sys/block/{Path(device).name}/ro").read_text().strip() == "1"
    finally:
        loop.detach(device)
    assert _attached(image) == []


def test_a_missing_tool_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(errors.Unsupported, match="losetup is missing"):
        loop.detach("/dev/loop0")


def test_a_failing_tool_says_why(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="mount -o loop"):
        loop.mount(tmp_path / "no-such.img", tmp_path)
    assert not mount.mounted_below(str(tmp_path))

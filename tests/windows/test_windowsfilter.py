"""Windows container layers (issue: the windowsfilter layer format) on Linux.

The tests make Windows layer tars the way go-winio's backuptar and hcsshim's
ociwclayer write them (PAX records MSWINDOWS.fileattr, .rawsd, .mountpoint,
.xattr.*, LIBARCHIVE.creationtime; alternate data streams as FILE:STREAM entries;
whiteouts; hard links; the UtilityVM's BCD files), import them, and check that
``diff`` gives back the very same bytes.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import lamina
from lamina import errors
from lamina.driver import ChangeKind
from lamina.host import mount
from lamina.registry import backends

pytestmark = pytest.mark.root

# A self-relative security descriptor (owner/group SIDs, no ACLs): opaque bytes here.
RAW_SD = bytes.fromhex("0100048014000000240000000000000000000000"
                       "0101000000000005120000000102000000000005200000002002000000")
ATTR_DIR, ATTR_ARCHIVE, ATTR_REPARSE = 0x10, 0x20, 0x400


def _win(name: str, *, kind: bytes = tarfile.REGTYPE, data: bytes = b"", attrs: int = ATTR_ARCHIVE,
         link: str = "", mountpoint: bool = False, eas: dict[str, bytes] | None = None,
         sd: bool = True) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1_700_000_000
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    pax = {"MSWINDOWS.fileattr": str(attrs), "LIBARCHIVE.creationtime": "1699999999.123456789"}
    if sd:
        pax["MSWINDOWS.rawsd"] = base64.b64encode(RAW_SD).decode()
    if mountpoint:
        pax["MSWINDOWS.mountpoint"] = "1"
    for key, value in (eas or {}).items():
        pax[f"MSWINDOWS.xattr.{key}"] = base64.b64encode(value).decode()
    info.pax_headers = pax
    return info, data


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def base_layer() -> bytes:
    d = tarfile.DIRTYPE
    return _tar([
        _win("Files", kind=d, attrs=ATTR_DIR),
        _win("Files/Windows", kind=d, attrs=ATTR_DIR),
        _win("Files/Windows/System32", kind=d, attrs=ATTR_DIR),
        _win("Files/Windows/System32/kernel32.dll", data=b"MZ" + bytes(3000) + b"code",
             eas={"$KERNEL.PURGE.APPXFICACHE": b"\x01\x02"}),
        _win("Files/a.txt", data=b"hello windows\r\n"),
        _win("Files/a.txt:Zone.Identifier", data=b"[ZoneTransfer]\r\nZoneId=3\r\n", sd=False),
        _win("Files/old.txt", data=b"to be deleted"),
        _win("Files/Documents and Settings", kind=tarfile.SYMTYPE, attrs=ATTR_DIR | ATTR_REPARSE,
             link="C:\\Users", mountpoint=True),
        _win("Files/link-to-a.txt", kind=tarfile.LNKTYPE, link="Files/a.txt"),
        _win("Hives", kind=d, attrs=ATTR_DIR),
        _win("Hives/SYSTEM", data=b"regf" + bytes(500)),
        _win("UtilityVM", kind=d, attrs=ATTR_DIR),
        _win("UtilityVM/Files", kind=d, attrs=ATTR_DIR),
        _win("UtilityVM/Files/EFI", kind=d, attrs=ATTR_DIR),
        _win("UtilityVM/Files/EFI/Microsoft", kind=d, attrs=ATTR_DIR),
        _win("UtilityVM/Files/EFI/Microsoft/Boot", kind=d, attrs=ATTR_DIR),
        _win("UtilityVM/Files/EFI/Microsoft/Boot/BCD", data=b"BCD store " * 50),
        _win("UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG", data=b"log"),
        _win("UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG1", data=b""),
        _win("UtilityVM/Files/EFI/Microsoft/Boot/BCD.LOG2", data=b""),
    ])


def child_layer() -> bytes:
    whiteout = tarfile.TarInfo("Files/.wh.old.txt")
    return _tar([
        _win("Files", kind=tarfile.DIRTYPE, attrs=ATTR_DIR),
        (whiteout, b""),
        _win("Files/a.txt", data=b"hello again\r\n"),
        _win("Files/new.txt", data=b"new file"),
        _win("Files/dll-link", kind=tarfile.LNKTYPE, link="Files/Windows/System32/kernel32.dll"),
    ])


@pytest.fixture
def drv(tmp_path: Path) -> Iterator[lamina.Driver]:
    with lamina.open_driver(tmp_path / "home", backend="windowsfilter") as d:
        yield d
        d.cleanup()
    assert mount.mounted_below(str(tmp_path / "home")) == []


def _export(drv: lamina.Driver, id: str) -> bytes:
    with drv.diff(id) as tar:
        return tar.read()


def test_not_a_linux_backend() -> None:
    assert "windowsfilter" not in backends()
    assert "windowsfilter" in backends("windows")


def test_import_export_is_byte_identical(drv: lamina.Driver) -> None:
    base, child = base_layer(), child_layer()
    drv.apply_diff("base", None, io.BytesIO(base))
    drv.apply_diff("child", "base", io.BytesIO(child))
    assert _export(drv, "base") == base
    assert _export(drv, "child") == child
    # A tar written with a GNU-style record padding keeps it too.
    padded = base + bytes(10240 - len(base) % 10240)
    drv.apply_diff("padded", None, io.BytesIO(padded))
    assert _export(drv, "padded") == padded


def test_seed_layout_and_metadata_kept(drv: lamina.Driver) -> None:
    drv.apply_diff("base", None, io.BytesIO(base_layer()))
    drv.apply_diff("child", "base", io.BytesIO(child_layer()))
    layer = Path(drv.metadata("child")["dir"])
    for name in ("Files", "Hives", "UtilityVM", "layerchain.json", "layerID"):
        assert (layer / name).exists(), name
    assert json.loads((layer / "layerchain.json").read_text()) == [drv.metadata("base")["dir"]]
    assert (layer / "layerID").read_text() == "child"
    base = Path(drv.metadata("base")["dir"])
    dll = base / "Files/Windows/System32/kernel32.dll"
    assert os.getxattr(dll, "user.MSWINDOWS.rawsd") == base64.b64encode(RAW_SD)
    assert os.getxattr(dll, "user.MSWINDOWS.fileattr") == b"32"
    assert os.getxattr(dll, "user.LIBARCHIVE.creationtime") == b"1699999999.123456789"
    assert os.getxattr(dll, "user.MSWINDOWS.xattr.$KERNEL.PURGE.APPXFICACHE") == base64.b64encode(
        b"\x01\x02")
    assert (base / "Files/a.txt:Zone.Identifier").read_bytes().startswith(b"[ZoneTransfer]")
    assert os.readlink(base / "Files/Documents and Settings") == "C:\\Users"
    assert os.stat(base / "Files/link-to-a.txt").st_ino == os.stat(base / "Files/a.txt").st_ino
    assert (base / "bcd.bak").read_bytes() == b"BCD store " * 50


def test_union_view_and_changes(drv: lamina.Driver) -> None:
    drv.apply_diff("base", None, io.BytesIO(base_layer()))
    drv.apply_diff("child", "base", io.BytesIO(child_layer()))
    view = drv.get("child")
    try:
        assert (view / "a.txt").read_bytes() == b"hello again\r\n"
        assert (view / "new.txt").read_bytes() == b"new file"
        assert not (view / "old.txt").exists()
        assert (view / "Windows/System32/kernel32.dll").read_bytes().endswith(b"code")
        assert (view / "dll-link").read_bytes().endswith(b"code")
    finally:
        drv.put("child")
    got = {(c.kind, c.path) for c in drv.changes("child")}
    assert got == {(ChangeKind.DELETE, "/old.txt"), (ChangeKind.MODIFY, "/a.txt"),
                   (ChangeKind.ADD, "/new.txt"), (ChangeKind.ADD, "/dll-link")}
    assert drv.diff_size("child") == len(b"hello again\r\n") + len(b"new file")


def test_diff_getter_serves_the_bcd_backups(drv: lamina.Driver) -> None:
    drv.apply_diff("base", None, io.BytesIO(base_layer()))
    layer = Path(drv.metadata("base")["dir"])
    # Windows' import mutates the BCD store in place; the getter must give the original.
    (layer / "UtilityVM/Files/EFI/Microsoft/Boot/BCD").write_bytes(b"mutated")
    with drv.diff_getter("base") as getter:
        assert getter.get("UtilityVM/Files/EFI/Microsoft/Boot/BCD").read() == b"BCD store " * 50
        assert getter.get("Files/a.txt").read() == b"hello windows\r\n"


@pytest.mark.parametrize(
    ("name", "members"),
    [
        ("dot-dot", [_win("Files/../etc/passwd", data=b"x")]),
        ("drive-letter", [_win("C:/Windows/x", data=b"x")]),
        ("drive-in-files", [_win("Files/C:/x", data=b"x")]),
        ("backslash", [_win("Files\\x", data=b"x")]),
        ("absolute", [_win("/Files/x", data=b"x")]),
        ("outside-roots", [_win("Other/x", data=b"x")]),
        ("utilityvm-not-files", [_win("UtilityVM/Other/x", data=b"x")]),
        ("hardlink-from-hives", [_win("Files/a", data=b"x"),
                                 _win("Hives/h", kind=tarfile.LNKTYPE, link="Files/a")]),
        ("hardlink-out", [_win("Files/a", kind=tarfile.LNKTYPE, link="../../etc/passwd")]),
        ("device", [_win("Files/dev", kind=tarfile.CHRTYPE)]),
        ("stream-on-dir", [_win("Files/d:s", kind=tarfile.DIRTYPE, attrs=ATTR_DIR)]),
    ],
)
def test_hostile_names_are_refused(drv: lamina.Driver, tmp_path: Path, name: str,
                                   members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with pytest.raises(errors.UnsafeArchive):
        drv.apply_diff("bad", None, io.BytesIO(_tar(members)))
    assert not drv.exists("bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_whiteouts_only_where_allowed(drv: lamina.Driver) -> None:
    with pytest.raises(errors.UnsafeArchive, match="base layer"):
        drv.apply_diff("base0", None, io.BytesIO(_tar([(tarfile.TarInfo("Files/.wh.x"), b"")])))
    drv.apply_diff("base", None, io.BytesIO(base_layer()))
    with pytest.raises(errors.UnsafeArchive, match="Files/"):
        drv.apply_diff("c", "base", io.BytesIO(_tar([(tarfile.TarInfo("Hives/.wh.SYSTEM"),
                                                       b"")])))
    assert not drv.exists("c")


def test_writable_layers_need_windows(drv: lamina.Driver) -> None:
    with pytest.raises(errors.Unsupported):
        drv.create_rw("sandbox")


def test_check_covers_windows_layers(drv: lamina.Driver) -> None:
    from lamina.backends import check

    drv.apply_diff("base", None, io.BytesIO(base_layer()))
    drv.apply_diff("child", "base", io.BytesIO(child_layer()))
    assert check.check(drv).consistent
    (Path(drv.metadata("base")["dir"]) / "Hives/SYSTEM").write_bytes(b"regf" + bytes(499) + b"!")
    report = check.check(drv)
    assert any("/Hives/SYSTEM" in p for p in report.problems), report.problems

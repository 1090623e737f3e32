"""The Windows import isolated and inline (``LAMINA_NOREEXEC=1``) give the same layers.

The suite's Windows tars (and compressed ones, and one big enough for many blocks of the
pipe) imported both ways: the same files, metadata, tombstones and links, the same
``diff`` (the imported tar, byte for byte), changes and sizes; the same errors (class,
message, path) for bad tars, damaged compressed streams and a stream that fails; the same
progress.  The times of both are printed.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import statistics
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lamina
from lamina import errors, progress
from lamina.archive import isolate, wclayer
from lamina.host import mount
from tests import tarbuild as tb
from tests.windows.test_windowsfilter import ATTR_DIR, _tar, _win, base_layer, child_layer

pytestmark = pytest.mark.root

MODES = ("child", "inline")


def big_layer() -> bytes:
    """Many small files and a few big ones: the tar crosses the pipe in many blocks."""
    d = tarfile.DIRTYPE
    members = [_win("Files", kind=d, attrs=ATTR_DIR), _win("Files/many", kind=d, attrs=ATTR_DIR)]
    members += [_win(f"Files/many/f{i}.txt", data=f"file {i}\r\n".encode() * (i % 50))
                for i in range(400)]
    members += [_win(f"Files/big{i}.bin", data=os.urandom(3 << 20)) for i in range(3)]
    members += [_win("Files/big0.bin:stream", data=os.urandom(100_000), sd=False),
                _win("Files/big-link", kind=tarfile.LNKTYPE, link="Files/big1.bin"),
                _win("Hives", kind=d, attrs=ATTR_DIR), _win("Hives/SOFTWARE", data=b"regf" * 999)]
    return _tar(members)


def chain() -> dict[str, tuple[str | None, bytes, bytes]]:
    """id: (parent, the tar, the stream given to apply_diff), parents first."""
    base, child, big = base_layer(), child_layer(), big_layer()
    padded = base + bytes(10240 - len(base) % 10240)
    return {
        "base": (None, base, base),
        "child": ("base", child, child),
        "padded": (None, padded, padded),
        "gzip": (None, base, tb.gzipped(base)),
        "zstd-child": ("base", child, tb.zstd_compressed(child)),
        "big": ("base", big, tb.gzipped(big)),
    }


def _set_mode(mp: pytest.MonkeyPatch, mode: str) -> None:
    if mode == "inline":
        mp.setenv(isolate.NOREEXEC, "1")
    else:
        mp.delenv(isolate.NOREEXEC, raising=False)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both stores, each with every layer of :func:`chain` imported its way."""
    layers = chain()
    drvs: dict[str, lamina.Driver] = {}
    took: dict[str, dict[str, float]] = {}
    with pytest.MonkeyPatch.context() as mp:
        for mode in MODES:
            _set_mode(mp, mode)
            home = tmp_path_factory.mktemp(mode) / "home"
            drv = drvs[mode] = lamina.open_driver(home, backend="windowsfilter")
            took[mode] = {}
            for id, (parent, _, given) in layers.items():
                start = time.perf_counter()
                drv.apply_diff(id, parent, io.BytesIO(given))
                took[mode][id] = time.perf_counter() - start
                assert (isolate.last_child_usage() is None) == (mode == "inline")
    yield {"drvs": drvs, "layers": layers, "took": took}
    for drv in drvs.values():
        drv.cleanup()
        drv.close()
        assert mount.mounted_below(str(drv.home)) == []


def _export(drv: lamina.Driver, id: str) -> bytes:
    with drv.diff(id) as tar:
        return tar.read()


def fingerprint(layer: Path) -> dict[str, Any]:
    """Everything of a layer's content: each path's kind, mode, owner, data, link target,
    device, xattrs and hard links; the record and the backups byte for byte."""
    out: dict[str, Any] = {}
    first: dict[int, str] = {}
    names = [*wclayer.ROOTS, wclayer.RECORD, *wclayer.MUTATED.values()]
    paths = [layer / n for n in names if os.path.lexists(layer / n)]
    for top in list(paths):
        if top.is_dir() and not top.is_symlink():
            paths += sorted(top.rglob("*"))
    for path in paths:
        rel = str(path.relative_to(layer))
        st = os.lstat(path)
        item: dict[str, Any] = {"mode": st.st_mode, "owner": (st.st_uid, st.st_gid),
                                "xattrs": {k: os.getxattr(path, k, follow_symlinks=False)
                                           for k in sorted(os.listxattr(path,
                                                                        follow_symlinks=False))}}
        if stat.S_ISREG(st.st_mode):
            item["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            item["link_of"] = first.setdefault(st.st_ino, rel)
        elif stat.S_ISLNK(st.st_mode):
            item["target"] = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode):
            item["rdev"] = st.st_rdev
        out[rel] = item
    return out


@pytest.mark.parametrize("id", list(chain()))
def test_both_modes_give_identical_layers(imported: dict[str, Any], id: str) -> None:
    child, inline = imported["drvs"]["child"], imported["drvs"]["inline"]
    _, tar, _ = imported["layers"][id]
    exported = {mode: _export(drv, id) for mode, drv in imported["drvs"].items()}
    assert exported["child"] == exported["inline"] == tar
    trees = {mode: fingerprint(Path(drv.metadata(id)["dir"]))
             for mode, drv in imported["drvs"].items()}
    assert trees["child"] == trees["inline"]
    assert len(trees["child"]) > 3
    assert child.diff_size(id) == inline.diff_size(id)
    assert child.changes(id) == inline.changes(id)
    with child.diff_getter(id) as a, inline.diff_getter(id) as b:
        path = "Files/a.txt" if id != "big" else "Files/big0.bin:stream"
        assert a.get(path).read() == b.get(path).read()


def test_timings(imported: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> None:
    """The import of the suite's tars, isolated and inline: the medians of a few runs
    (printed; the bound only catches a child that costs seconds)."""
    tars = {"base": base_layer(), "child": child_layer(), "big": big_layer()}
    with lamina.open_driver(tmp_path / "home", backend="windowsfilter") as drv:
        drv.apply_diff("parent", None, io.BytesIO(tars["base"]))
        medians: dict[str, dict[str, float]] = {}
        for name, data in tars.items():
            runs = 3 if name == "big" else 15
            medians[name] = {}
            for mode in MODES:
                _set_mode(monkeypatch, mode)
                took = []
                for i in range(runs):
                    id = f"{name}-{mode}-{i}"
                    start = time.perf_counter()
                    drv.apply_diff(id, "parent", io.BytesIO(data))
                    took.append(time.perf_counter() - start)
                    drv.remove(id)
                medians[name][mode] = statistics.median(took) * 1000
        drv.cleanup()
    with capsys.disabled():
        print()
        for name, data in tars.items():
            child, inline = medians[name]["child"], medians[name]["inline"]
            print(f"[windowsfilter] import of {name} ({len(data) / 1024:.0f} KiB): isolated "
                  f"{child:.1f} ms, inline {inline:.1f} ms, the child's cost "
                  f"{child - inline:.1f} ms")
    for name in tars:
        assert medians[name]["child"] - medians[name]["inline"] < 1000


def _members(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    return _tar(list(members))


def _damaged_gzip() -> bytes:
    packed = bytearray(tb.gzipped(big_layer()))
    middle = len(packed) // 2
    packed[middle : middle + 64] = bytes(64)
    return bytes(packed)


BAD = {
    "dot-dot": _members(_win("Files/../etc/passwd", data=b"x")),
    "drive-letter": _members(_win("C:/Windows/x", data=b"x")),
    "backslash": _members(_win("Files\\x", data=b"x")),
    "device": _members(_win("Files/dev", kind=tarfile.CHRTYPE)),
    "hardlink-out": _members(_win("Files/a", kind=tarfile.LNKTYPE, link="../../etc/passwd")),
    "hardlink-missing": _members(_win("Files/a", kind=tarfile.LNKTYPE, link="Files/nothing")),
    "base-whiteout": _members((tarfile.TarInfo("Files/.wh.x"), b"")),
    "not-a-dir": _members(_win("Files/f", data=b"x"), _win("Files/f/g", data=b"y")),
    "truncated": base_layer()[:3000],
    "truncated-in-data": big_layer()[: 4 << 20],
    "garbage": b"this is not a tar" * 100,
    "trailing-too-much": base_layer() + b"x" * (2 << 20),
    "damaged-gzip": _damaged_gzip(),
    "cut-zstd": tb.zstd_compressed(big_layer())[: 3 << 20],
}


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
def test_errors_come_back_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   data: bytes) -> None:
    """Every bad tar fails with the same LaminaError (class, message, path) both ways, and
    leaves no layer (a bad tar's error comes from the child's parse, a damaged compressed
    stream's from the caller's read: the child raises it where the stream failed)."""
    seen = []
    with lamina.open_driver(tmp_path / "home", backend="windowsfilter") as drv:
        for mode in MODES:
            _set_mode(monkeypatch, mode)
            with pytest.raises(errors.LaminaError) as info:
                drv.apply_diff(f"bad-{mode}", None, io.BytesIO(data))
            e = info.value
            seen.append((type(e), str(e).replace(f"bad-{mode}", "ID"), e.path))
            assert not drv.exists(f"bad-{mode}")
        assert os.listdir(drv.home / "staging") == []
    assert seen[0] == seen[1]


class Failing:
    """A stream that fails (not as a damaged stream does) after ``after`` bytes."""

    def __init__(self, data: bytes, after: int) -> None:
        self.data, self.after, self.pos = data, after, 0

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.after:
            raise RuntimeError("the source went away")
        out = self.data[self.pos : min(self.after, self.pos + (n if n >= 0 else self.after))]
        self.pos += len(out)
        return out


def test_a_failing_stream_fails_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with lamina.open_driver(tmp_path / "home", backend="windowsfilter") as drv:
        for mode in MODES:
            _set_mode(monkeypatch, mode)
            with pytest.raises(RuntimeError, match="the source went away"):
                drv.apply_diff(f"f-{mode}", None, Failing(big_layer(), 5 << 20))  # type: ignore[arg-type]
            assert not drv.exists(f"f-{mode}")
        assert os.listdir(drv.home / "staging") == []
        drv.apply_diff("after", None, io.BytesIO(base_layer()))  # the fork server still serves


def test_progress_is_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = big_layer()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        entries = len(tf.getmembers())
    with lamina.open_driver(tmp_path / "home", backend="windowsfilter") as drv:
        for mode in MODES:
            _set_mode(monkeypatch, mode)
            done = [0, 0]

            def report(nbytes: int, nentries: int, done: list[int] = done) -> None:
                done[0] += nbytes
                done[1] += nentries

            with progress.reporting(report):
                drv.apply_diff(f"p-{mode}", None, io.BytesIO(data))
            assert done[1] == entries, mode
            # Inline, the bytes of the members; isolated, the stream's (its end too).
            assert len(data) - 10240 < done[0] <= len(data), mode

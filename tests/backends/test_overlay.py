"""The overlay backend's own promises: deep chains, mounts, recovery, where it cannot work."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

import lamina
from lamina import errors
from lamina.backends.overlay import max_depth, why_unsupported
from lamina.host import mount
from tests import tarbuild as tb
from tests.conftest import mounts_under

pytestmark = pytest.mark.root


def _layer_tar(i: int) -> io.BytesIO:
    return io.BytesIO(tb.build([tb.file(f"layers/f{i}", f"layer {i}\n".encode())]))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def _mounts_under(path: Path) -> list[str]:
    """The union mounts below ``path`` (not the EROFS layers' own)."""
    return mounts_under(path)


def test_auto_picks_overlay_here(home: Path) -> None:
    if why_unsupported(home) is not None:
        pytest.fail(f"overlay should work as root here: {why_unsupported(home)}")
    with lamina.open_driver(home) as drv:
        assert drv.name == "overlay"


def test_deep_chain_mounts_and_reads_every_layer(home: Path) -> None:
    depth = max_depth()  # 500 with the new mount API, 128 through mount(2)
    with lamina.open_driver(home, backend="overlay") as drv:
        parent = None
        for i in range(depth):
            drv.apply_diff(f"l{i}", parent, _layer_tar(i))
            parent = f"l{i}"
        top = drv.get(parent)
        try:
            for i in range(depth):
                assert (top / f"layers/f{i}").read_text() == f"layer {i}\n"
        finally:
            drv.put(parent)
        # A writable layer on top takes all the lowers plus its own upper.
        drv.create_rw("ctr", parent)
        root = drv.get("ctr")
        (root / "layers/new").write_text("x")
        assert (root / "layers/f0").read_text() == "layer 0\n"
        drv.put("ctr")
        assert [c.path for c in drv.changes("ctr")] == ["/layers", "/layers/new"]
        # One more layer is refused before anything is written.
        before = sorted(os.listdir(home / "layers")), sorted(os.listdir(home / "l"))
        with pytest.raises(errors.InvalidArgument, match="max depth"):
            drv.apply_diff("too-deep", parent, _layer_tar(depth))
        with pytest.raises(errors.InvalidArgument, match="max depth"):
            drv.create("too-deep", parent)
        assert (sorted(os.listdir(home / "layers")), sorted(os.listdir(home / "l"))) == before
        assert not drv.exists("too-deep")
        assert os.listdir(home / "staging") == []
        drv.cleanup()
    assert _mounts_under(home) == []


def test_metadata_names_overlay_dirs(home: Path) -> None:
    with lamina.open_driver(home, backend="overlay") as drv:
        drv.apply_diff("base", None, _layer_tar(0))
        drv.create_rw("ctr", "base")
        meta = drv.metadata("ctr")
        assert meta["LowerDir"] == str(home / "layers/base/diff")
        assert meta["UpperDir"] == str(home / "layers/ctr/diff")
        assert meta["WorkDir"] == str(home / "layers/ctr/work")
        assert meta["MergedDir"] == str(home / "layers/ctr/merged")
        assert Path(meta["dir"]).is_dir()


def test_get_mounts_once_and_put_unmounts(home: Path) -> None:
    with lamina.open_driver(home, backend="overlay") as drv:
        drv.apply_diff("base", None, _layer_tar(0))
        drv.create_rw("ctr", "base")
        first = drv.get("ctr")
        assert drv.get("ctr") == first
        assert _mounts_under(home) == [str(first)]
        drv.put("ctr")
        assert _mounts_under(home) == [str(first)]
        drv.put("ctr")
        assert _mounts_under(home) == []


def test_mount_counts_are_shared_between_processes(home: Path) -> None:
    with lamina.open_driver(home, backend="overlay") as drv:
        drv.apply_diff("base", None, _layer_tar(0))
        drv.create_rw("ctr", "base")
    code = (
        "import lamina, sys\n"
        "d = lamina.open_driver(sys.argv[1], backend='overlay')\n"
        "print(d.get('ctr'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(home)], check=True, capture_output=True, text=True
    ).stdout.strip()
    with lamina.open_driver(home, backend="overlay") as drv:
        assert drv.mount_count("ctr") == 1  # the other process's get outlives it
        assert drv.get("ctr") == Path(out)
        assert drv.mount_count("ctr") == 2
        drv.put("ctr")
        drv.put("ctr")
        assert _mounts_under(home) == []


def test_open_unmounts_an_uncounted_mount_and_resets_a_count_without_mount(home: Path) -> None:
    with lamina.open_driver(home, backend="overlay") as drv:
        drv.apply_diff("base", None, _layer_tar(0))
        drv.create_rw("a", "base")
        drv.create_rw("b", "base")
        merged_a = drv.get("a")
        merged_b = drv.get("b")
    # A process that died between mount and count: the mount has no count.
    os.unlink(home / "mounts" / "a")
    # A reboot or a lazy unmount: the count has no mount.
    mount.unmount(str(merged_b))
    with lamina.open_driver(home, backend="overlay") as drv:
        assert _mounts_under(home) == []
        assert drv.mount_count("a") == 0
        assert drv.mount_count("b") == 0
        assert drv.get("a") == merged_a
        drv.put("a")


def test_remove_unmounts_a_mounted_layer(home: Path) -> None:
    with lamina.open_driver(home, backend="overlay") as drv:
        drv.apply_diff("base", None, _layer_tar(0))
        drv.create_rw("ctr", "base")
        drv.get("ctr")
        drv.remove("ctr")
        assert _mounts_under(home) == []
        assert not drv.exists("ctr")


def test_home_on_overlayfs_is_unsupported_and_auto_falls_back(tmp_path: Path) -> None:
    for sub in ("lower", "upper", "work", "merged"):
        (tmp_path / sub).mkdir()
    mount.mount_overlay(
        str(tmp_path / "merged"),
        [str(tmp_path / "lower")],
        str(tmp_path / "upper"),
        str(tmp_path / "work"),
    )
    try:
        home = tmp_path / "merged" / "home"
        with pytest.raises(errors.Unsupported, match="overlay"):
            lamina.open_driver(home, backend="overlay")
        with lamina.open_driver(home) as drv:
            assert drv.name == "vfs"
    finally:
        mount.unmount(str(tmp_path / "merged"))


def test_home_records_its_backend(home: Path) -> None:
    with lamina.open_driver(home, backend="overlay"):
        pass
    with pytest.raises(errors.InvalidArgument, match="overlay"):
        lamina.open_driver(home, backend="vfs")
    with lamina.open_driver(home) as drv:
        assert drv.name == "overlay"


def test_unsupported_when_not_root() -> None:
    # setpriv comes with util-linux, which every Debian has.
    assert shutil.which("setpriv"), "setpriv (util-linux) is missing"
    # Somewhere an unprivileged user can reach (pytest's own tmp dir is root's alone).
    tmp_path = Path(tempfile.mkdtemp(prefix="lamina-nonroot-", dir="/var/tmp"))
    try:
        _check_unsupported_when_not_root(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _check_unsupported_when_not_root(tmp_path: Path) -> None:
    # An ordinary user outside a user namespace can keep no layers (overlay cannot
    # mount, vfs cannot chown): every backend, auto included, says so before writing.
    code = (
        "import lamina, sys\n"
        "from lamina import errors\n"
        "for backend in ('overlay', 'vfs', 'auto'):\n"
        "    try:\n"
        "        lamina.open_driver(sys.argv[1], backend=backend)\n"
        "    except errors.Unsupported as e:\n"
        "        print('unsupported:', e)\n"
    )
    tmp_path.chmod(0o777)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
            str(tmp_path / "h"),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert all("cannot keep layers as uid 65534 outside a user namespace" in line
               and "rootlesskit" in line for line in lines), out
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_failed_build_leaves_no_short_link(home: Path) -> None:
    """An apply cut short leaves no ``l/`` link behind, and a layer made again under the
    same id has exactly one; a stray second link is found by check and repaired."""
    from lamina.backends import check

    with lamina.open_driver(home, backend="overlay") as overlay:
        _links_after_failure(overlay, check)


def _links_after_failure(overlay: lamina.Driver, check: Any) -> None:
    links = overlay.home / "l"
    before = set(os.listdir(links))
    cut = tb.build([tb.file("a", b"x" * 5000)])[:1024]
    with pytest.raises(errors.UnsafeArchive):
        overlay.apply_diff("again", None, io.BytesIO(cut))
    assert set(os.listdir(links)) == before
    overlay.create("again")
    mine = set(os.listdir(links)) - before
    assert len(mine) == 1
    assert check.check(overlay).consistent
    (links / "STRAYSECONDLINK").symlink_to("../layers/again/diff")
    report = check.check(overlay)
    assert "l/STRAYSECONDLINK: a short link to a layer that is gone" in report.problems
    check.check(overlay, repair=True)
    assert set(os.listdir(links)) - before == mine
    assert check.check(overlay).consistent

"""The host primitives that make a small layer durable (:mod:`lamina.host.fsutil`).

Durability itself shows only across a power cut (not here); what is checked is which
way a tree is synced, and that the way never blocks or skips what it must sync."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.host import fsutil


def small_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    for name in ("hosts", "hostname", "resolv.conf"):
        (root / "etc" / name).write_text(name)
    (root / "etc" / "mtab").symlink_to("/proc/mounts")
    (root / "dev").mkdir()
    return root


def test_a_small_tree_is_fsynced_entry_by_entry(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = small_tree(tmp_path / "layer")
    (tmp_path / "l").mkdir()
    synced: list[str] = []
    monkeypatch.setattr(fsutil, "_fsync_path", synced.append)
    assert fsutil.sync_small_tree(root, [tmp_path / "l"])
    want = {str(root), str(root / "etc"), str(root / "dev"), str(tmp_path / "l"),
            *(str(root / "etc" / n) for n in ("hosts", "hostname", "resolv.conf"))}
    assert sorted(synced) == sorted(want)  # the symlink's entry is its directory's


def test_the_fsyncs_run_side_by_side_and_report_errors(tmp_path: Path) -> None:
    root = small_tree(tmp_path / "layer")
    assert fsutil.sync_small_tree(root)  # really fsynced, on the pool
    with pytest.raises(FileNotFoundError):
        fsutil.sync_small_tree(root, [tmp_path / "missing"])


def test_a_large_tree_or_a_special_file_is_left_to_syncfs(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    for i in range(fsutil.SMALL_TREE + 1):
        (big / f"f{i}").write_text("x")
    assert not fsutil.sync_small_tree(big)
    odd = small_tree(tmp_path / "odd")
    os.mkfifo(odd / "etc" / "fifo")  # an open would block; a whiteout cannot be opened
    assert not fsutil.sync_small_tree(odd)


@pytest.mark.parametrize("dirty", [0, 1 << 30])
def test_sync_tree_takes_the_cheaper_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         dirty: int) -> None:
    root = small_tree(tmp_path / "layer")
    os.mkfifo(tmp_path / "layer" / "fifo-elsewhere")
    calls: list[str] = []
    monkeypatch.setattr(fsutil, "_dirty_bytes", lambda: dirty)
    monkeypatch.setattr(fsutil, "syncfs", lambda p: calls.append("syncfs"))
    fsutil.sync_tree(root)
    assert calls == ["syncfs"]  # quiet: one syncfs; busy: the fifo rules fsyncs out
    os.unlink(tmp_path / "layer" / "fifo-elsewhere")
    calls.clear()
    fsutil.sync_tree(root)
    assert calls == (["syncfs"] if dirty < fsutil.QUIET_DIRTY else [])


def test_dirty_bytes_reads_the_machine(tmp_path: Path) -> None:
    assert 0 <= fsutil._dirty_bytes() < 1 << 62


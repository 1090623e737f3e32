"""Small verbs the suites use on a store: apply a spec, look at a layer's union view."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lamina
from tests import tarbuild as tb
from tests.snapshot import Node, hardlink_groups, snapshot


def apply(drv: lamina.Driver, id: str, parent: str | None, entries: Iterable[tb.Entry]) -> int:
    """``apply_diff`` of the tar built from ``entries``."""
    return drv.apply_diff(id, parent, tb.stream(entries))


@contextmanager
def mounted(drv: lamina.Driver, id: str) -> Iterator[Path]:
    """The union view of ``id`` for the ``with`` block (``get``, then ``put``)."""
    root = drv.get(id)
    try:
        yield Path(root)
    finally:
        drv.put(id)


def tree(drv: lamina.Driver, id: str) -> dict[str, Node]:
    """:func:`snapshot` of the union view of ``id``."""
    with mounted(drv, id) as root:
        return snapshot(root)


def links(drv: lamina.Driver, id: str) -> set[frozenset[str]]:
    """:func:`hardlink_groups` of the union view of ``id``."""
    with mounted(drv, id) as root:
        return hardlink_groups(root)


def names(drv: lamina.Driver, id: str) -> set[str]:
    """Every path of the union view of ``id`` but ``/``."""
    return set(tree(drv, id)) - {"/"}


def read(drv: lamina.Driver, id: str, path: str) -> bytes:
    """The content of ``path`` in the union view of ``id``."""
    with mounted(drv, id) as root:
        return (root / path.lstrip("/")).read_bytes()


def lstat(drv: lamina.Driver, id: str, path: str) -> os.stat_result:
    """``lstat`` of ``path`` in the union view of ``id``."""
    with mounted(drv, id) as root:
        return os.lstat(root / path.lstrip("/"))


def kind(drv: lamina.Driver, id: str, path: str) -> str | None:
    """``file``, ``dir``, ``symlink``, … of ``path`` in ``id``, or None when absent."""
    with mounted(drv, id) as root:
        try:
            mode = os.lstat(root / path.lstrip("/")).st_mode
        except FileNotFoundError:
            return None
    return {
        stat.S_IFREG: "file",
        stat.S_IFDIR: "dir",
        stat.S_IFLNK: "symlink",
        stat.S_IFIFO: "fifo",
        stat.S_IFCHR: "char",
        stat.S_IFBLK: "block",
    }[stat.S_IFMT(mode)]


def listing(path: Path) -> set[str]:
    """Every path under ``path``, relative to it (the store's own files included)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        out.update(os.path.normpath(os.path.join(rel, n)) for n in dirnames + filenames)
    return out


def is_stored_tar(drv: lamina.Driver, id: str) -> bool:
    """Whether layer ``id`` is kept as the tar it was applied from (overlay's EROFS
    layers: their diff is that tar, byte for byte)."""
    from lamina.backends.contract import backend_of
    from lamina.store.meta import LayerFormat

    return backend_of(drv).record(id).format is LayerFormat.EROFS

"""overlayfs' native diff: a layer's changes read from its own upper directory.

An overlay layer's ``diff/`` holds exactly what it changes, with overlayfs' markers
for what it hides: a 0/0 character device for a deleted name (a whiteout) and the
``trusted.overlay.opaque`` xattr on a directory that hides its lower namesake's
content.  So the changes against the layer's own parent, and the tar of them, come
from ``diff/`` alone, the lower layers consulted only for the paths that changed —
the same answers the naive comparison of the two union views
(:mod:`lamina.archive.naivediff`) gives, at a cost proportional to the change.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from lamina.archive import naivediff
from lamina.archive.apply import lower_lookup
from lamina.archive.export import Action, Dirs, Item
from lamina.archive.union import is_whiteout, opaque, opaque_path
from lamina.driver import Change, ChangeKind
from lamina.host.fsutil import DIR_FLAGS


def native_items(diff: Path) -> Iterator[Item]:
    """The export of an overlay ``diff/`` as it is: whiteouts and opaque markers turned back.

    Depth first, each directory's entries sorted, as Docker's archiver walks.  Directories
    are opened from the layer root without following links (``scandir`` of an fd,
    ``fstatat``), so one swapped for a symlink meanwhile cannot lead the walk out of the
    layer; each item carries the lstat it was found with, for the export's header.
    """
    root = os.open(diff, DIR_FLAGS)
    dirs = Dirs(root)
    try:
        stack = [("", iter(_listing(root)))]
        while stack:
            rel, entries = stack[-1]
            found = next(entries, None)
            if found is None:
                stack.pop()
                continue
            name, st = found
            path = f"{rel}/{name}" if rel else name
            if is_whiteout(st):
                yield Item(path, Action.WHITEOUT)
                continue
            yield Item(path, Action.ENTRY, st)
            if stat.S_ISDIR(st.st_mode):
                try:
                    fd = dirs.open(path)
                    hidden = opaque(fd)
                    listing = _listing(fd)
                except OSError:
                    continue  # replaced or removed since its parent was listed
                if hidden:
                    yield Item(path, Action.OPAQUE)
                stack.append((path, iter(listing)))
    finally:
        dirs.close()
        os.close(root)


def _listing(fd: int) -> list[tuple[str, os.stat_result]]:
    """A directory's entries, sorted by name, with their lstat (through the fd)."""
    out = []
    with os.scandir(fd) as it:
        for entry in it:
            try:
                out.append((entry.name, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue  # gone since the listing (a running container's layer)
    out.sort(key=lambda pair: pair[0])
    return out


def native_changes(diff: Path, lowers: list[str]) -> list[Change]:
    """A layer's changes from its ``diff/`` and the lowers' view of the paths it touches.

    The same answers as the naive diff of the two union views would give.
    """
    out: list[Change] = []
    _native_dir(str(diff), lowers, [], out, hidden=False)
    out.sort()
    return out


def _native_dir(diff: str, lowers: list[str], parts: list[str], out: list[Change],
                hidden: bool) -> None:
    here = os.path.join(diff, *parts)
    with os.scandir(here) as it:
        entries = list(it)
    for entry in entries:
        sub = [*parts, entry.name]
        path = "/" + "/".join(sub)
        st = entry.stat(follow_symlinks=False)
        lower = None if hidden else lower_lookup(lowers, sub)
        if is_whiteout(st):
            if lower is not None:
                out.append(Change(path, ChangeKind.DELETE))
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if lower is None:
            out.append(Change(path, ChangeKind.ADD))
            if is_dir:
                _native_dir(diff, lowers, sub, out, hidden=True)
            continue
        lpath, lst = lower
        changed = _differs(lpath, lst, os.path.join(here, entry.name), st)
        mark = len(out)
        if changed:
            out.append(Change(path, ChangeKind.MODIFY))
        if is_dir:
            hides = opaque_path(os.path.join(here, entry.name))
            if not stat.S_ISDIR(lst.st_mode):
                _native_dir(diff, lowers, sub, out, hidden=True)
            else:
                # Paths compare with the parent's view by path, opaque or not (as
                # the naive diff does): what is there again is a modification.
                _native_dir(diff, lowers, sub, out, hidden=False)
                if hides:
                    _hidden_children(lpath, lowers, sub, os.path.join(here, entry.name), out)
            if len(out) > mark and not changed:
                out.insert(mark, Change(path, ChangeKind.MODIFY))


def _hidden_children(lpath: str, lowers: list[str], parts: list[str], upper: str,
                     out: list[Change]) -> None:
    # An opaque directory deletes every lower child it does not have itself.
    present = set(os.listdir(upper))
    lower_names: set[str] = set()
    for lower in lowers:
        base = os.path.join(lower, *parts)
        try:
            for name in os.listdir(base):
                lower_names.add(name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if opaque_path(base):
            break
    for name in sorted(lower_names - present):
        if lower_lookup(lowers, [*parts, name]) is not None:
            out.append(Change("/" + "/".join([*parts, name]), ChangeKind.DELETE))


def _differs(lpath: str, lst: os.stat_result, upath: str, ust: os.stat_result) -> bool:
    ldir, lname = os.path.split(lpath)
    udir, uname = os.path.split(upath)
    if lname != uname:  # pragma: no cover - same path in both
        return True
    lfd = os.open(ldir, DIR_FLAGS)
    try:
        ufd = os.open(udir, DIR_FLAGS)
        try:
            return naivediff.differs(lfd, ufd, lname, lst, ust)
        finally:
            os.close(ufd)
    finally:
        os.close(lfd)

"""Lamina's EROFS images against erofs-utils' own (1.9, in the lab: :mod:`tests.lab`).

``mkfs.erofs --tar=f --aufs`` makes a whole image (its data in it) of the same tar,
whiteouts and opaque markers as overlayfs has them, as lamina's image over the tar
has them; the kernel mounts both and the trees must be the same: names, types, modes,
owners, sizes, contents, xattrs, link targets, devices, mtimes, link counts and
hard-link groups (:func:`tests.erofsimages.compare_with_mkfs`, which also says what
the two tools do differently on purpose).  The trees: the builders' one of
tests/archive/test_erofs.py, the corpus's rootfs and image layers, generated tars.
And ``fsck.erofs``, which every test of the EROFS writer runs on the images it
writes, is seen to refuse a damaged one.
"""

from __future__ import annotations

import dataclasses
import json
import tarfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import tarbuild as tb
from tests.archive.test_erofs import ENTRIES, _layer, _member
from tests.erofsimages import (
    compare_with_mkfs,
    fsck,
    index,
    mkfs_image,
    mounted,
    mounted_whole,
    picture,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("erofs_fsck")]


def _own_whiteouts_left_out(members: list[tb.Entry]) -> list[tb.Entry]:
    """``members`` without the whiteouts of the tar's own members (before or after
    them), which mkfs.erofs lets replace the member and lamina does not."""
    names = {m.name for m in members}
    kept = []
    for m in members:
        parent, _, base = m.name.rpartition("/")
        if base.startswith(tb.WHITEOUT_PREFIX) and base != tb.OPAQUE_NAME:
            target = f"{parent}/{base[4:]}" if parent else base[4:]
            if any(n == target or n.startswith(target + "/") for n in names):
                continue
        kept.append(m)
    return kept


def _xattrs_set_once(members: list[tb.Entry]) -> list[tb.Entry]:
    """``members`` where a directory named again does not set again an xattr it had:
    mkfs.erofs 1.9.4 keeps the first value beside the second (``listxattr`` names it
    twice, ``getxattr`` reads the first), lamina keeps the later one, as extraction
    does."""
    had: dict[str, set[str]] = {}
    out = []
    for m in members:
        if m.type == tarfile.DIRTYPE:
            seen = had.setdefault(m.name, set())
            m = dataclasses.replace(m, xattrs={k: v for k, v in m.xattrs.items()
                                               if k not in seen})
            seen.update(m.xattrs)
        out.append(m)
    return out


def test_fsck_refuses_a_damaged_image(tmp_path: Path) -> None:
    # The oracle can fail: a good image passes, one with a directory's block zeroed not.
    tar = tb.write(tmp_path / "layer.tar", [tb.file(f"d/f{i}", b"x") for i in range(50)])
    cases = []
    for name in ("good", "bad"):
        case = tmp_path / name
        case.mkdir()
        (case / "layer.tar").write_bytes(tar.read_bytes())
        index(case / "layer.tar", case / "meta.erofs")
        cases.append(case)
    image = (cases[1] / "meta.erofs").read_bytes()
    with open(cases[1] / "meta.erofs", "r+b") as f:
        f.seek(len(image) - 512)  # the last block: a directory's entries
        f.write(bytes(512))
    refused = fsck(cases)
    assert [line.split(":")[0] for line in refused] == [str(cases[1])], refused


def test_builders_tree(tmp_path: Path) -> None:
    got = compare_with_mkfs(tb.write(tmp_path / "layer.tar", _own_whiteouts_left_out(ENTRIES)),
                            tmp_path)
    assert got["/etc/removed"][0] == "c---------"


def test_a_whiteout_of_a_member_of_the_same_tar(tmp_path: Path) -> None:
    # Where the two differ: mkfs.erofs lets the whiteout replace the member; lamina keeps
    # the member (whiteouts hide only what lower layers have: the OCI spec, contract §2).
    tar = tb.write(tmp_path / "layer.tar", [tb.file("d/f", b"mine"), tb.whiteout("d/f")])
    index(tar, tmp_path / "meta.erofs")
    mkfs_image(tar, tmp_path / "mkfs.erofs")
    with mounted_whole(tmp_path / "mkfs.erofs", tmp_path / "mnt") as where:
        assert picture(where)[0]["/d/f"][0] == "c---------"
    compare_with_mkfs(tb.write(tmp_path / "kept.tar", [tb.file("d/f", b"mine")]), tmp_path)


def test_overlay_xattrs_of_the_tar(tmp_path: Path) -> None:
    # Where the two differ: mkfs.erofs keeps the overlay xattrs a tar carries; lamina
    # drops them (contract §2: a layer must not make itself opaque or redirect a lower's
    # directory by a PAX record; Docker's applier does not set them either).
    xattrs = {"trusted.overlay.opaque": b"y", "trusted.overlay.redirect": b"/x"}
    tar = tb.write(tmp_path / "layer.tar", [
        tb.directory("d", xattrs={**xattrs, "user.ok": b"1"}),
        tb.file("f", b"x", xattrs={"user.overlay.origin": b"o"}),
    ])
    mkfs_image(tar, tmp_path / "mkfs.erofs")
    with mounted_whole(tmp_path / "mkfs.erofs", tmp_path / "mnt") as where:
        kept = picture(where)[0]
    assert kept["/d"][7] == tuple(sorted({**xattrs, "user.ok": b"1"}.items()))
    plain = tb.write(tmp_path / "plain.tar", [tb.directory("d", xattrs={"user.ok": b"1"}),
                                              tb.file("f", b"x")])
    index(tar, tmp_path / "meta.erofs")
    index(plain, tmp_path / "plain.erofs")
    with mounted(tmp_path / "meta.erofs", tar, tmp_path / "m1") as one, \
            mounted(tmp_path / "plain.erofs", plain, tmp_path / "m2") as two:
        assert picture(one) == picture(two)
    (tmp_path / "work").mkdir()
    compare_with_mkfs(plain, tmp_path / "work")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(_member, max_size=25))
def test_generated_tars(tmp_path: Path, members: list[tb.Entry]) -> None:
    work = tmp_path / f"case-{time.monotonic_ns()}"
    work.mkdir()
    compare_with_mkfs(tb.write(work / "layer.tar", _own_whiteouts_left_out(_layer(members))),
                      work)


# Wider than test_erofs.py's members (which GNU tar must extract alike): what the image
# format itself must carry, compact and extended inodes alike.
_dirs = st.sampled_from(["", "d/", "d/e/", "x" * 255 + "/"])
_rich_names = st.builds(lambda d, n: d + n, _dirs, st.one_of(
    st.sampled_from(["a", "b", "é", "n" * 255]),
    st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1,
            max_size=40).filter(lambda n: n not in (".", "..") and not n.startswith(".wh.")
                                and len(n.encode()) <= 255)))
_owners = st.sampled_from([0, 1, 65535, 65536, 1 << 31, (1 << 32) - 2])
_mtimes = st.one_of(st.sampled_from([0, 1, tb.MTIME, (1 << 32) + 5]),
                    st.integers(0, 1 << 33))  # nanoseconds past 2^63 are refused
_nanos = st.sampled_from([None, "0.5", "1600000000.123456789", "4294967296.000000001"])
_xattrs = st.dictionaries(
    st.builds(lambda ns, k: ns + k, st.sampled_from(["user.", "trusted.", "security."]),
              st.sampled_from(["a", "k" * 200, "selinux_not", "x.y"])),
    st.binary(min_size=1, max_size=1500), max_size=3)
_sizes = st.sampled_from([0, 1, 511, 512, 513, 4096, 65537, (1 << 20) + 3])


def _timed(entry: tb.Entry, mtime: int, nanos: str | None) -> tb.Entry:
    entry.mtime = mtime
    if nanos is not None:
        entry.pax["mtime"] = nanos
    return entry


_rich_member = st.builds(_timed, st.one_of(
    st.builds(lambda n, z, m, u, g, x: tb.file(n, bytes([z % 251]) * z, mode=m, uid=u, gid=g,
                                              xattrs=x),
              _rich_names, _sizes, st.integers(0, 0o7777), _owners, _owners, _xattrs),
    st.builds(lambda n, m, u, x: tb.directory(n, mode=m, uid=u, xattrs=x),
              _rich_names, st.integers(0, 0o7777), _owners, _xattrs),
    st.builds(lambda n, t: tb.symlink(n, t), _rich_names,
              st.one_of(st.sampled_from(["a", "/abs", "../up", "t" * 4095]),
                        st.text(st.characters(codec="utf-8", exclude_characters="\0"),
                                min_size=1, max_size=60))),
    st.builds(lambda n, t: tb.hardlink(n, t), _rich_names, _rich_names),
    st.builds(lambda n, ma, mi: tb.chardev(n, ma, mi), _rich_names, st.integers(1, 4095),
              st.integers(0, (1 << 20) - 1)),
    st.builds(lambda n, ma, mi: tb.blockdev(n, ma, mi), _rich_names, st.integers(0, 4095),
              st.integers(0, (1 << 20) - 1)),
    st.builds(lambda n: tb.fifo(n), _rich_names),
), _mtimes, _nanos)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(_rich_member, max_size=20))
def test_generated_tars_of_every_kind(tmp_path: Path, members: list[tb.Entry]) -> None:
    work = tmp_path / f"case-{time.monotonic_ns()}"
    work.mkdir()
    compare_with_mkfs(tb.write(work / "layer.tar", _xattrs_set_once(_layer(members))), work)


@pytest.mark.corpus
@pytest.mark.slow
def test_corpus_rootfs(tmp_path: Path, corpus_dir: Path) -> None:
    got = compare_with_mkfs(corpus_dir / "rootfs.tar", tmp_path)
    assert len(got) > 1000


@pytest.mark.corpus
def test_corpus_image_layers(tmp_path: Path, corpus_dir: Path) -> None:
    with tarfile.open(corpus_dir / "app-docker-save.tar") as outer:
        manifest = outer.extractfile("manifest.json")
        assert manifest is not None
        names = json.load(manifest)[0]["Layers"]
        for i, name in enumerate(names):
            layer = outer.extractfile(name)
            assert layer is not None
            work = tmp_path / f"layer{i}"
            work.mkdir()
            tar = work / "layer.tar"
            with open(tar, "wb") as out:
                while chunk := layer.read(1 << 20):
                    out.write(chunk)
            compare_with_mkfs(tar, work)
    assert len(names) == 3

"""The applier's writer threads (lamina.archive.writers) against the serial applier.

The same tar applied with writers (``LAMINA_APPLY_WRITERS`` 2 and 3) and without (0),
through the isolated child, onto the same parent, must give the same layer: every
path's type, mode, owners, size, content, link target, device, xattrs, mtime to the
nanosecond (directories' too), link count and hard-link groups, and the same export
byte for byte; or, for a tar that fails, the same error (class, message and path: the
first failing entry in tar order).  On the corpus, and on hypothesis-generated tars of
a few hundred entries over a small set of names, so that the same path, its parents
and its link targets come back often (files replaced by directories and back, links,
whiteouts, opaque directories, symlinked parents) and the writers have batches enough
to run beside the applying thread.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lamina
from lamina import errors
from lamina.archive.writers import ENV
from tests import tarbuild as tb
from tests.conftest import Stores, in_ci
from tests.layers import mounted
from tests.snapshot import hardlink_groups

pytestmark = pytest.mark.root
EACH_FORMAT = True  # with overlay+dir too (tests/conftest.py)

WRITERS = ("0", "2", "3")  # serial first: the reference
_ids = itertools.count()
Picture = tuple[dict[str, tuple[object, ...]], set[frozenset[str]], str]


def _facts(path: str) -> tuple[object, ...]:
    st_ = os.lstat(path)
    digest = link = None
    if stat.S_ISREG(st_.st_mode):
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    elif stat.S_ISLNK(st_.st_mode):
        link = os.readlink(path)
    xattrs = sorted((key, os.getxattr(path, key, follow_symlinks=False))
                    for key in os.listxattr(path, follow_symlinks=False))
    return (st_.st_mode, st_.st_uid, st_.st_gid, st_.st_size if digest else None,
            st_.st_mtime_ns, st_.st_nlink, st_.st_rdev, digest, link, xattrs)


def picture(drv: lamina.Driver, id: str, parent: str | None) -> Picture:
    """What the layer is: its union view (all but ctimes and inode numbers), its
    hard-link groups, and the sha256 of its export."""
    with mounted(drv, id) as root:
        facts = {".": _facts(str(root))}
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                facts[os.path.relpath(path, root)] = _facts(path)
        groups = hardlink_groups(root)
    sha = hashlib.sha256()
    with drv.diff(id, parent) as tar:
        while chunk := tar.read(1 << 20):
            sha.update(chunk)
    return facts, groups, sha.hexdigest()


def _with_writers(writers: str, body: Callable[[], object]) -> object:
    saved = os.environ.get(ENV)
    os.environ[ENV] = writers
    try:
        return body()
    finally:
        if saved is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = saved


def outcome(drv: lamina.Driver, data: Callable[[], io.BufferedIOBase | io.BytesIO],
            parent: str | None, writers: str) -> tuple[str, Picture | tuple[str, str, str | None]]:
    """Apply ``data()`` with ``writers``; the layer's picture, or the error it gave."""
    id = f"w{next(_ids)}"
    def apply() -> None:
        with data() as stream:
            drv.apply_diff(id, parent, stream)

    try:
        _with_writers(writers, apply)
    except errors.LaminaError as e:
        assert not drv.exists(id)
        return "error", (type(e).__name__, str(e).replace(id, "ID"), e.path)
    return "layer", picture(drv, id, parent)


def _timeless(picture: Picture, volatile: set[str]) -> Picture:
    facts = {k: (v[:4] + v[5:] if k in volatile else v) for k, v in picture[0].items()}
    return facts, picture[1], picture[2]


def assert_all_alike(drv: lamina.Driver, data: Callable[[], io.BufferedIOBase | io.BytesIO],
                     parent: str | None = None) -> str:
    """The same outcome with every count of writers; which outcome it was.

    The serial applier runs twice: the mtimes that differ between its own two runs
    (directories the tar does not name: the layer's root, parents it creates) are
    the clock's, and compared by neither.
    """
    want = outcome(drv, data, parent, WRITERS[0])
    again = outcome(drv, data, parent, WRITERS[0])
    volatile: set[str] = set()
    if want[0] == again[0] == "layer":
        a, b = want[1], again[1]
        assert isinstance(a, tuple) and isinstance(b, tuple)
        volatile = {k for k in a[0] if a[0][k] != b[0].get(k)}
        assert _timeless(a, volatile) == _timeless(b, volatile)  # type: ignore[arg-type]
        want = ("layer", _timeless(a, volatile))  # type: ignore[arg-type]
    assert again[0] == want[0]
    for writers in WRITERS[1:]:
        got = outcome(drv, data, parent, writers)
        if got[0] == want[0] == "layer":
            got = ("layer", _timeless(got[1], volatile))  # type: ignore[arg-type]
            a, b = want[1], got[1]
            assert isinstance(a, tuple) and isinstance(b, tuple)
            diff = sorted(k for k in set(a[0]) | set(b[0]) if a[0].get(k) != b[0].get(k))
            if diff or a[1:] != b[1:]:
                pytest.fail(f"writers={writers}: {len(diff)} paths differ, e.g. "
                            f"{[(k, a[0].get(k), b[0].get(k)) for k in diff[:3]]}; links "
                            f"{a[1] == b[1]}, export {a[2] == b[2]}")
        assert got == want, f"writers={writers}"
    return want[0]


@pytest.fixture
def drv(stores: Stores) -> Iterator[lamina.Driver]:
    yield stores.open()


# --- the corpus -------------------------------------------------------------------------------


def test_corpus_rootfs_and_its_layers_alike(drv: lamina.Driver, corpus_dir: Path) -> None:
    rootfs = corpus_dir / "rootfs.tar"
    assert assert_all_alike(drv, lambda: open(rootfs, "rb")) == "layer"  # noqa: SIM115 (closed by outcome)
    # The image's layers as a chain: each applied with every count of writers onto the
    # chain the serial applier made (the app layers have whiteouts, links, capabilities).
    with tarfile.open(corpus_dir / "app-docker-save.tar") as outer:
        manifest = outer.extractfile("manifest.json")
        assert manifest is not None
        layers = json.load(manifest)[0]["Layers"]
        parent = None
        for name in layers:
            data = outer.extractfile(name)
            assert data is not None
            blob = data.read()
            assert assert_all_alike(drv, lambda b=blob: io.BytesIO(b), parent) == "layer"
            id = f"chain{next(_ids)}"
            _with_writers("0", lambda b=blob, i=id, p=parent: drv.apply_diff(i, p, io.BytesIO(b)))
            parent = id


# --- errors: the first failing entry in tar order -----------------------------------------------


def _many(n: int, bad: dict[int, tb.Entry]) -> list[tb.Entry]:
    out = [tb.directory("d")]
    for i in range(n):
        out.append(bad.get(i) or tb.file(f"d/f{i:03}", f"file {i}\n".encode() * (i % 7)))
    return out


def test_a_writers_failure_is_the_first_in_tar_order(drv: lamina.Driver) -> None:
    # An xattr name longer than 255 bytes fails in setxattr (ERANGE): a writer's work.
    long = {"user." + "k" * 300: b"v"}
    entries = _many(300, {
        150: tb.file("d/bad-xattr-1", b"x", xattrs=long),
        220: tb.file("d/bad-xattr-2", b"y", xattrs=long),
        260: tb.hardlink("d/link", "d/no-such-file"),  # the applying thread's failure
    })
    assert_all_alike(drv, lambda: tb.stream(entries))
    got = outcome(drv, lambda: tb.stream(entries), None, "2")
    assert got[0] == "error" and got[1][2] == "d/bad-xattr-1", got


def test_the_applying_threads_failure_before_a_writers(drv: lamina.Driver) -> None:
    long = {"user." + "k" * 300: b"v"}
    entries = _many(300, {
        100: tb.hardlink("d/link", "d/no-such-file"),
        101: tb.file("d/bad-xattr", b"x", xattrs=long),
    })
    got = outcome(drv, lambda: tb.stream(entries), None, "2")
    assert got[0] == "error" and got[1][2] == "d/link", got
    assert_all_alike(drv, lambda: tb.stream(entries))


# --- generated tars ---------------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d", "é"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map("/".join)
FUZZ = settings(deadline=None, derandomize=in_ci(), database=None, max_examples=25,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def busy_tars(draw: st.DrawFn, *, whiteouts: bool) -> list[tb.Entry]:
    """A few hundred entries over 155 paths: each path comes back, as every kind."""
    out: list[tb.Entry] = []
    files: list[str] = []
    kinds = ["file"] * 6 + ["dir", "dir", "symlink", "hardlink", "fifo", "cap"]
    kinds += ["whiteout", "opaque"] if whiteouts else []
    for _ in range(draw(st.integers(min_value=50, max_value=300))):
        path = draw(PATHS)
        kind = draw(st.sampled_from(kinds))
        owner = {"uid": draw(st.sampled_from([0, 1000])), "gid": draw(st.sampled_from([0, 7])),
                 "mtime": draw(st.integers(min_value=0, max_value=2_000_000_000))}
        if kind == "file":
            mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o2750, 0o400]))
            out.append(tb.file(path, draw(st.binary(max_size=300)), mode=mode, **owner))
            files.append(path)
        elif kind == "cap":
            out.append(tb.file(path, b"cap", xattrs={"security.capability": tb.CAP_NET_RAW},
                               **owner))
            files.append(path)
        elif kind == "dir":
            out.append(tb.directory(path, mode=draw(st.sampled_from([0o755, 0o1777])),
                                    **owner))
        elif kind == "symlink":
            out.append(tb.symlink(path, draw(st.one_of(PATHS, PATHS.map(lambda p: "/" + p))),
                                  **owner))
        elif kind == "hardlink" and files:
            out.append(tb.hardlink(path, draw(st.sampled_from(files))))
        elif kind == "fifo":
            out.append(tb.fifo(path, **owner))
        elif kind == "whiteout":
            out.append(tb.whiteout(path))
        elif kind == "opaque":
            out.append(tb.opaque(path))
    return out


@FUZZ
@given(layer=busy_tars(whiteouts=False))
def test_generated_tars_alike(stores: Stores, layer: list[tb.Entry]) -> None:
    drv = _one_store(stores)
    assert_all_alike(drv, lambda: tb.stream(layer))


@FUZZ
@given(base=busy_tars(whiteouts=False), layer=busy_tars(whiteouts=True))
def test_generated_layers_over_a_parent_alike(stores: Stores, base: list[tb.Entry],
                                              layer: list[tb.Entry]) -> None:
    drv = _one_store(stores)
    parent = f"p{next(_ids)}"
    try:
        _with_writers("0", lambda: drv.apply_diff(parent, None, tb.stream(base)))
    except errors.LaminaError:
        return  # the base itself is refused (a link through a symlink out…): nothing to add
    assert_all_alike(drv, lambda: tb.stream(layer), parent)


def _one_store(stores: Stores) -> lamina.Driver:
    """The store all the examples of one test share (opened by the first)."""
    if not hasattr(stores, "writers_store"):
        stores.writers_store = stores.open()  # type: ignore[attr-defined]
    drv: lamina.Driver = stores.writers_store  # type: ignore[attr-defined]
    return drv

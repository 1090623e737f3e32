"""Fuzzing: hypothesis properties of apply and export, and a bounded run of the atheris target.

- apply → export → apply: a generated base layer and a generated layer over it (files,
  directories, symlinks, hard links, fifos, devices, whiteouts, opaque directories,
  owners, modes, capabilities); the layer's diff applied again onto the base gives the
  same union view, hard links included.
- arbitrary bytes (random, and valid tars with bytes flipped, cut, inserted, blocks
  repeated; plain and compressed): ``apply_diff`` gives a ``LaminaError`` and leaves no
  layer, or a layer that exports and re-applies to itself; nothing outside the home
  changes; nothing but ``LaminaError`` escapes.  The same on the tar reader alone, with
  many more inputs.
- the atheris (libFuzzer) targets ``fuzz/tar_reader.py`` and ``fuzz/apply_layer.py`` for a
  bounded number of inputs each.

In CI (``CI=true``) hypothesis is derandomized, so that a CI run is reproducible; locally
each run explores new inputs.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import lamina
from lamina import errors
from lamina.archive import codecs, reader
from lamina.archive.apply import Applier
from tests import tarbuild as tb
from tests.archive.test_hostile import fingerprint
from tests.conftest import Stores, in_ci, lacking
from tests.layers import links, tree
from tests.snapshot import assert_same_tree

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
FUZZ = settings(
    deadline=None,
    derandomize=in_ci(),
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)
_ids = itertools.count()


# --- generated layers -----------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "dir", "x.txt", "é", "sp ace", "..dots", ".hidden",
                         "n" * 120])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map("/".join)
OWNERS = st.sampled_from([0, 1, 1000, 65534])
MTIMES = st.integers(min_value=0, max_value=2_000_000_000)


@st.composite
def entries(draw: st.DrawFn, *, whiteouts: bool) -> list[tb.Entry]:
    """A list of entries that lamina must accept (names may go through symlinks)."""
    out: list[tb.Entry] = []
    files: list[str] = []
    plain: set[str] = set()  # paths of non-directories: nothing goes below them
    for _ in range(draw(st.integers(min_value=1, max_value=12))):
        path = draw(PATHS)
        parts = path.split("/")
        if any("/".join(parts[:i]) in plain for i in range(1, len(parts))):
            continue
        kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "fifo",
                                     "char", "cap"] + (["whiteout", "opaque"] * whiteouts)))
        owner = {"uid": draw(OWNERS), "gid": draw(OWNERS), "mtime": draw(MTIMES)}
        if kind == "file":
            mode = draw(st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o2750, 0o444]))
            out.append(tb.file(path, draw(st.binary(max_size=2048)), mode=mode, **owner))
            files.append(path)
        elif kind == "cap":
            out.append(tb.file(path, b"cap", xattrs={"security.capability": tb.CAP_NET_RAW},
                               **owner))
            files.append(path)
        elif kind == "dir":
            mode = draw(st.sampled_from([0o755, 0o700, 0o1777, 0o2775]))
            out.append(tb.directory(path, mode=mode, **owner))
        elif kind == "symlink":
            target = draw(st.one_of(PATHS, PATHS.map(lambda p: "/" + p),
                                    st.sampled_from(["..", "../..", "/", "."])))
            out.append(tb.symlink(path, target, **owner))
        elif kind == "hardlink" and files:
            out.append(tb.hardlink(path, draw(st.sampled_from(files))))
        elif kind == "fifo":
            out.append(tb.fifo(path, **owner))
        elif kind == "char":
            out.append(tb.chardev(path, draw(st.sampled_from([1, 4, 5])),
                                  draw(st.sampled_from([3, 5, 7])), **owner))
        elif kind == "whiteout":
            out.append(tb.whiteout(path))
        elif kind == "opaque":
            out.append(tb.opaque(path))
        if kind in ("file", "cap", "hardlink", "fifo", "char"):
            plain.add(path)
        elif kind == "dir":
            plain.discard(path)
    return out


def _same_view(drv: lamina.Driver, a: str, b: str) -> None:
    assert_same_tree(tree(drv, b), tree(drv, a))
    want, got = links(drv, a), links(drv, b)
    if drv.name == "vfs":
        # A known gap of vfs (found here; overlay is right): naivediff now sees a link
        # count that changed, but a tree comparison still cannot rebuild every link
        # structure (a link between two names that are both replaced in the layer comes
        # back as two files).  So: links may be lost; none may appear, none may join
        # other files.
        assert all(any(g <= w for w in want) for g in got), (got, want)
    else:
        assert got == want


@settings(FUZZ, max_examples=40)
@given(base=entries(whiteouts=False), layer=entries(whiteouts=True))
def test_apply_export_apply_gives_the_same_tree(
    stores: Stores, base: list[tb.Entry], layer: list[tb.Entry]
) -> None:
    drv = _one_store(stores)
    n = next(_ids)
    try:
        drv.apply_diff(f"b{n}", None, tb.stream(base))
        drv.apply_diff(f"l{n}", f"b{n}", tb.stream(layer))
    except errors.LaminaError as e:
        event("generated layer refused: " + str(e).rsplit(": ", 1)[-1][:40])
        note(f"refused: {e}")
        assume(False)
    with drv.diff(f"l{n}") as diff:
        drv.apply_diff(f"r{n}", f"b{n}", diff)
    _same_view(drv, f"l{n}", f"r{n}")
    # and a base layer's own diff is the base again
    with drv.diff(f"b{n}") as diff:
        drv.apply_diff(f"c{n}", None, diff)
    _same_view(drv, f"b{n}", f"c{n}")


def _one_store(stores: Stores) -> lamina.Driver:
    """The store all the examples of one test share (opened by the first)."""
    if not hasattr(stores, "fuzzed"):
        stores.fuzzed = stores.open()  # type: ignore[attr-defined]
    drv: lamina.Driver = stores.fuzzed  # type: ignore[attr-defined]
    return drv


# --- arbitrary bytes --------------------------------------------------------------------------


def _seeds() -> list[bytes]:
    rich = [tb.directory("etc"), tb.file("etc/motd", b"hi\n", uid=1000),
            tb.symlink("lib", "usr/lib"), tb.hardlink("etc/motd2", "etc/motd"),
            tb.fifo("p"), tb.whiteout("old"), tb.opaque("var"),
            tb.file("long/" + "n" * 150, b"x"), tb.file("usr/lib/x", b"y" * 700)]
    return [
        tb.build(rich),
        tb.build(rich, format=tarfile.GNU_FORMAT),
        tb.raw_gnu_sparse("s", [(0, b"a" * 512), (4096, b"b")], 8192) + tb.END,
        tb.raw_pax_sparse_1_0("s", [(0, b"a" * 512), (8192, b"b")], 9000) + tb.END,
        tb.raw_gnu_long("x" * 300) + tb.raw_member("short", b"d") + tb.END,
    ]


SEEDS = _seeds()
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda d: d, "gzip": tb.gzipped, "zstd": tb.zstd_compressed}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid tar (maybe compressed) with bytes flipped, set, cut, inserted or repeated."""
    data = bytearray(COMPRESS[draw(st.sampled_from(list(COMPRESS)))](
        draw(st.sampled_from(SEEDS))))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        op = draw(st.sampled_from(["flip", "set", "cut", "insert", "repeat"]))
        at = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0, 0x30, 0x37, 0x80, 0xFF, ord("/"), ord(".")]))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=64))
        elif op == "repeat":
            block = at - at % 512
            data[block:block] = data[block:block + 512]
    return bytes(data)


ARBITRARY = st.one_of(st.binary(max_size=3000), mutated())


@pytest.mark.usefixtures("isolation")
@settings(FUZZ, max_examples=40)
@given(data=ARBITRARY)
def test_arbitrary_bytes_give_a_lamina_error_or_a_layer(
    stores: Stores, home: Path, data: bytes
) -> None:
    drv = _one_store(stores)
    outside = home.parent
    if not hasattr(stores, "before"):
        stores.before = fingerprint(outside, skip=home)  # type: ignore[attr-defined]
    n = next(_ids)
    try:
        drv.apply_diff(f"f{n}", None, io.BytesIO(data))
    except errors.LaminaError as e:
        event(f"refused: {type(e).__name__}")
        assert not drv.exists(f"f{n}")
    else:
        event("applied")
        with drv.diff(f"f{n}") as diff:
            drv.apply_diff(f"g{n}", None, diff)
        _same_view(drv, f"f{n}", f"g{n}")
    assert fingerprint(outside, skip=home) == stores.before  # type: ignore[attr-defined]


@settings(FUZZ, max_examples=1500)
@given(data=ARBITRARY)
def test_the_reader_raises_only_unsafe_archive(data: bytes) -> None:
    try:
        stream, _ = codecs.decompressed(io.BytesIO(data))
        tar = reader.TarReader(stream)
        for entry in tar:
            if entry.data_size <= 1 << 16:
                tar.read_data(entry, 1 << 16)
    except errors.UnsafeArchive:
        pass


# --- what the fuzzers found, kept ---------------------------------------------------------------

FOUND = {
    # fuzz/apply_layer.py: os.setxattr raised ValueError on a NUL in the name
    "nul-in-xattr-name": tb.raw_pax({"SCHILY.xattr.user.a\0b": "v"})
    + tb.raw_member("f", b"x") + tb.END,
}


@pytest.mark.usefixtures("isolation")
@pytest.mark.parametrize("data", FOUND.values(), ids=FOUND.keys())
def test_what_the_fuzzers_found(driver: lamina.Driver, data: bytes) -> None:
    with pytest.raises(errors.UnsafeArchive):
        driver.apply_diff("l", None, io.BytesIO(data))
    assert not driver.exists("l")


@settings(FUZZ, max_examples=300)
@given(data=st.one_of(ARBITRARY, entries(whiteouts=True).map(tb.build)),
       overlay=st.booleans())
def test_the_engine_leaves_no_fd_open(data: bytes, overlay: bool) -> None:
    """Found by fuzz/apply_layer.py (EMFILE after 400,000 inputs): a whiteout below a
    directory that is not there left that walk's fd open.  In-process, every apply
    (refused or not) gives back every fd it opened."""
    work = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        lower = work / "lower"
        (lower / "usr/lib").mkdir(parents=True)
        (lower / "lib").symlink_to("usr/lib")
        (lower / "evil").symlink_to(work / "outside")
        (work / "layer").mkdir()
        before = sorted(os.listdir("/proc/self/fd"))
        try:
            stream, _ = codecs.decompressed(io.BytesIO(data))
            Applier(work / "layer", overlay_whiteouts=overlay, lowers=[str(lower)],
                    max_path=3000).apply(stream)
        except errors.LaminaError:
            pass
        assert sorted(os.listdir("/proc/self/fd")) == before
    finally:
        shutil.rmtree(work)


# --- atheris ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, runs", [("tar_reader", 20_000), ("apply_layer", 3_000),
                                          ("erofs_index", 5_000)])
def test_atheris_target_runs_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   target: str, runs: int) -> None:
    """``fuzz/TARGET.py`` for a bounded number of inputs from its seed corpus: no finding."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        lacking("atheris (the dev extra installs it on x86_64)")
    script = REPO / "fuzz" / f"{target}.py"
    corpus = tmp_path / "corpus"
    work = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    env = {**os.environ, "PYTHONPATH": str(REPO), "LAMINA_FUZZ_WORK": str(work)}
    subprocess.run([sys.executable, str(script), "-seeds", str(corpus)], check=True, env=env)
    try:
        proc = subprocess.run(
            [sys.executable, str(script), str(corpus), f"-runs={runs}", "-max_len=65536",
             "-rss_limit_mb=2048", "-timeout=20", "-print_final_stats=1",
             f"-artifact_prefix={tmp_path}/"],
            capture_output=True, text=True, env=env, timeout=600, check=False,
        )
    finally:
        shutil.rmtree(work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", proc.stderr)
    assert execs is not None and int(execs.group(1)) >= runs, proc.stderr[-2000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-",
                                                                        "timeout-"))]
    with capsys.disabled():
        print(f"\natheris {target}: {execs.group(1)} inputs, no finding")

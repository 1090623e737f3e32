"""``lamina check [--repair]`` and ``lamina df``, on every backend.

``check`` must find damage that no metadata shows — a flipped byte in a layer's
file, a file deleted from a layer — by comparing each read-only layer's content
with the manifest recorded when it was built, report it (the command exits 1),
and with ``--repair`` leave a store that a second check finds clean, saying what
it did.  It must also find and clear the store's orphans: an unfinished removal,
an abandoned staging directory, a count of a layer that is gone, a mount with no
count and a count with no mount, a dangling ``l/`` link.

``df`` must give each read-only layer's bytes and inodes as recorded when it was
applied — equal to what the tar put there — without walking the layer (content
changed behind lamina's back does not change what it says), and list orphans.

A layer's own content is found through ``metadata``: vfs's ``dir`` is the layer's
full tree, overlay's ``UpperDir`` its diff.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

import lamina
from lamina.archive import isolate
from lamina.backends import check
from lamina.backends import df as usage
from lamina.backends.base import StoreDriver
from lamina.backends.contract import backend_of
from lamina.store import manifest
from lamina.store.meta import LayerFormat
from tests import tarbuild as tb
from tests.conftest import Stores, mounts_under
from tests.layers import apply, is_stored_tar, tree

pytestmark = pytest.mark.root
EACH_FORMAT = True  # an EROFS layer's damage is its tar's, or its image's

REPO = Path(__file__).resolve().parent.parent

BASE = [
    tb.directory("etc"), tb.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    tb.directory("usr"), tb.directory("usr/bin"),
    tb.file("usr/bin/tool", bytes(range(256)) * 40, mode=0o755),
    tb.hardlink("usr/bin/tool2", "usr/bin/tool"), tb.symlink("bin", "usr/bin"),
]
APP = [
    tb.directory("app"), tb.file("app/main", b"main program " * 300, mode=0o755),
    tb.file("app/config", b"key=value\n", uid=1000, gid=1000), tb.symlink("app/link", "main"),
    tb.directory("app/data"),
    *(tb.file(f"app/data/d{i}", bytes([i]) * (1000 + i)) for i in range(5)),
]
ON_APP = [tb.directory("extra"), tb.file("extra/file", b"extra\n")]


def own_content(drv: lamina.Driver, id: str) -> Path:
    """Where layer ``id``'s own content is (vfs: its tree; overlay: its diff)."""
    meta = drv.metadata(id)
    return Path(meta["UpperDir"] if "UpperDir" in meta else meta["dir"])


def lamina_cli(drv: lamina.Driver, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m lamina --home … --backend … ARGS`` in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "lamina", "--home", str(drv.home), "--backend", drv.name, *args],
        capture_output=True, text=True, env=env, timeout=120,
    )


def build(drv: lamina.Driver) -> None:
    """``base`` ← ``app`` ← ``onapp``, and a container ``ctr`` on ``onapp``."""
    apply(drv, "base", None, BASE)
    apply(drv, "app", "base", APP)
    apply(drv, "onapp", "app", ON_APP)
    drv.create_rw("ctr", "onapp")


def check_clean(drv: lamina.Driver) -> None:
    report = check.check(drv)
    assert report.consistent, report.problems


# -- damage to a layer's content ----------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


DAMAGE = {
    "flipped byte": lambda root: flip_byte(root / "app/data/d3", 500),
    "deleted file": lambda root: (root / "app/config").unlink(),
}
FOUND = {"flipped byte": "/app/data/d3: content differ", "deleted file": "/app/config: missing"}
TAR_DAMAGE = {  # a layer kept as its tar (overlay's EROFS): its mount is read-only
    "flipped byte": lambda tar: flip_byte(tar, _data_offset(tar, "app/data/d3") + 500),
    "deleted file": lambda tar: tar.unlink(),
}
TAR_FOUND = {"flipped byte": "its tar's sha256 is not its diff id",
             "deleted file": "its tar cannot be read"}


def _data_offset(tar: Path, name: str) -> int:
    with tarfile.open(tar) as f:
        return f.getmember(name).offset_data


def damage_layer(drv: lamina.Driver, id: str, damage: str) -> str:
    """Do ``damage`` to layer ``id`` behind lamina's back; what check will say of it."""
    if is_stored_tar(drv, id):
        TAR_DAMAGE[damage](Path(drv.metadata(id)["Tar"]))
        return TAR_FOUND[damage]
    DAMAGE[damage](own_content(drv, id))
    return FOUND[damage]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damage_is_found_reported_and_repaired(stores: Stores, damage: str) -> None:
    drv = stores.open()
    build(drv)
    base_tree = tree(drv, "base")
    check_clean(drv)
    size_before = os.stat(own_content(drv, "app") / "app/data/d3").st_size
    found = damage_layer(drv, "app", damage)
    if damage == "flipped byte":  # same size, same mtime-independent metadata: only the data
        assert os.stat(own_content(drv, "app") / "app/data/d3").st_size == size_before

    report = check.check(drv)
    assert not report.consistent
    assert any(p.startswith("app: ") and found in p for p in report.problems), \
        report.problems
    # What is built on the damaged layer is damaged too (its union view is wrong).
    assert any(p.startswith("onapp: built on a damaged layer") for p in report.problems)
    assert any(p.startswith("ctr: built on a damaged layer") for p in report.problems)
    assert not any(p.startswith("base:") for p in report.problems)

    cli = lamina_cli(drv, "check")
    assert cli.returncode == 1, cli
    assert found in cli.stdout and "store inconsistent" in cli.stdout
    cli = lamina_cli(drv, "--json", "check")
    assert cli.returncode == 1 and json.loads(cli.stdout)["consistent"] is False

    cli = lamina_cli(drv, "check", "--repair")
    assert cli.returncode == 0, cli
    said = cli.stdout
    for id in ("app", "onapp", "ctr"):
        assert f"repaired: {id}: removed" in said, said
    assert lamina_cli(drv, "check").returncode == 0

    # The damaged chain is gone, the rest intact, and the ids can be used again.
    check_clean(drv)
    assert sorted(drv.layers()) == ["base"]
    assert tree(drv, "base") == base_tree
    apply(drv, "app", "base", APP)
    apply(drv, "onapp", "app", ON_APP)
    assert (own_content(drv, "app") / "app/data/d3").read_bytes() == bytes([3]) * 1003
    check_clean(drv)


# -- the manifest's digests, taken while the apply writes the files -----------------------

REWRITES = [  # names written twice, links, a file over a directory, a lower file linked
    tb.directory("app"), tb.file("app/main", b"second " * 500, mode=0o755),
    tb.file("app/twice", b"first"), tb.file("app/twice", b"second, longer"),
    tb.hardlink("app/twice-link", "app/twice"), tb.hardlink("app/tool-link", "usr/bin/tool"),
    tb.file("app/empty"), tb.directory("app/dir"), tb.file("app/dir", b"a file over a dir"),
]


@pytest.mark.parametrize("isolated", [True, False], ids=["isolated", "inline"])
def test_manifest_from_digests_is_what_reading_gives(
    stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, isolated: bool
) -> None:
    if not isolated:
        monkeypatch.setenv(isolate.NOREEXEC, "1")
    drv = stores.open()
    assert isinstance(drv, StoreDriver)
    build(drv)
    apply(drv, "more", "onapp", REWRITES)
    for id in ("base", "app", "onapp", "more"):
        layer_dir = drv.store.layer_dir(lamina.driver.LayerId(id))
        manifest.record(drv.content_of(layer_dir), tmp_path / id, only=drv.content_only)
        assert (layer_dir / manifest.NAME).read_text() == (tmp_path / id).read_text(), id
    check_clean(drv)


def test_a_digest_counts_only_while_the_file_is_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"data")
    st = (root / "f").stat()
    manifest.record(root, tmp_path / "read")
    read = (tmp_path / "read").read_text()
    # One that matches the file's size and mtime is taken (that spares the read)…
    trusted = {st.st_ino: (st.st_size, st.st_mtime_ns, 0x12345678)}
    manifest.record(root, tmp_path / "trusted", digests=trusted)
    assert '"12345678"' in (tmp_path / "trusted").read_text()
    # … one whose size or mtime differs is stale: the file is read.
    for size, mtime in ((st.st_size + 1, st.st_mtime_ns), (st.st_size, st.st_mtime_ns + 1)):
        manifest.record(root, tmp_path / "stale", digests={st.st_ino: (size, mtime, 0x1234)})
        assert (tmp_path / "stale").read_text() == read


def test_repair_through_the_api_says_what_it_did(stores: Stores) -> None:
    drv = stores.open()
    build(drv)
    damage_layer(drv, "app", "flipped byte")
    report = check.check(drv, repair=True)
    assert not report.consistent  # it reports what it found …
    assert {r.split(":")[0] for r in report.repairs} >= {"app", "onapp", "ctr"}  # … and did
    check_clean(drv)


def test_a_mounted_damaged_layer_is_unmounted_and_removed(stores: Stores) -> None:
    drv = stores.open()
    build(drv)
    drv.get("ctr")
    drv.get("onapp")
    damage_layer(drv, "app", "deleted file")
    report = check.check(drv, repair=True)
    assert any("onapp: built on a damaged layer" in p for p in report.problems)
    check_clean(drv)
    assert sorted(drv.layers()) == ["base"]
    assert mounts_under(drv.home) == []


# -- orphans --------------------------------------------------------------------------------


def make_orphans(drv: lamina.Driver) -> dict[str, str]:
    """Leftovers of processes that died (made while ``drv`` is open: opening sweeps them)."""
    home = drv.home
    doomed = home / "layers" / f"gone{'-removing'}"
    (doomed / "fs" / "sub").mkdir(parents=True)
    (doomed / "fs" / "sub" / "file").write_bytes(b"x" * 100)
    staged = home / "staging" / "half.0badcafe"
    (staged / "diff").mkdir(parents=True)
    (staged / "diff" / "partial").write_bytes(b"y" * 100)
    (home / "mounts" / "ghost").write_text("2")
    return {"removing": "gone-removing", "staging": "staging/half.0badcafe", "count": "ghost"}


def test_orphans_are_found_and_repaired(stores: Stores) -> None:
    drv = stores.open()
    build(drv)
    names = make_orphans(drv)
    report = check.check(drv)
    problems = "\n".join(report.problems)
    assert not report.consistent
    assert f"{names['removing']}: an unfinished removal" in problems
    assert f"{names['staging']}: an abandoned layer build" in problems
    assert f"{names['count']}: a mount count of 2 for a layer that is gone" in problems
    _, orphans = usage.df(drv)
    assert str(drv.home / "layers" / names["removing"]) in orphans
    assert str(drv.home / names["staging"]) in orphans

    report = check.check(drv, repair=True)
    done = "\n".join(report.repairs)
    assert "gone-removing: leftover removed" in done
    assert "half.0badcafe: leftover removed" in done
    assert "ghost: its count dropped" in done
    check_clean(drv)
    assert usage.df(drv)[1] == []
    assert sorted(os.listdir(drv.home / "staging")) == []
    assert sorted(drv.layers()) == ["app", "base", "ctr", "onapp"]


def test_mount_state_is_checked_and_repaired(stores: Stores, backend: str) -> None:
    drv = stores.open()
    build(drv)
    if backend != "overlay":
        # Nothing is mounted: a count alone is a get outstanding, not a problem.
        drv.get("onapp")
        (drv.home / "mounts" / "app").write_text("1")
        check_clean(drv)
        return
    view = Path(drv.get("onapp"))
    (drv.home / "mounts" / "onapp").unlink()  # mounted, its count lost
    (drv.home / "mounts" / "app").write_text("1")  # counted, nothing mounted
    short = drv.home / "l" / "DANGLINGLINKXXXXXXXXXXXXXX"
    short.symlink_to("../layers/gone/diff")
    report = check.check(drv)
    problems = "\n".join(report.problems)
    assert "onapp: mounted with no count" in problems
    assert "app: a count of 1 with nothing mounted" in problems
    assert f"l/{short.name}: a short link to a layer that is gone" in problems

    report = check.check(drv, repair=True)
    done = "\n".join(report.repairs)
    assert "onapp: unmounted" in done and "app: its count reset" in done
    assert f"l/{short.name}: dangling link removed" in done
    check_clean(drv)
    assert not os.path.ismount(view)
    assert not short.is_symlink()


def test_opening_drops_what_check_would_find(stores: Stores) -> None:
    # The command opens the store, and opening recovers it: removals finished,
    # staging dirs of dead builders and counts of layers that are gone dropped.
    drv = stores.open()
    build(drv)
    make_orphans(drv)
    assert not check.check(drv).consistent
    out = lamina_cli(drv, "check")
    assert out.returncode == 0, out
    assert "0 problems" in out.stdout
    check_clean(drv)
    assert usage.df(drv)[1] == []


# -- df ---------------------------------------------------------------------------------------


def tar_totals(entries: list[tb.Entry]) -> tuple[int, int]:
    """Bytes of regular-file data and inodes a tar puts into a layer (links share one)."""
    size = sum(len(e.data) for e in entries if e.type == b"0")
    inodes = sum(1 for e in entries if e.type != b"1")
    return size, inodes


def test_df_numbers_are_what_was_applied(stores: Stores, backend: str) -> None:
    drv = stores.open()
    build(drv)
    rows = {u.id: u for u in usage.df(drv)[0]}
    base, app, onapp = tar_totals(BASE), tar_totals(APP), tar_totals(ON_APP)
    if backend == "vfs":  # a vfs layer holds its parent's tree too
        app = (base[0] + app[0], base[1] + app[1])
        onapp = (app[0] + onapp[0], app[1] + onapp[1])
    for id, (size, inodes) in {"base": base, "app": app, "onapp": onapp}.items():
        row = rows[id]
        if backend_of(drv).record(id).format is LayerFormat.EROFS:
            inodes = 2  # on the host: its tar and its image
        assert (row.bytes, row.inodes) == (size, inodes), id
        assert not row.live and not row.rw  # from the counters kept at apply time
        assert row.disk >= 0
    assert rows["ctr"].rw and rows["ctr"].live  # a writable layer is walked

    # The counters, not a walk: content changed behind lamina's back is not seen.
    if not is_stored_tar(drv, "app"):  # (an image mounted read-only cannot change)
        (own_content(drv, "app") / "app" / "big").write_bytes(b"z" * 100_000)
    assert usage.df(drv)[0] == list(rows.values())

    out = lamina_cli(drv, "--json", "df")
    assert out.returncode == 0, out
    data: dict[str, Any] = json.loads(out.stdout)
    by_id = {row["id"]: row for row in data["layers"]}
    assert (by_id["app"]["bytes"], by_id["app"]["inodes"]) == (rows["app"].bytes,
                                                               rows["app"].inodes)
    assert data["orphans"] == []
    out = lamina_cli(drv, "df")
    assert "counters" in out.stdout and "walked (writable)" in out.stdout


def test_df_lists_orphans(stores: Stores) -> None:
    drv = stores.open()
    build(drv)
    names = make_orphans(drv)
    _, orphans = usage.df(drv)
    assert sorted(orphans) == sorted([str(drv.home / names["staging"]),
                                      str(drv.home / "layers" / names["removing"])])


def test_a_layer_being_applied_is_not_damage(driver: lamina.Driver) -> None:
    """``check --repair`` beside an apply in flight (a ``serve`` ApplyDiff) finds nothing
    wrong and takes nothing away; the apply then completes."""
    import threading

    read_fd, write_fd = os.pipe()
    data = tb.build([tb.file(f"f{i}", b"x" * 4096) for i in range(50)])
    done: list[int] = []

    def apply() -> None:
        with os.fdopen(read_fd, "rb") as stream:
            done.append(driver.apply_diff("inflight", None, stream))

    thread = threading.Thread(target=apply)
    thread.start()
    os.write(write_fd, data[: len(data) // 2])
    staging = driver.home / "staging"
    for _ in range(500):
        if any(not e.endswith(".lock") for e in os.listdir(staging)):
            break
        time.sleep(0.01)
    report = check.check(driver, repair=True)
    assert report.consistent, report.problems
    assert report.repairs == []
    os.write(write_fd, data[len(data) // 2:])
    os.close(write_fd)
    thread.join(60)
    assert done == [50 * 4096]
    assert check.check(driver).consistent


# -- sparse files (issue 23, D4) ------------------------------------------------------------

SPARSE_CHUNKS = [(0, b"head" * 1024), (5 << 20, b"m" * 8192), ((9 << 20) - 4096, b"t" * 100)]
SPARSE_SIZE = 12 << 20
SPARSE_BUILDERS = [tb.raw_gnu_sparse, tb.raw_pax_sparse_1_0, tb.raw_pax_sparse_0_1]


def apply_sparse(drv: lamina.Driver, id: str) -> None:
    data = b"".join([*(build(f"s{i}", SPARSE_CHUNKS, SPARSE_SIZE)
                       for i, build in enumerate(SPARSE_BUILDERS)), tb.END])
    drv.apply_diff(id, None, io.BytesIO(data))


@pytest.mark.parametrize("isolated", [True, False], ids=["isolated", "inline"])
def test_sparse_digests_are_what_reading_the_holes_gives(
    stores: Stores, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, isolated: bool
) -> None:
    """The apply's CRC-32 of a sparse file (holes folded in, not written) and check's
    (holes skipped, not read) are both the CRC-32 of the whole content read back, as
    the manifests of older homes have it: they check unchanged."""
    if not isolated:
        monkeypatch.setenv(isolate.NOREEXEC, "1")
    drv = stores.open()
    assert isinstance(drv, StoreDriver)
    apply_sparse(drv, "sparse")
    layer_dir = drv.store.layer_dir(lamina.driver.LayerId("sparse"))
    recorded = (layer_dir / manifest.NAME).read_text()
    manifest.record(drv.content_of(layer_dir), tmp_path / "read", only=drv.content_only)
    assert recorded == (tmp_path / "read").read_text()
    whole = zlib.crc32(tb.expand_sparse(SPARSE_CHUNKS, SPARSE_SIZE))
    rows = [json.loads(line) for line in recorded.splitlines()[1:]]
    assert [row[6] for row in rows if row[1] == "f"] == [f"{whole:08x}"] * 3
    check_clean(drv)


@pytest.mark.parametrize("where", [(5 << 20) + 100, 1 << 20, SPARSE_SIZE - 1],
                         ids=["data", "hole", "last-byte-of-a-hole"])
def test_damage_to_a_sparse_file_is_found(stores: Stores, where: int) -> None:
    drv = stores.open()
    apply_sparse(drv, "sparse")
    check_clean(drv)
    path = own_content(drv, "sparse") / "s1"
    with open(path, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x01]))
    assert os.stat(path).st_size == SPARSE_SIZE
    report = check.check(drv)
    assert any("/s1: content differ" in p for p in report.problems), report.problems

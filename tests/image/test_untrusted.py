"""What comes from outside is not trusted (issue 23): names in an archive, documents
nested without end, endless or amplified streams, escapes in a config, a damaged home.
Each case is a real archive (or home) built here; each must end in one clear error, or
a warning and going on, and never in a traceback, a shadowed name or a full disk."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from isal import igzip

import lamina
from lamina import errors
from lamina.image import load
from lamina.image.store import ImageStore
from tests import tarbuild as tb
from tests.conftest import lacking
from tests.image import build, tools
from tests.image.build import APP, BASE
from tests.image.tools import ImageCli

pytestmark = pytest.mark.root
EACH_FORMAT = True  # with overlay+dir too (tests/conftest.py)


def oci_named(img: build.Image, name: str) -> bytes:
    """``img``'s OCI layout as a tar, its index naming it ``name`` (as containerd does)."""
    members = build.oci_members([img])
    index = json.loads(members[1][1])
    index["manifests"][0]["annotations"] = {"io.containerd.image.name": name}
    members[1] = ("index.json", json.dumps(index).encode())
    return build.tar_of(members)


def records(store: ImageStore) -> list[dict[str, Any]]:
    return [json.loads(p.read_bytes()) for p in sorted(store.refs_dir.iterdir())]


# -- D2: a name from an archive ---------------------------------------------------------


def test_invalid_name_in_an_archive_writes_nothing(driver: lamina.Driver) -> None:
    store = ImageStore(driver)
    img = build.image(BASE, tag=None)
    with pytest.raises(errors.InvalidArgument, match=r"io\.containerd\.image\.name"):
        load.load(store, stream=io.BytesIO(oci_named(img, "docker.io/UPPER/x:1")))
    assert records(store) == []
    damaged: list[str] = []
    assert store.images(damaged) == [] and damaged == []
    assert store.content.digests() == [] and list(driver.layers()) == []


def test_a_name_from_an_archive_is_normalised(driver: lamina.Driver) -> None:
    """``probe/real:1`` is ``docker.io/probe/real:1``: a load moves that name (as docker
    load does), and one image answers to it, not two."""
    store = ImageStore(driver)
    real = build.image(BASE, APP, tag="probe/real:1")
    probe = build.image(BASE, tag=None)
    load.load(store, stream=io.BytesIO(build.docker_save([real])))
    [got] = load.load(store, stream=io.BytesIO(oci_named(probe, "probe/real:1")))
    assert got.names == ["docker.io/probe/real:1"]
    assert [r["name"] for r in records(store)] == ["docker.io/probe/real:1"]
    assert [(i.id, i.names) for i in store.images()] == [(probe.id,
                                                          ["docker.io/probe/real:1"])]
    assert store.remove("probe/real:1") == (["docker.io/probe/real:1"], probe.id)
    with pytest.raises(errors.NotFound):
        store.resolve("probe/real:1")


def test_a_record_not_in_normal_form_shadows_nothing(driver: lamina.Driver) -> None:
    """A record an older lamina wrote for ``probe/real:1`` is damaged (listed as broken),
    not a second image of ``docker.io/probe/real:1``."""
    store = ImageStore(driver)
    real = build.image(BASE, APP, tag="probe/real:1")
    probe = build.image(BASE, tag="other/x:1")
    load.load(store, stream=io.BytesIO(build.docker_save([real, probe])))
    [rec] = [r for r in records(store) if r["name"] == "docker.io/other/x:1"]
    key = hashlib.sha256(b"probe/real:1").hexdigest()
    (store.refs_dir / f"{key}.json").write_text(json.dumps({**rec, "name": "probe/real:1"}))
    damaged: list[str] = []
    named = {n: i.id for i in store.images(damaged) for n in i.names}
    assert named == {"docker.io/probe/real:1": real.id, "docker.io/other/x:1": probe.id}
    assert len(damaged) == 1 and "normal form" in damaged[0] and key in damaged[0]
    assert store.resolve("probe/real:1").id == real.id


def test_cli_invalid_name_leaves_the_home_whole(tmp_path: Path) -> None:
    cli = ImageCli(tmp_path / "home", backend="vfs")
    bad = tmp_path / "bad.tar"
    bad.write_bytes(oci_named(build.image(BASE, tag=None), "docker.io/UPPER/x:1"))
    err = cli.run("image", "load", str(bad), code=1).stderr.decode()
    assert err.startswith("lamina: ") and err.count("\n") == 1 and "invalid image name" in err
    ls = cli.run("image", "ls")
    assert ls.stderr == b"" and ls.stdout.decode().splitlines()[1:] == []
    assert cli.image_json("prune") == {"blobs": [], "bytes": 0}


# -- D8: tracebacks -------------------------------------------------------------------

DEEP = b"[" * 100_000


@pytest.mark.parametrize("member", ["manifest.json", "index.json"])
def test_documents_nested_without_end(driver: lamina.Driver, member: str) -> None:
    store = ImageStore(driver)
    with pytest.raises(errors.Corrupt, match="nested too deep"):
        load.load(store, stream=io.BytesIO(build.tar_of([(member, DEEP)])))
    assert store.content.digests() == [] and records(store) == []


def test_load_with_standard_input_closed(tmp_path: Path) -> None:
    cli = ImageCli(tmp_path / "home", backend="vfs")
    proc = subprocess.run(["sh", "-c", 'exec "$@" <&-', "sh",
                           *cli.argv("image", "load", "-")],
                          capture_output=True, env=cli.env, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.count("\n") == 1 and "standard input is closed" in err


def damage(home: Path) -> None:
    """A home as a crash or a hand leaves it: a directory where a name record belongs, a
    record nested without end, and the marker of a load that died."""
    refs = home / "image" / "refs"
    (refs / "x.json").mkdir()
    (refs / "deep.json").write_bytes(b"[" * 60_000)  # under the 64 KiB a record is read
    (home / "image" / "dirty").write_bytes(b"")


def test_a_damaged_home_is_one_line_or_a_warning(tmp_path: Path) -> None:
    cli = ImageCli(tmp_path / "home", backend="vfs")
    archive = tmp_path / "app.tar"
    archive.write_bytes(build.docker_save([build.image(BASE, APP)]))
    cli.run("image", "load", str(archive))
    damage(cli.home)
    for args in (["ls"], ["image", "ls"], ["image", "inspect", "test/app:1"],
                 ["--json", "image", "ls"], ["status"]):
        (cli.home / "image" / "dirty").write_bytes(b"")  # a sweep removes it
        proc = cli.run(*args)  # exit 0: the damage is said, the rest is shown
        err = proc.stderr.decode()
        assert "Traceback" not in err and "nothing is swept" in err, (args, err)
    lines = cli.image("ls").splitlines()
    assert lines[1].split()[:2] == ["test/app", "1"]
    assert sum(line.startswith("broken: ") for line in lines) == 2
    assert "nested too deep" in lines[-1] + lines[-2] and "Is a directory" in "".join(lines)
    (cli.home / "image" / "dirty").unlink(missing_ok=True)
    (cli.home / "image" / "dirty").mkdir()
    (cli.home / "image" / "dirty" / "x").write_bytes(b"")  # a marker that cannot go
    proc = cli.run("ls")
    assert b"Traceback" not in proc.stderr and b"going on" in proc.stderr


def test_an_os_error_on_a_descriptor_is_one_line() -> None:
    from lamina.frontends import cli

    assert cli._os_message(IsADirectoryError(21, "Is a directory", 3)) == "Is a directory"


# -- D11: terminal escapes ----------------------------------------------------------------


def test_image_ls_escapes_the_created_column(tmp_path: Path) -> None:
    cli = ImageCli(tmp_path / "home", backend="vfs")
    hostile = "\x1b]0;owned\x07\x1b[2J"
    archive = tmp_path / "app.tar"
    archive.write_bytes(build.docker_save([build.image(BASE, config_extra={
        "created": hostile})]))
    cli.run("image", "load", str(archive))
    out = cli.image("ls")
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07" in out.splitlines()[1]
    assert cli.image_json("ls")["images"][0]["created"] == hostile  # JSON keeps it exact


# -- D12: endless input -----------------------------------------------------------------


@pytest.mark.parametrize("source", ["/dev/zero", "archive then /dev/zero"])
def test_an_endless_stream_is_refused_in_bounded_time(tmp_path: Path, source: str) -> None:
    cli = ImageCli(tmp_path / "home", backend="vfs")
    archive = tmp_path / "app.tar"
    archive.write_bytes(build.docker_save([build.image(BASE, APP)]))
    if source == "/dev/zero":
        argv = cli.argv("image", "load", "/dev/zero")
    else:
        argv = ["sh", "-c", 'a=$1; shift; cat "$a" /dev/zero | "$@" image load -', "sh",
                str(archive), *cli.argv()]
    proc = subprocess.run(argv, capture_output=True, env=cli.env, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.startswith("lamina: ") and err.count("\n") == 1, err
    assert "after the end of the archive" in err
    assert cli.image_json("ls") == {"images": []}
    assert cli.image("load", str(archive)) == "Loaded image: test/app:1\n"  # padded: fine


# -- D9: disk amplification ---------------------------------------------------------------

SMALL_HOME = "64m"
"""A home that cannot take what an amplified archive expands to: the bound holds during
the load, not only after it."""


@contextlib.contextmanager
def small_home(tmp_path: Path) -> Iterator[Path]:
    with tools.tmpfs(tmp_path / "home", SMALL_HOME) as home:
        if not os.path.ismount(home):
            lacking("cannot mount a tmpfs for a home of bounded size")
        yield home


def used(path: Path) -> int:
    """Bytes of disk the files under ``path`` take (``du``)."""
    return sum(os.lstat(Path(d, n)).st_blocks * 512 for d, _, names in os.walk(path)
               for n in names)


def junk_first(path: Path, archive: bytes, junk: int) -> Path:
    """``archive`` (a tar) gzip'd, behind a member of ``junk`` zeros that nothing names:
    a few megabytes on disk, read through fast."""
    info = tarfile.TarInfo("junk/layer.tar")
    info.size = junk
    zeros = bytes(1 << 20)
    with igzip.open(path, "wb", compresslevel=1) as gz:
        gz.write(info.tobuf(tarfile.PAX_FORMAT))
        for _ in range(junk // len(zeros)):
            gz.write(zeros)
        gz.write(archive)  # junk is a whole number of blocks: the archive's members follow
    return path


BIG = build.image(BASE, [tb.file("big", os.urandom(5 << 20))], tag="test/big:1")
"""An image with a layer over the 4 MiB a first reading keeps: it is read twice."""


@pytest.mark.parametrize("layout", ["classic", "oci"])
def test_an_unnamed_member_is_read_past_not_stored(tmp_path: Path, layout: str) -> None:
    archive = build.docker_save([BIG]) if layout == "classic" else build.oci_tar([BIG])
    path = junk_first(tmp_path / "junk.tar.gz", archive, 1 << 30)
    assert path.stat().st_size < 16 << 20  # the image and a thousandth of the junk
    with small_home(tmp_path) as home:
        drv = lamina.open_driver(home, backend="vfs")
        store = ImageStore(drv)
        [got] = load.load(store, path=str(path))
        assert got.image.id == BIG.id and got.names == ["docker.io/test/big:1"]
        assert set(store.content.digests()) == {
            BIG.id, got.image.digest, *(build.sha(b) for b in BIG.blobs)}
        assert used(home / "image") < 16 << 20
        root = store.mount("test/big:1")
        assert (root / "big").stat().st_size == 5 << 20
        store.unmount("test/big:1")
        drv.close()


def test_a_gzipd_pipe_is_kept_compressed_not_expanded(tmp_path: Path) -> None:
    path = junk_first(tmp_path / "junk.tar.gz", build.docker_save([BIG]), 1 << 30)
    with small_home(tmp_path) as home:
        cli = ImageCli(home, backend="vfs")
        proc = subprocess.run(["sh", "-c", 'a=$1; shift; cat "$a" | "$@" image load -', "sh",
                               str(path), *cli.argv()], capture_output=True, env=cli.env,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        assert proc.stdout == b"Loaded image: test/big:1\n"
        assert os.listdir(home / "image" / "ingest") == []  # the kept bytes are gone
        assert used(home / "image") < 16 << 20
        assert cli.inspect("test/big:1")["Id"] == BIG.id


def test_an_uncompressed_pipe_keeps_only_what_is_named(tmp_path: Path) -> None:
    """A pipe cannot be read again: its members are stored as they come (never more than
    was sent), and what nothing names is swept when the load is done."""
    info = tarfile.TarInfo("junk/layer.tar")
    info.size = 6 << 20
    junk = info.tobuf(tarfile.PAX_FORMAT) + bytes(info.size)  # the archive's members follow
    cli = ImageCli(tmp_path / "home", backend="vfs")
    doc = cli.image_json("load", input=junk + build.docker_save([BIG]))
    # As the load left it (any later command, or store opened, would sweep it anyway):
    held = {f"sha256:{n}" for n in os.listdir(cli.home / "image" / "blobs" / "sha256")}
    assert held == {BIG.id, doc["images"][0]["digest"], *(build.sha(b) for b in BIG.blobs)}


def test_a_sparse_blob_in_a_layout_is_refused_at_its_size(tmp_path: Path) -> None:
    """The descriptor says a few kilobytes; the file is 4 GiB of holes: refused before
    it is copied (as soon as a byte more than the descriptor's size would be)."""
    img = build.image(BASE, APP)
    layout = build.oci_dir([img], tmp_path / "layout")
    blob = layout / "blobs" / "sha256" / build.sha(img.blobs[1])[7:]
    os.truncate(blob, 4 << 30)
    with small_home(tmp_path) as home:
        drv = lamina.open_driver(home, backend="vfs")
        store = ImageStore(drv)
        with pytest.raises(errors.Corrupt, match="its descriptor says"):
            load.load(store, path=str(layout))
        assert store.content.digests() == [] and list(drv.layers()) == []
        assert used(home / "image") < 1 << 20
        drv.close()

"""What comes from outside is not trusted (issue 23): names in an archive, documents
nested without end, endless or amplified streams, escapes in a config, a damaged home.
Each case is a real archive (or home) built here; each must end in one clear error, or
a warning and going on, and never in a traceback, a shadowed name or a full disk."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

import lamina
from lamina import errors
from lamina.image import load
from lamina.image.store import ImageStore
from tests.image import build
from tests.image.build import APP, BASE
from tests.image.tools import ImageCli

pytestmark = pytest.mark.root


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

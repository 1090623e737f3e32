"""``lamina image …`` as a person or a script runs it: every command with ``--json``,
standard input and output, names as Docker shows them, errors as one line."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest

from tests import tarbuild as tb
from tests.image import build
from tests.image.tools import ImageCli

pytestmark = pytest.mark.root

IMG = build.image(build.BASE, build.APP, tag="test/app:1")


@pytest.fixture
def cli(tmp_path: Path) -> ImageCli:
    return ImageCli(tmp_path / "home", backend="vfs")


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "app.tar"
    path.write_bytes(build.docker_save([IMG]))
    return path


def test_every_command_with_json(cli: ImageCli, archive: Path, tmp_path: Path) -> None:
    doc = cli.image_json("load", str(archive))
    assert doc == {"images": [{"name": "docker.io/test/app:1",
                               "names": ["docker.io/test/app:1"], "id": IMG.id,
                               "digest": doc["images"][0]["digest"]}],
                   "layers_applied": 2, "layers_reused": 0}
    [row] = cli.image_json("ls")["images"]
    assert row["name"] == "docker.io/test/app:1" and row["tag"] == "1" and row["id"] == IMG.id
    assert row["repository"] == "docker.io/test/app" and row["size"] > 0
    [info] = cli.image_json("inspect", "test/app:1")
    assert info["Id"] == IMG.id and info["RepoTags"] == ["test/app:1"]
    assert info["RootFS"] == {"Type": "layers", "Layers": [build.sha(x) for x in IMG.layers]}
    assert (info["Os"], info["Architecture"], info["Created"]) == (
        "linux", "amd64", "2026-01-01T00:00:00Z")
    assert info["Config"] == {"Cmd": ["/bin/sh"]}
    assert cli.image_json("tag", "test/app:1", "other:2")["target"] == "docker.io/library/other:2"
    mounted = cli.image_json("mount", "other:2")["path"]
    assert Path(mounted, "app/main.py").read_bytes() == b"print('hi')\n"
    assert cli.image_json("unmount", "other:2") == {"ref": "other:2"}
    out = tmp_path / "saved.tar"
    saved = cli.image_json("save", "-o", str(out), "other:2")
    assert saved["bytes"] == out.stat().st_size
    assert json.loads(cli.run("--json", "image", "rm", "other", code=1).stdout)["kind"] == \
        "NotFound"  # other:latest
    assert cli.image_json("rm", "other:2") == {"untagged": ["docker.io/library/other:2"],
                                               "deleted": []}
    assert cli.image_json("rm", "test/app:1") == {"untagged": ["docker.io/test/app:1"],
                                                  "deleted": [IMG.id]}
    assert cli.image_json("ls") == {"images": []}
    assert cli.image_json("prune") == {"blobs": [], "bytes": 0}
    assert cli.json("ls") == {"layers": []}


def test_text_output_is_dockers(cli: ImageCli, archive: Path) -> None:
    assert cli.image("load", str(archive)) == "Loaded image: test/app:1\n"
    lines = cli.image("ls").splitlines()
    assert lines[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert lines[1].split()[:3] == ["test/app", "1", IMG.id[7:19]]
    assert cli.image("rm", "test/app:1").splitlines() == ["Untagged: test/app:1",
                                                          f"Deleted: {IMG.id}"]


def test_load_from_stdin_and_save_to_stdout(cli: ImageCli, archive: Path) -> None:
    cli.run("image", "load", input=archive.read_bytes())
    saved = cli.run("image", "save", "test/app:1").stdout
    other = ImageCli(cli.home.parent / "other", backend="vfs")
    assert other.run("image", "load", "-", input=saved).stdout.decode() == \
        "Loaded image: test/app:1\n"
    assert other.image_json("inspect", "test/app:1")[0]["Id"] == IMG.id
    third = ImageCli(cli.home.parent / "third", backend="vfs")
    assert third.image("load", "-i", str(archive)) == "Loaded image: test/app:1\n"  # docker's -i
    assert b"once" in third.run("image", "load", "-i", str(archive), str(archive),
                                code=2).stderr


def test_errors_are_one_line(cli: ImageCli, archive: Path, tmp_path: Path) -> None:
    cli.run("image", "load", str(archive))
    cases = [
        (("image", "inspect", "nope:1"), "no image nope:1"),
        (("image", "inspect", "UPPER"), "invalid image name"),
        (("image", "load", str(tmp_path / "absent.tar")), "cannot read it"),
        (("image", "mount", "sha256:" + "0" * 64), "no image"),
        (("image", "tag", "test/app:1", "x@sha256:" + "0" * 64), "cannot tag with a digest"),
    ]
    for args, message in cases:
        proc = cli.run(*args, code=1)
        err = proc.stderr.decode()
        assert err.startswith("lamina: ") and message in err and err.count("\n") == 1, err
        doc = json.loads(cli.run("--json", *args, code=1).stdout)
        assert message in doc["error"] and doc["kind"]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(build.docker_save([build.Image([tb.raw_member("../x", b"x") + bytes(1024)])]))
    err = cli.run("image", "load", str(bad), code=1).stderr.decode()
    assert err.startswith("lamina: ") and err.count("\n") == 1 and "Traceback" not in err
    assert [i["name"] for i in cli.image_json("ls")["images"]] == ["docker.io/test/app:1"]


def test_save_refuses_a_terminal_and_load_refuses_to_read_one(cli: ImageCli,
                                                              archive: Path) -> None:
    cli.run("image", "load", str(archive))
    leader, follower = pty.openpty()
    try:
        for args in (["image", "save", "test/app:1"], ["image", "load"]):
            proc = subprocess.run(cli.argv(*args), stdin=follower, stdout=follower,
                                  stderr=subprocess.PIPE, env=cli.env, timeout=60)
            assert proc.returncode == 2 and b"terminal" in proc.stderr
    finally:
        os.close(leader)
        os.close(follower)


def test_progress_on_a_terminal(cli: ImageCli, archive: Path) -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(cli.argv("image", "load", str(archive)), stdout=subprocess.PIPE,
                              stderr=follower, env={**cli.env, "COLUMNS": "120"}, timeout=60)
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert proc.returncode == 0
    assert b"load" in shown and b"kB" in shown  # the bar, bytes against the total
    assert proc.stdout == b"Loaded image: test/app:1\n"

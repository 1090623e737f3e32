"""A real Docker engine on ``lamina serve`` (contract §5, issue 4).

One ``lamina serve`` and one ``dockerd --experimental --storage-driver lamina-test-…``
(Debian's docker.io, with a private data-root, exec-root and API socket) for the
module, always stopped, unmounted and removed at the end.  Docker must get the same
results as it got on its built-in overlay2 when it made the corpus
(``shared/corpus/build-corpus.sh``): ``docker load`` of ``app-docker-save.tar``,
``docker run``, ``docker diff`` (``app-changes.txt``), ``docker commit`` and ``docker
save`` (the original layers, byte for byte), ``docker export`` (``app-flat.tar``);
``serve`` restarted under the running engine; and after ``docker rm`` and ``docker
rmi`` of everything, no layer left in lamina's store.

The tests share the engine and run in file order; the last one removes everything.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import lacking, mounts_under
from tests.integration.engine import (
    PLUGINS_DIR,
    Dockerd,
    Serve,
    TreeRss,
    docker_missing,
    plugin_name,
    teardown,
)
from tests.snapshot import assert_same_tree, snapshot_tar
from tests.test_corpus import NOT_IN_IMAGE

pytestmark = [pytest.mark.root, pytest.mark.corpus, pytest.mark.slow]

IMAGE = "corpus/app:1"
MB = 1 << 20
RSS_LIMIT = 150 * MB
# What build-corpus.sh's last container does (its `docker diff` is app-changes.txt).
CHANGE = ("echo changed >> /etc/debian_version; rm -rf /usr/share/zoneinfo; "
          "mkdir /newdir; touch /newdir/f")


@dataclass
class Engine:
    """The engine, the plugin it stores everything in, and a scratch directory."""

    dockerd: Dockerd
    serve: Serve
    work: Path
    corpus: Path
    load_peak_rss: int = 0
    load_peak_tree_rss: int = 0

    @property
    def layers(self) -> list[str]:
        """The layers in lamina's store (``HOME/layers``), whatever their state."""
        return sorted(p.name for p in (self.dockerd.driver_home / "layers").iterdir())

    def docker(self, *args: str) -> str:
        """``docker ARGS…`` on this engine; its output."""
        return self.dockerd.docker(*args).stdout


@pytest.fixture(scope="module")
def engine(corpus_dir: Path) -> Iterator[Engine]:
    reason = docker_missing()
    if reason:
        lacking(reason)
    work = Path(tempfile.mkdtemp(prefix="lamina-docker-", dir="/var/tmp"))
    name = plugin_name()
    PLUGINS_DIR.mkdir(parents=True, exist_ok=True)
    serve = Serve(PLUGINS_DIR / f"{name}.sock", work / "serve.log")
    dockerd = Dockerd(work / "engine", name)
    try:
        serve.start()
        dockerd.start()
        yield Engine(dockerd, serve, work, corpus_dir)
    finally:
        teardown(dockerd, [serve], work)


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    """The corpus image, loaded once (serve's peak memory noted right after)."""
    with TreeRss(engine.serve.pid) as tree:
        engine.docker("load", "-i", str(engine.corpus / "app-docker-save.tar"))
    engine.load_peak_rss = engine.serve.peak_rss()
    engine.load_peak_tree_rss = tree.peak
    return IMAGE


def original_layers(corpus: Path) -> list[str]:
    """The sha256 of each layer tar of the corpus image, bottom first."""
    with tarfile.open(corpus / "app-docker-save.tar") as tar:
        return save_layer_digests(tar)


def save_layer_digests(tar: tarfile.TarFile) -> list[str]:
    """The sha256 of each layer tar in a ``docker save`` archive, bottom first."""
    manifest_file = tar.extractfile("manifest.json")
    assert manifest_file is not None
    digests = []
    for name in json.load(manifest_file)[0]["Layers"]:
        member = tar.extractfile(name)
        assert member is not None
        h = hashlib.sha256()
        while chunk := member.read(MB):
            h.update(chunk)
        digests.append(h.hexdigest())
    return digests


def test_load_streams_into_lamina(engine: Engine, image: str) -> None:
    info = json.loads(engine.docker("image", "inspect", image))[0]
    assert info["GraphDriver"]["Name"] == engine.dockerd.storage_driver
    assert "UpperDir" in info["GraphDriver"]["Data"] or "dir" in info["GraphDriver"]["Data"]
    assert info["RootFS"]["Layers"] == [f"sha256:{d}" for d in original_layers(engine.corpus)]
    assert len(engine.layers) >= 3
    assert engine.load_peak_rss <= RSS_LIMIT, (
        f"lamina serve peaked at {engine.load_peak_rss / MB:.0f} MiB while loading the image"
    )
    # with the processes it applies layers in (its fork server and their children)
    assert engine.load_peak_tree_rss <= RSS_LIMIT, (
        f"lamina serve and its helpers peaked at {engine.load_peak_tree_rss / MB:.0f} MiB"
    )
    status = engine.docker("info", "--format", "{{json .DriverStatus}}")
    assert ["Home", str(engine.dockerd.driver_home)] in json.loads(status)


def test_run_reads_writes_and_deletes(engine: Engine, image: str) -> None:
    script = (
        "set -e; cat /etc/debian_version; cat /app/a.txt; stat -c %h /app/b.txt; "
        "echo written > /tmp/new; cat /tmp/new; "
        "rm /etc/debian_version; test ! -e /etc/debian_version; "
        "rm -r /usr/share/zoneinfo; test ! -e /usr/share/zoneinfo; "
        "python3 -c 'import json, sys; print(json.dumps(sys.version_info[:2]))'"
    )
    out = engine.docker("run", "--rm", image, "sh", "-c", script).splitlines()
    assert out[1:] == ["hello", "2", "written", "[3, 11]"], out
    assert out[0].startswith("12."), out


@pytest.fixture(scope="module")
def changed(engine: Engine, image: str) -> str:
    """A container that did what build-corpus.sh's last container did."""
    engine.docker("run", "--name", "changed", image, "sh", "-c", CHANGE)
    return "changed"


def test_docker_diff_is_overlay2s(engine: Engine, changed: str) -> None:
    got = engine.docker("diff", changed).splitlines()
    want = (engine.corpus / "app-changes.txt").read_text().splitlines()
    assert sorted(got, key=lambda line: line[2:]) == want


def test_commit_then_save_gives_the_original_layers(engine: Engine, changed: str) -> None:
    engine.docker("commit", changed, "corpus/committed:1")
    saved = engine.work / "committed.tar"
    engine.docker("save", "-o", str(saved), "corpus/committed:1")
    with tarfile.open(saved) as tar:
        digests = save_layer_digests(tar)
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        top_name = json.load(manifest_file)[0]["Layers"][-1]
        top = tar.extractfile(top_name)
        assert top is not None
        with tarfile.open(fileobj=top) as layer:
            entries = {m.name.rstrip("/"): m for m in layer}
            version = layer.extractfile(entries["etc/debian_version"])
            assert version is not None
            appended = version.read()
    saved.unlink()
    assert digests[:-1] == original_layers(engine.corpus)  # byte for byte
    assert sorted(entries) == ["etc", "etc/debian_version", "newdir", "newdir/f", "usr",
                               "usr/share", "usr/share/.wh.zoneinfo"]
    assert appended.endswith(b"\nchanged\n")
    out = engine.docker("run", "--rm", "corpus/committed:1", "sh", "-c",
                        "tail -1 /etc/debian_version; ls /newdir; ls /usr/share/zoneinfo || :")
    assert out.splitlines() == ["changed", "f"]


def test_export_is_overlay2s(engine: Engine, image: str) -> None:
    cid = engine.docker("create", image, "true").strip()
    exported = engine.work / "export.tar"
    engine.docker("export", "-o", str(exported), cid)
    engine.docker("rm", cid)

    def keep(path: str) -> bool:
        return path != "/" and not any(path == p or path.startswith(p + "/") for p in NOT_IN_IMAGE)

    got = snapshot_tar(exported, keep=keep)
    exported.unlink()
    assert_same_tree(got, snapshot_tar(engine.corpus / "app-flat.tar", keep=keep))


def test_serve_restarts_under_a_running_engine(engine: Engine, image: str) -> None:
    engine.docker("run", "-d", "--name", "running", image, "sleep", "600")
    engine.docker("run", "--name", "stopped", image, "sh", "-c", "echo kept > /kept")
    engine.docker("create", "--name", "created", image, "cat", "/etc/debian_version")
    before = engine.layers
    assert engine.serve.stop() == 0, "serve did not stop cleanly on SIGTERM"
    assert mounts_under(engine.dockerd.driver_home) == [], "serve left mounts behind"
    assert not engine.serve.socket.exists()
    engine.serve.start()
    assert engine.layers == before
    assert engine.docker("exec", "running", "cat", "/etc/hostname").strip()
    assert engine.docker("start", "-a", "created").startswith("12.")
    assert engine.docker("start", "-a", "stopped") == ""
    assert "A /kept" in engine.docker("diff", "stopped").splitlines()
    engine.docker("restart", "-t", "1", "running")
    assert engine.docker("exec", "running", "ls", "/app/a.txt").strip() == "/app/a.txt"


def test_rm_and_rmi_leave_no_layer(engine: Engine, image: str) -> None:
    containers = engine.docker("ps", "-aq").split()
    if containers:
        engine.docker("rm", "-f", *containers)
    # By name first (a parent image goes with its last child), then whatever is left.
    tags = engine.docker("images", "--format", "{{.Repository}}:{{.Tag}}").split()
    if tags:
        engine.docker("rmi", *tags)
    for _ in range(5):
        for left in engine.docker("images", "-aq").split():
            engine.dockerd.docker("rmi", "-f", left, check=False)
    assert engine.docker("images", "-aq").strip() == ""
    assert engine.layers == []
    home = engine.dockerd.driver_home
    assert sorted(p.name for p in (home / "mounts").iterdir()) == []
    assert sorted(p.name for p in (home / "staging").iterdir()) == []
    assert mounts_under(home) == []


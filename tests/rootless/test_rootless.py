"""lamina without root: a real ordinary user, made by the test (:mod:`tests.rootless.conftest`).

Inside a user namespace of its own (``unshare --map-root-user --map-auto`` and
``rootlesskit``), the user's lamina keeps a home whose files carry the layers' real owners
(each the user's subordinate id for it, on the host), with overlayfs' ``userxattr`` way of
whiteouts and opaque directories; it applies the corpus (through the CLI and the Python
API), serves the union, which is exactly what ``docker export`` wrote, takes a container's
changes as ``docker diff`` saw them, and serves containerd's snapshot calls.  Outside any
namespace every command says in one line that it cannot work, and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import lamina
from lamina import errors
from tests.conftest import lacking
from tests.rootless.conftest import NAMESPACES, User
from tests.snapshot import Node, assert_same_tree, snapshot_tar
from tests.test_corpus import assert_docker_export_tree

pytestmark = [pytest.mark.root, pytest.mark.corpus]


def _node(row: list[Any]) -> Node:
    kind, mode, uid, gid, size, sha256, link, rdev, cap, mtime = row
    return Node(kind, mode, uid, gid, size, sha256, link, tuple(rdev) if rdev else None,
                bytes.fromhex(cap) if cap else None, mtime)


def tree_of(doc: dict[str, Any]) -> tuple[dict[str, Node], set[frozenset[str]]]:
    """The tree and hard links :mod:`tests.rootless.inside` printed."""
    return ({path: _node(row) for path, row in doc["tree"].items()},
            {frozenset(group) for group in doc["links"]})


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.args[-1] if done.args else done, done.stderr)
    return done.stdout


def feed(user: User, argv: list[str], ns: str | None, source: IO[bytes]
         ) -> subprocess.CompletedProcess[str]:
    """``argv`` as the user in ``ns``, with ``source`` (root's to read) on its stdin."""
    read_end, write_end = os.pipe()

    def pump() -> None:
        # The command may stop reading: its exit status tells why.
        with os.fdopen(write_end, "wb") as sink, contextlib.suppress(BrokenPipeError):
            shutil.copyfileobj(source, sink, 1 << 20)

    pumping = threading.Thread(target=pump)
    pumping.start()
    try:
        return user.run(argv, ns, stdin=read_end)
    finally:
        os.close(read_end)
        pumping.join()


def app_layers(corpus: Path) -> Iterator[tuple[int, IO[bytes]]]:
    """The corpus image's layer tars, bottom first, streamed out of ``docker save``'s."""
    with tarfile.open(corpus / "app-docker-save.tar") as outer:
        manifest = outer.extractfile("manifest.json")
        assert manifest is not None
        for i, name in enumerate(json.load(manifest)[0]["Layers"]):
            member = outer.extractfile(name)
            assert member is not None
            yield i, member


@pytest.fixture(params=sorted(NAMESPACES))
def ns(request: pytest.FixtureRequest, rootless_user: User) -> Iterator[str]:
    """Each way into a user namespace, with a fresh home."""
    yield request.param
    shutil.rmtree(rootless_user.home, ignore_errors=True)


def test_outside_a_user_namespace_every_command_refuses(rootless_user: User,
                                                        corpus_dir: Path) -> None:
    user = rootless_user
    for args in (("status",), ("ls",), ("check",), ("create", "a"), ("apply", "a", "-"),
                 ("snapshotter",), ("snapshotter", "--print-containerd-config"),
                 ("serve",), ("image", "ls")):
        with open(corpus_dir / "rootfs.tar", "rb") as tar:
            done = user.lamina(*args, ns=None, stdin=tar.fileno())
        assert done.returncode == 1 and done.stdout == "", (args, done)
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(
            f"lamina: cannot keep layers as uid {user.uid} outside a user namespace: run it "
            "as root, or as an ordinary user inside a user namespace: `rootlesskit"), done.stderr
    code = ("import lamina\n"
            "try:\n    lamina.open_driver('home')\n"
            "except lamina.errors.Unsupported as e:\n    print(e)\n")
    said = ok(user.run(["/usr/bin/python3", "-c", code], None))
    assert "cannot keep layers as uid" in said and "rootlesskit" in said
    assert not user.home.exists()


def test_cli_applies_the_corpus_image_and_serves_its_union(
        rootless_user: User, corpus_dir: Path, ns: str) -> None:
    user = rootless_user
    for i, layer in app_layers(corpus_dir):
        parent = ["--parent", f"app{i - 1}"] if i else []
        ok(feed(user, ["/usr/bin/python3", "-m", "lamina", "apply", f"app{i}", *parent, "-"],
                ns, layer))
    out = user.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    shutil.chown(out, user.uid, user.gid)
    # One namespace for the lot: a union mounted there lasts as long as it does.
    ok(user.script(f"""
        L --json status > {out}/status.json
        top=$(L mount app2)
        INSIDE tree "$top" > {out}/union.json
        L unmount app2
        L create --rw ctr --parent app2
        root=$(L mount ctr)
        echo changed >> "$root/etc/debian_version"
        rm -r "$root/usr/share/zoneinfo"
        mkdir "$root/newdir"
        touch "$root/newdir/f"
        L unmount ctr
        L changes ctr > {out}/changes.txt
        L diff app2 -o {out}/app2.tar
        L --json check > {out}/check.json
        L rm ctr
        """, ns))
    status = dict(json.loads((out / "status.json").read_text())["status"])
    assert status["Layer Format"].startswith("dir (EROFS images are mounted by root of the "
                                             "initial user namespace only")
    tree, links = tree_of(json.loads((out / "union.json").read_text()))
    assert_docker_export_tree(tree, links, corpus_dir)  # owners as the namespace sees them
    changes = set((out / "changes.txt").read_text().splitlines())
    assert changes == set((corpus_dir / "app-changes.txt").read_text().splitlines())
    assert json.loads((out / "check.json").read_text())["problems"] == []
    # The top layer's diff names what its tar did (the kernel's overlay layout read back).
    want: set[str] = set()
    for i, layer in app_layers(corpus_dir):
        if i == 2:
            with tarfile.open(fileobj=layer, mode="r|") as tar:
                want = {_name(m.name) for m in tar}
    with tarfile.open(out / "app2.tar") as again:
        assert {_name(m.name) for m in again} == want
    # On the host: the layers' files carry the real owners (the user's subordinate ids)
    # and overlayfs' user.* xattrs, never trusted.*; whiteouts are 0/0 devices.
    layers = user.home / "layers"
    diffs = {i: layers / f"app{i}" / "diff" for i in range(3)}
    found = [d / "home" for d in diffs.values() if (d / "home").exists()]
    assert found
    st = os.lstat(found[-1])
    assert (st.st_uid, st.st_gid) == (user.host_uid(1000), user.host_gid(1000))
    st = os.lstat(diffs[0] / "etc/passwd")
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
    xattrs = {(str(path), name) for d in diffs.values() for path in _all(d)
              for name in os.listxattr(path, follow_symlinks=False)
              if name.startswith(("trusted.", "user.overlay."))}
    assert xattrs and all(name == "user.overlay.opaque" for _, name in xattrs), xattrs
    whiteouts = [p for d in diffs.values() for p in _all(d)
                 if stat.S_ISCHR(os.lstat(p).st_mode)]
    assert whiteouts and all(os.lstat(p).st_rdev == 0 for p in whiteouts)
    # Root of the host does not open it (its owners and xattrs are the namespace's), and
    # writes nothing into it saying so.
    before = sorted(os.listdir(user.home))
    with pytest.raises(errors.Unsupported, match="this home was made in a user namespace"):
        lamina.open_driver(user.home)
    assert sorted(os.listdir(user.home)) == before


def _name(name: str) -> str:
    return name.removeprefix("./").rstrip("/")


def _all(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def test_python_api_applies_a_root_filesystem(rootless_user: User, corpus_dir: Path) -> None:
    user = rootless_user
    with open(corpus_dir / "rootfs.tar", "rb") as tar:
        doc = json.loads(ok(feed(user, ["/usr/bin/python3", "-m", "tests.rootless.inside",
                                       "api", str(user.home)], "unshare", tar)))
    try:
        assert doc["backend"] == "overlay"
        tree, _ = tree_of(doc)
        want = snapshot_tar(corpus_dir / "rootfs.tar")
        devices = {path for path, node in want.items() if node.type in ("char", "block")}
        assert devices  # the kernel makes none in a user namespace: they are left out
        assert_same_tree({p: n for p, n in tree.items() if p != "/"},
                         {p: n for p, n in want.items() if p not in devices and p != "/"})
        st = os.lstat(user.home / "layers/rootfs/diff/etc/shadow")
        shadow = want["/etc/shadow"]
        assert (st.st_uid, st.st_gid) == (user.host_uid(shadow.uid), user.host_gid(shadow.gid))
    finally:
        shutil.rmtree(user.home, ignore_errors=True)


ONE_ID = ["unshare", "--user", "--map-root-user", "--mount"]
"""A user namespace that maps the user alone (no subordinate ids)."""


def test_an_owner_the_namespace_does_not_map_is_named(rootless_user: User,
                                                      corpus_dir: Path) -> None:
    # Only the user itself mapped: the first file of another owner is refused in one line
    # that names it and the ways out, and no layer is left; with apply.squash_owners
    # those files are the namespace root's instead (podman's ignore_chown_errors).
    user = rootless_user
    lamina = ["/usr/bin/python3", "-m", "lamina"]
    with open(corpus_dir / "rootfs.tar", "rb") as tar:
        done = feed(user, [*ONE_ID, *lamina, "apply", "base", "-"], None, tar)
    try:
        assert done.returncode == 1, done
        assert done.stderr.count("\n") == 1, done.stderr
        assert "owner 0:42 is not mapped in this user namespace (uids 0, gids 0): give the " \
               "user more subordinate ids (/etc/subuid, /etc/subgid), or set " \
               "apply.squash_owners=true" in done.stderr and "layer base" in done.stderr, \
            done.stderr
        listed = user.run([*ONE_ID, *lamina, "--json", "ls"], None)
        assert json.loads(ok(listed)) == {"layers": []}
        squash = ["--opt", "apply.squash_owners=true"]
        with open(corpus_dir / "rootfs.tar", "rb") as tar:
            ok(feed(user, [*ONE_ID, *lamina, *squash, "apply", "base", "-"], None, tar))
        owners = {(st.st_uid, st.st_gid) for st in map(os.lstat, _all(user.home / "layers"))}
        assert owners == {(user.uid, user.gid)}  # every file the namespace root's
        assert json.loads(ok(user.run([*ONE_ID, *lamina, *squash, "--json", "check"], None))
                          )["problems"] == []
    finally:
        shutil.rmtree(user.home, ignore_errors=True)


def test_snapshotter_serves_containerd_calls(rootless_user: User, ns: str) -> None:
    user = rootless_user
    sock = user.work / "run/lamina/snapshotter.sock"  # the default, under $XDG_RUNTIME_DIR
    out = ok(user.script(f"""
        /usr/bin/python3 -m lamina snapshotter > {user.work}/snapshotter.log 2>&1 &
        pid=$!
        trap 'kill $pid; wait $pid' EXIT
        INSIDE snapshots {sock}
        """, ns, timeout=180))
    doc = json.loads(out)
    (kind, _, options), = doc["prepare"]
    assert kind == "overlay" and "userxattr" in options and "redirect_dir=nofollow" in options
    assert any(o.startswith(("lowerdir=", "upperdir=")) and str(user.home) in o
               for o in options), options
    assert doc["home_owner"] == [1000, 1000]  # as the namespace sees its owners
    assert doc["view_tree"] == ["etc", "etc/passwd", "home", "new"]
    (kind, _, options), = doc["view"]
    assert kind == "overlay" and "ro" in options and "userxattr" in options
    # An id-mapped snapshot needs idmapped mounts, which root of a user namespace cannot
    # make: refused, nothing left.
    code, details = doc["mapped"]
    assert code == "UNIMPLEMENTED" and "root of a user namespace cannot make" in details
    assert list((user.home / "layers").iterdir()) == []  # every snapshot removed


def test_docker_plugin_serves_the_corpus_image(rootless_user: User, corpus_dir: Path,
                                              ns: str) -> None:
    # Docker's graph driver calls on `lamina serve` in the user's namespace, as a
    # rootless dockerd (which runs under rootlesskit too) would make them: the image's
    # layer tars through ApplyDiff, a container's layer through Get and Put, its
    # Changes, a layer's Diff.
    user = rootless_user
    work = user.work / "plugin"
    shutil.rmtree(work, ignore_errors=True)
    (work / "layers").mkdir(parents=True)
    for i, layer in app_layers(corpus_dir):
        with open(work / "layers" / f"{i}.tar", "wb") as out:
            shutil.copyfileobj(layer, out, 1 << 20)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(work)], check=True)
    sock = work / "lamina.sock"
    try:
        doc = json.loads(ok(user.script(f"""
            cd {work}
            /usr/bin/python3 -m lamina serve --socket {sock} > serve.log 2>&1 &
            pid=$!
            trap 'kill $pid; wait $pid' EXIT
            for _ in $(seq 300); do [ -S {sock} ] && break; sleep 0.1; done
            INSIDE plugin {sock}
            """, ns, timeout=600)))
        assert doc["activate"] == {"Implements": ["GraphDriver"]}
        status = dict(doc["status"])
        assert status["Backend"] == "overlay"
        tree, links = tree_of(doc["union"])
        assert_docker_export_tree(tree, links, corpus_dir)
        letters = {0: "C", 1: "A", 2: "D"}
        changes = {f"{letters[c['Kind']]} {c['Path']}" for c in doc["changes"]}
        assert changes == set((corpus_dir / "app-changes.txt").read_text().splitlines())
        want: set[str] = set()
        for i, layer in app_layers(corpus_dir):
            if i == 2:
                with tarfile.open(fileobj=layer, mode="r|") as tar:
                    want = {_name(m.name) for m in tar}
        assert {_name(name) for name in doc["diff"]} == want
        # On the host: the subordinate owners, overlayfs' user.* xattrs only.
        layers = work / "docker/lamina/layers"
        diffs = [layers / f"app{i}" / "diff" for i in range(3)]
        st = os.lstat(next(d / "home" for d in reversed(diffs) if (d / "home").exists()))
        assert (st.st_uid, st.st_gid) == (user.host_uid(1000), user.host_gid(1000))
        xattrs = {name for d in diffs for path in _all(d)
                  for name in os.listxattr(path, follow_symlinks=False)
                  if name.startswith(("trusted.", "user.overlay."))}
        assert xattrs == {"user.overlay.opaque"}
        assert not (layers / "ctr").exists()  # removed
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_rootless_containerd_unpacks_into_lamina(rootless_user: User, corpus_dir: Path) -> None:
    # containerd itself as the user (Debian's containerd 1.6, under rootlesskit, as
    # containerd-rootless.sh runs it), with lamina as its proxy snapshotter in the same
    # namespace: `ctr images import` unpacks the corpus image into lamina (containerd
    # writes each layer through the overlay mounts lamina gives it), and a container's
    # snapshot of it, mounted as ctr says, is what docker export wrote.
    user = rootless_user
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            lacking(f"no {tool} (make bootstrap installs Debian's containerd)")
    out = user.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    shutil.chown(out, user.uid, user.gid)
    script = textwrap.dedent(user.containerd_script(out)) + textwrap.dedent(f"""
        mkdir -p {user.work}/mnt
        C images import --snapshotter lamina - > /dev/null
        S() {{ C snapshots --snapshotter lamina "$@"; }}
        top=$(S ls | awk 'NR > 1 {{ key[$1] = 1; if (NF == 3) parent[$2] = 1 }}
                          END {{ for (k in key) if (!(k in parent)) print k }}')
        S prepare ctr1 "$top"
        eval "$(S mounts {user.work}/mnt ctr1)"
        INSIDE tree {user.work}/mnt > {out}/union.json
        umount {user.work}/mnt
        S ls > {out}/snapshots.txt
        S rm ctr1
        L --json check > {out}/check.json
        """)
    with open(corpus_dir / "app-docker-save.tar", "rb") as image:
        ok(feed(user, user.script_argv(script), "rootlesskit", image))
    tree, links = tree_of(json.loads((out / "union.json").read_text()))
    assert_docker_export_tree(tree, links, corpus_dir)
    assert len((out / "snapshots.txt").read_text().splitlines()) == 1 + 3 + 1  # 3 layers, ctr1
    assert json.loads((out / "check.json").read_text())["problems"] == []
    homes = [p for p in (user.home / "layers").glob("*/diff/home") if p.is_dir()]
    assert {os.lstat(p).st_uid for p in homes} == {user.uid, user.host_uid(1000)}  # 0, 1000

"""What the rootless tests run as their ordinary user, inside its user namespace (Debian's
``/usr/bin/python3``, with lamina and its dependencies on ``PYTHONPATH``).  Each command
prints one JSON document on standard output, for the test (root, outside) to check.

    inside.py tree ROOT            the tree at ROOT (tests.snapshot), its hard links
    inside.py api HOME             the Python API: the tar on stdin applied as a layer,
                                   its union's tree, the store's status
    inside.py snapshots SOCKET     containerd's snapshot calls on `lamina snapshotter`
                                   at SOCKET, each snapshot mounted as containerd would
    inside.py plugin SOCKET        Docker's graph driver calls on `lamina serve` at
                                   SOCKET: the layer tars in ./layers applied, a
                                   container's layer changed, its changes and a diff
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket as sockets
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from tests.snapshot import Node, hardlink_groups, snapshot


def tree_doc(root: str | os.PathLike[str]) -> dict[str, Any]:
    nodes: dict[str, Node] = snapshot(root)
    return {
        "tree": {path: [*node[:-2], node.cap.hex() if node.cap else None, node.mtime]
                 for path, node in nodes.items()},
        "links": sorted(sorted(group) for group in hardlink_groups(root)),
    }


def api(home: str) -> dict[str, Any]:
    import lamina

    drv = lamina.open_driver(home)
    try:
        size = drv.apply_diff("rootfs", None, sys.stdin.buffer)
        root = drv.get("rootfs")
        try:
            doc = tree_doc(root)
        finally:
            drv.put("rootfs")
        return {"size": size, "backend": drv.name, "status": drv.status(), **doc}
    finally:
        drv.close()


def _mount(mounts: Any, target: Path) -> None:
    """Mount what the snapshotter answered, as containerd does (one mount each)."""
    target.mkdir(exist_ok=True)
    for m in mounts:
        options = list(m.options)
        argv = ["mount", "-t", m.type, "-o", ",".join(options), m.source, str(target)]
        subprocess.run(argv, check=True)


def _rows(mounts: Any) -> list[list[Any]]:
    return [[m.type, m.source, list(m.options)] for m in mounts]


def snapshots(socket: str) -> dict[str, Any]:
    import grpc

    from lamina.frontends.containerd.api import snapshots_pb2 as pb
    from lamina.frontends.containerd.api import snapshots_pb2_grpc

    work = Path.cwd() / "mnt"  # the mount points
    work.mkdir(exist_ok=True)
    out: dict[str, Any] = {}
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub: Any = snapshots_pb2_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
        grpc.channel_ready_future(channel).result(timeout=60)
        first = stub.Prepare(pb.PrepareSnapshotRequest(key="a")).mounts
        _mount(first, work / "a")
        (work / "a/etc").mkdir()
        (work / "a/etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        (work / "a/home").mkdir()
        os.chown(work / "a/home", 1000, 1000)
        (work / "a/gone").mkdir()
        (work / "a/gone/f").write_text("f")
        subprocess.run(["umount", str(work / "a")], check=True)
        stub.Commit(pb.CommitSnapshotRequest(name="a1", key="a"))
        second = stub.Prepare(pb.PrepareSnapshotRequest(key="b", parent="a1")).mounts
        out["prepare"] = _rows(second)
        _mount(second, work / "b")
        out["home_owner"] = [os.stat(work / "b/home").st_uid, os.stat(work / "b/home").st_gid]
        (work / "b/gone/f").unlink()  # a whiteout in b's upper
        (work / "b/gone").rmdir()
        (work / "b/new").write_text("new")
        subprocess.run(["umount", str(work / "b")], check=True)
        stub.Commit(pb.CommitSnapshotRequest(name="b1", key="b"))
        view = stub.View(pb.ViewSnapshotRequest(key="v", parent="b1")).mounts
        out["view"] = _rows(view)
        _mount(view, work / "v")
        out["view_tree"] = sorted(
            str(p.relative_to(work / "v")) for p in (work / "v").rglob("*"))
        subprocess.run(["umount", str(work / "v")], check=True)
        labels = {"containerd.io/snapshot/uidmapping": "0:1000:1",
                  "containerd.io/snapshot/gidmapping": "0:1000:1"}
        try:
            stub.Prepare(pb.PrepareSnapshotRequest(key="m", parent="b1", labels=labels))
            out["mapped"] = "served"
        except grpc.RpcError as e:
            out["mapped"] = [e.code().name, e.details()]
        for key in ("v", "b1", "a1"):
            stub.Remove(pb.RemoveSnapshotRequest(key=key))
    return out


class _Plugin(http.client.HTTPConnection):
    """Docker's side of the graph driver protocol, on one kept-alive connection."""

    def __init__(self, path: str) -> None:
        super().__init__("lamina", timeout=600)
        self.path = path

    def connect(self) -> None:
        self.sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)

    def answer(self) -> http.client.HTTPResponse:
        resp = self.getresponse()
        if resp.status != 200:
            raise SystemExit(f"{resp.status}: {resp.read()!r}")
        return resp

    def ok(self, method: str, body: dict[str, Any]) -> Any:
        self.request("POST", f"/{method}", body=json.dumps(body).encode())
        doc = json.loads(self.answer().read())
        if doc.get("Err"):
            raise SystemExit(f"{method}: {doc['Err']}")
        return doc


def plugin(socket: str) -> dict[str, Any]:
    layers = sorted(Path("layers").iterdir())
    c = _Plugin(socket)
    out: dict[str, Any] = {"activate": c.ok("Plugin.Activate", {})}
    c.ok("GraphDriver.Init", {"Home": str(Path.cwd() / "docker/lamina"), "Opts": []})
    parent = ""
    for i, path in enumerate(layers):  # as Docker applies a pulled image's layers
        with open(path, "rb") as tar:
            c.request("POST", f"/GraphDriver.ApplyDiff?id=app{i}&parent={parent}", body=tar,
                      headers={"Content-Length": str(path.stat().st_size)})
            json.loads(c.answer().read())
        parent = f"app{i}"
    c.ok("GraphDriver.CreateReadWrite", {"ID": "ctr", "Parent": parent, "MountLabel": ""})
    root = Path(c.ok("GraphDriver.Get", {"ID": "ctr", "MountLabel": ""})["Dir"])
    out["union"] = tree_doc(root)
    with open(root / "etc/debian_version", "a") as f:  # what the corpus's container did
        f.write("changed\n")
    shutil.rmtree(root / "usr/share/zoneinfo")
    (root / "newdir").mkdir()
    (root / "newdir/f").touch()
    c.ok("GraphDriver.Put", {"ID": "ctr"})
    out["changes"] = c.ok("GraphDriver.Changes", {"ID": "ctr", "Parent": parent})["Changes"]
    c.request("POST", "/GraphDriver.Diff", body=json.dumps({"ID": parent, "Parent": ""}))
    with tarfile.open(fileobj=c.answer(), mode="r|") as diff:
        out["diff"] = [m.name for m in diff]
    out["status"] = c.ok("GraphDriver.Status", {})["Status"]
    c.ok("GraphDriver.Remove", {"ID": "ctr"})
    return out


def main() -> None:
    command, arg = sys.argv[1], sys.argv[2]
    if command == "tree":
        doc = tree_doc(arg)
    elif command == "api":
        doc = api(arg)
    elif command == "snapshots":
        doc = snapshots(arg)
    elif command == "plugin":
        doc = plugin(arg)
    else:
        raise SystemExit(f"unknown command {command!r}")
    json.dump(doc, sys.stdout)


if __name__ == "__main__":
    main()

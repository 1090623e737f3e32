"""The checked-in code of containerd's snapshot API is what scripts/gen-proto.sh makes.

Regenerates it into a temporary directory with the pinned grpcio-tools and compares
byte for byte, so the generated modules can never drift from the ``.proto`` files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
API = "lamina/frontends/containerd/api"


def test_regenerating_gives_the_checked_in_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) is not installed")
    subprocess.run(["bash", str(REPO / "scripts/gen-proto.sh"), str(tmp_path)], check=True,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    made = sorted(p.name for p in (tmp_path / API).iterdir())
    kept = sorted(p.name for p in (REPO / API).iterdir() if "_pb2" in p.name)
    assert made == kept
    for name in made:
        assert (tmp_path / API / name).read_bytes() == (REPO / API / name).read_bytes(), name


def test_wire_names_are_containerds() -> None:
    from lamina.frontends.containerd.api import mount_pb2, snapshots_pb2

    assert snapshots_pb2.DESCRIPTOR.package == "containerd.services.snapshots.v1"
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    assert [(v.name, v.number) for v in snapshots_pb2.Kind.DESCRIPTOR.values] == [
        ("UNKNOWN", 0), ("VIEW", 1), ("ACTIVE", 2), ("COMMITTED", 3)]
    info = snapshots_pb2.Info.DESCRIPTOR
    assert {f.name: f.number for f in info.fields} == {
        "name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5, "labels": 6}
    service = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert [m.name for m in service.methods] == [
        "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage",
        "Cleanup"]
    assert service.methods_by_name["List"].server_streaming


def test_diff_and_content_wire_names_are_containerds() -> None:
    from lamina.frontends.containerd.api import content_pb2, descriptor_pb2, diff_pb2

    assert descriptor_pb2.Descriptor.DESCRIPTOR.full_name == "containerd.types.Descriptor"
    assert {f.name: f.number for f in descriptor_pb2.Descriptor.DESCRIPTOR.fields} == {
        "media_type": 1, "digest": 2, "size": 3, "annotations": 5}
    service = diff_pb2.DESCRIPTOR.services_by_name["Diff"]
    assert service.full_name == "containerd.services.diff.v1.Diff"
    assert [m.name for m in service.methods] == ["Apply", "Diff"]
    assert {f.name: f.number for f in diff_pb2.ApplyRequest.DESCRIPTOR.fields} == {
        "diff": 1, "mounts": 2, "payloads": 3, "sync_fs": 4}
    assert {f.name: f.number for f in diff_pb2.DiffRequest.DESCRIPTOR.fields} == {
        "left": 1, "right": 2, "media_type": 3, "ref": 4, "labels": 5,
        "source_date_epoch": 6}
    assert diff_pb2.DiffResponse.DESCRIPTOR.fields_by_name["diff"].number == 3
    content = content_pb2.DESCRIPTOR.services_by_name["Content"]
    assert content.full_name == "containerd.services.content.v1.Content"
    assert content.methods_by_name["Read"].server_streaming
    assert {f.name: f.number for f in content_pb2.ReadContentRequest.DESCRIPTOR.fields} == {
        "digest": 1, "offset": 2, "size": 3}
    assert {f.name: f.number for f in content_pb2.ReadContentResponse.DESCRIPTOR.fields} == {
        "offset": 1, "data": 2}
    assert {f.name: f.number for f in content_pb2.Info.DESCRIPTOR.fields} == {
        "digest": 1, "size": 2, "created_at": 3, "updated_at": 4, "labels": 5}

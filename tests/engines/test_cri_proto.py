"""The checked-in CRI code (``tests/engines/cri/``) is what scripts/gen-cri-proto.sh makes.

Regenerates it into a temporary directory with the pinned grpcio-tools and compares
byte for byte (as tests/snapshotter/test_proto.py does for containerd's APIs); with the
lab, also that the checked-in ``api.proto`` is the lab's with the gogo options stripped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import lab
from tests.conftest import lacking

REPO = Path(__file__).resolve().parents[2]
API = "tests/engines/cri"
LAB_PROTO = "usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto"


def _generate(out: Path, *args: str) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) is not installed")
    subprocess.run(["bash", str(REPO / "scripts/gen-cri-proto.sh"), *args, str(out)],
                   check=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})


def _same(made: Path) -> None:
    names = sorted(p.name for p in made.iterdir())
    kept = sorted(p.name for p in (REPO / API).iterdir() if "_pb2" in p.name)
    assert names == kept
    for name in names:
        assert (made / name).read_bytes() == (REPO / API / name).read_bytes(), name


def test_regenerating_gives_the_checked_in_files(tmp_path: Path) -> None:
    _generate(tmp_path)
    _same(tmp_path / API)


def test_the_proto_is_the_labs_without_gogo(tmp_path: Path) -> None:
    root = lab.lab_root()
    source = root / LAB_PROTO
    if not source.is_file():
        lacking(f"the lab has no {LAB_PROTO} (golang-github-kubernetes-cri-api-dev)")
    stripped = [line for line in source.read_text().splitlines(keepends=True)
                if "gogoproto" not in line]
    assert (REPO / API / "api.proto").read_text() == "".join(stripped)


def test_wire_names_are_the_kubelets() -> None:
    from tests.engines.cri import api_pb2

    assert api_pb2.DESCRIPTOR.package == "runtime.v1"
    assert sorted(api_pb2.DESCRIPTOR.services_by_name) == ["ImageService", "RuntimeService"]
    runtime = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
    assert runtime.full_name == "runtime.v1.RuntimeService"
    for call in ("RunPodSandbox", "CreateContainer", "StartContainer", "ExecSync",
                 "ContainerStats", "StopContainer", "RemoveContainer", "StopPodSandbox",
                 "RemovePodSandbox"):
        assert call in runtime.methods_by_name, call
    image = api_pb2.DESCRIPTOR.services_by_name["ImageService"]
    assert [m.name for m in image.methods] == [
        "ListImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo"]
    assert api_pb2.NamespaceMode.Value("NODE") == 2

#!/usr/bin/env bash
# Regenerates the Python code of containerd's snapshot, diff and content APIs from the .proto files in
# lamina/frontends/containerd/api/ with grpcio-tools (the dev extra pins its version):
# *_pb2.py (messages), *_pb2.pyi (their types, for mypy) and *_pb2_grpc.py (the
# services). The output is checked in (lamina/frontends/containerd/api/__init__.py
# says why); tests/snapshotter/test_proto.py checks that this script reproduces it.
#
#   scripts/gen-proto.sh [OUT_DIR]   (default: the api/ directory itself)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
API=lamina/frontends/containerd/api
OUT=${1:-$REPO}
PY=${PYTHON:-$REPO/.venv/bin/python}
mkdir -p "$OUT/$API"
cd "$REPO"
# Paths relative to the repository root: the generated modules then import each other
# as lamina.frontends.containerd.api.*, and google/protobuf/*.proto come from grpc_tools.
"$PY" -m grpc_tools.protoc -I . \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  "$API/mount.proto" "$API/descriptor.proto" "$API/snapshots.proto" "$API/diff.proto" \
  "$API/content.proto"
rm -f "$OUT/$API/mount_pb2_grpc.py" "$OUT/$API/descriptor_pb2_grpc.py"  # types, no service

#!/usr/bin/env bash
# Kubernetes' CRI (runtime.v1: RuntimeService, ImageService) for the tests that talk to
# containerd's CRI plugin (tests/engines/test_cri.py), as scripts/gen-proto.sh does it
# for containerd's APIs: grpcio-tools (the dev extra pins its version) makes *_pb2.py,
# *_pb2.pyi and *_pb2_grpc.py from tests/engines/cri/api.proto, all checked in;
# tests/engines/test_cri_proto.py checks that this script reproduces them.
#
#   scripts/gen-cri-proto.sh [OUT_DIR]          (default: the repository itself)
#   scripts/gen-cri-proto.sh --import [PROTO]   first copy the CRI's api.proto in
#
# --import takes the proto of Debian's golang-github-kubernetes-cri-api-dev (default: the
# lab's, $LAMINA_LAB/usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto)
# and strips what only Go's gogo/protobuf generator reads: the import of gogo.proto
# (which grpc_tools does not ship) and the file options `option (gogoproto.…) = …;`.
# Neither changes a message, a field number or a service: the wire is the same.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
API=tests/engines/cri
PY=${PYTHON:-$REPO/.venv/bin/python}
cd "$REPO"
if [ "${1:-}" = --import ]; then
  LAB=${LAMINA_LAB:-/var/tmp/lamina-lab}
  SRC=${2:-$LAB/usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto}
  sed -e '/^import "github.com\/gogo\/protobuf\/gogoproto\/gogo.proto";$/d' \
      -e '/^option (gogoproto\.[a-z_]*) *= *[a-z]*;$/d' "$SRC" >"$API/api.proto"
  if grep -n gogo "$API/api.proto"; then
    echo "gen-cri-proto: gogo options left in $API/api.proto" >&2
    exit 1
  fi
  shift $(($# < 2 ? $# : 2))
fi
OUT=${1:-$REPO}
mkdir -p "$OUT/$API"
# Paths relative to the repository root: api_pb2_grpc.py then imports
# tests.engines.cri.api_pb2.
"$PY" -m grpc_tools.protoc -I . \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" "$API/api.proto"

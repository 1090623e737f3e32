"""Kubernetes' CRI, ``runtime.v1`` (``RuntimeService``, ``ImageService``): the kubelet's
API, which containerd's CRI plugin serves on containerd's socket.

``api.proto`` is the ``k8s.io/cri-api/pkg/apis/runtime/v1/api.proto`` of the lab's
Debian package golang-github-kubernetes-cri-api-dev (0.32.3) with the gogo/protobuf
import and file options stripped (Go-only generator options; the messages, field
numbers and services are untouched). ``api_pb2.py``, ``api_pb2.pyi`` and
``api_pb2_grpc.py`` are grpcio-tools' output, checked in and not edited:
``scripts/gen-cri-proto.sh --import`` makes all four, ``scripts/gen-cri-proto.sh``
the Python from the checked-in proto, and ``tests/engines/test_cri_proto.py`` requires
that both reproduce what is checked in.
"""

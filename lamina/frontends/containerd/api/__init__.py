"""containerd's snapshot, diff and content APIs: the ``.proto`` files and the Python
grpcio-tools makes of them.

``mount.proto``, ``descriptor.proto``, ``snapshots.proto`` and ``diff.proto`` are
containerd's ``api/types/mount.proto``, ``api/types/descriptor.proto``,
``api/services/snapshots/v1/snapshots.proto`` and ``api/services/diff/v1/diff.proto`` as
published (package names, messages, field numbers and ``Kind`` values: what goes on the
wire), written for lamina; ``content.proto`` is the part of
``api/services/content/v1/content.proto`` lamina calls as a client (``Info``, ``Read``).

The generated modules (``*_pb2.py``, their ``.pyi`` types, ``*_pb2_grpc.py``)
are checked in, made by ``scripts/gen-proto.sh`` with the pinned grpcio-tools, and not
edited by hand.  Checked in rather than generated at install time because:

- running lamina needs only ``grpcio`` and ``protobuf`` (grpcio-tools, with its bundled
  ``protoc``, is a dev tool: about 10 MB that a server has no use for);
- installing needs no code generation step, so a plain ``pip install`` (editable or
  not, a wheel, a source tree) works the same, and nothing is written into the
  package at run time;
- the code is reproducible and reviewable: ``tests/snapshotter/test_proto.py``
  regenerates it and requires identical files, so the checked-in code always matches
  the ``.proto`` files and the pinned tool (a change to either shows up as a diff).

The generated code checks the protobuf runtime's version when imported (grpcio-tools
1.85.1 emits code for protobuf ≥ 7.35.1, < 8: ``pyproject.toml`` pins one in range).
"""

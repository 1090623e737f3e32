"""The labels a snapshot may carry: containerd's bound on each, and lamina's on them all.

containerd's metadata store (``pkg/labels.Validate``, called for every label of every
snapshot it keeps) refuses a label whose key and value together exceed 4096 bytes, and
bounds nothing else: a snapshot may carry any number of labels.  A proxy snapshotter is
handed whatever a client sends, so with no total a few clients' labels could make every
``List`` response larger than gRPC carries, failing ``List`` for everyone (issue 23,
D6).  lamina therefore also bounds the labels of one snapshot to :data:`MAX_TOTAL`
bytes (keys plus values), far above what containerd itself and its clients set (a
handful of ``containerd.io/…`` labels of a few dozen bytes each).  A breach of either
bound is ``InvalidArgument``, on ``Prepare``, ``View``, ``Commit`` and ``Update`` alike.
"""

from __future__ import annotations

from collections.abc import Mapping

from lamina import errors

MAX_LABEL = 4096
"""containerd's bound on one label: its key plus its value, in bytes (UTF-8)."""
MAX_TOTAL = 64 << 10
"""lamina's bound on the labels of one snapshot: all keys plus all values, in bytes."""


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` as a new dict, once within both bounds (each label, and the total)."""
    total = 0
    for k, v in labels.items():
        size = len(k.encode()) + len(v.encode())
        if not k or size > MAX_LABEL:
            raise errors.InvalidArgument(
                f"label {k[:64]!r}: key and value of {size} bytes (at most {MAX_LABEL})")
        total += size
        if total > MAX_TOTAL:
            # Said before counting the rest: the sum of 1 MB of labels is not needed.
            raise errors.InvalidArgument(
                f"labels of more than {MAX_TOTAL} bytes (keys and values) on one snapshot "
                f"({len(labels)} labels)")
    return dict(labels)

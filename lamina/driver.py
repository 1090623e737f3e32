"""The graph driver contract: what every lamina backend promises.

Vocabulary (Docker's, from moby's ``daemon/graphdriver``):

layer
    A filesystem tree identified by a :data:`LayerId`.  A layer is *read-only*
    (an image layer, made by :meth:`Driver.create` and filled by
    :meth:`Driver.apply_diff`) or *writable* (a container's, made by
    :meth:`Driver.create_rw`).
parent, chain
    Every layer but a base layer has one parent; a layer's *chain* is the list
    of its ancestors, nearest first.  A layer's *union view* is its own content
    laid over its chain's.
get / put
    :meth:`Driver.get` makes the union view available as a directory (a mount,
    for backends that mount) and counts; :meth:`Driver.put` gives one ``get``
    back and the last ``put`` releases it.  Counts are shared by every process
    using the same home.
diff, changes, apply_diff
    A layer's *diff* is a tar stream of what it changes relative to a parent
    (whiteouts for deletions); :meth:`Driver.changes` lists the same changes as
    paths; :meth:`Driver.apply_diff` is the reverse of ``diff``.

A worked life cycle::

    with lamina.open_driver("/var/lib/lamina") as drv:
        drv.apply_diff("base", None, open("rootfs.tar", "rb"))  # image layer 1
        drv.apply_diff("app", "base", open("app.tar.gz", "rb"))  # image layer 2
        drv.create_rw("ctr", "app")                             # a container
        root = drv.get("ctr")                                   # its root fs
        (root / "etc/motd").write_text("hi\\n")
        drv.changes("ctr")        # [Change("/etc", MODIFY), Change("/etc/motd", ADD)]
        with drv.diff("ctr") as tar:                             # commit
            drv.apply_diff("app2", "app", tar)
        drv.put("ctr")
        drv.remove("ctr")

Backends subclass :class:`Driver` and register a factory by name with
:func:`lamina.registry.register_backend`; :func:`lamina.registry.open_driver` picks one.
This module is the contract only: it imports nothing of lamina but its errors.
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NewType

from lamina import errors

LayerId = NewType("LayerId", str)
"""A layer's name: ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$``, never ending in ``-removing``."""

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
REMOVING_SUFFIX = "-removing"

IdMap = Sequence[tuple[int, int, int]]
"""``(container_id, host_id, size)`` ranges, as Docker's idtools maps."""


def check_id(value: object, *, what: str = "layer id") -> LayerId:
    """Return ``value`` as a :data:`LayerId`, or raise ``InvalidArgument``."""
    if (
        not isinstance(value, str)
        or not _ID_RE.fullmatch(value)
        or value.endswith(REMOVING_SUFFIX)
        or value in (".", "..")
    ):
        raise errors.InvalidArgument(f"invalid {what} {value!r}", layer=str(value))
    return LayerId(value)


class ChangeKind(enum.IntEnum):
    """The kind of a :class:`Change`, with Docker's values."""

    MODIFY = 0
    ADD = 1
    DELETE = 2

    @property
    def letter(self) -> str:
        """The letter ``docker diff`` prints for this kind."""
        return "CAD"[self]


@dataclass(frozen=True, order=True)
class Change:
    """One changed path of a layer, absolute inside the layer's union view."""

    path: str
    kind: ChangeKind


class DiffGetter(AbstractContextManager["DiffGetter"]):
    """Opens files of a layer's own content by path (Docker's ``FileGetCloser``)."""

    @abc.abstractmethod
    def get(self, path: str) -> BinaryIO:
        """Open the layer's file at ``path`` (relative to the layer root) for reading."""

    def close(self) -> None:
        """Release what the getter holds."""

    def __exit__(self, *exc: object) -> None:
        self.close()


class Driver(abc.ABC):
    """A store of layers in one home directory (Docker's ``graphdriver.Driver``)."""

    home: Path

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The backend's name (``String()``)."""

    @abc.abstractmethod
    def status(self) -> list[tuple[str, str]]:
        """Human-readable ``(key, value)`` pairs about the store."""

    @abc.abstractmethod
    def create(
        self, id: str, parent: str | None = None, *, storage_opts: Mapping[str, str] | None = None
    ) -> None:
        """Create a read-only layer ``id`` on ``parent``."""

    @abc.abstractmethod
    def create_rw(
        self,
        id: str,
        parent: str | None = None,
        *,
        mount_label: str = "",
        storage_opts: Mapping[str, str] | None = None,
    ) -> None:
        """Create a writable layer ``id`` on ``parent``."""

    @abc.abstractmethod
    def remove(self, id: str) -> None:
        """Remove layer ``id`` (crash-safe); ``Busy`` while other layers use it as parent."""

    @abc.abstractmethod
    def get(self, id: str, mount_label: str = "") -> Path:
        """Make the union view of ``id`` available and return its path (counted)."""

    @abc.abstractmethod
    def put(self, id: str) -> None:
        """Give one :meth:`get` back; the last one releases the view."""

    @abc.abstractmethod
    def exists(self, id: str) -> bool:
        """Whether layer ``id`` exists (complete)."""

    @abc.abstractmethod
    def metadata(self, id: str) -> dict[str, str]:
        """Backend details of layer ``id``; at least ``"dir"``."""

    @abc.abstractmethod
    def cleanup(self) -> None:
        """Release every view this driver made and sweep leftovers."""

    @abc.abstractmethod
    def diff(self, id: str, parent: str | None = None) -> BinaryIO:
        """An uncompressed tar stream of what ``id`` changes relative to ``parent``."""

    @abc.abstractmethod
    def changes(self, id: str, parent: str | None = None) -> list[Change]:
        """What ``id`` changes relative to ``parent``, sorted by path."""

    @abc.abstractmethod
    def apply_diff(self, id: str, parent: str | None, stream: BinaryIO) -> int:
        """Apply a layer tar into ``id`` (made on ``parent`` if missing); return its data size."""

    @abc.abstractmethod
    def diff_size(self, id: str, parent: str | None = None) -> int:
        """Bytes of what ``id`` changes relative to ``parent``."""

    @abc.abstractmethod
    def diff_getter(self, id: str) -> DiffGetter:
        """A getter of files of ``id``'s own content."""

    @abc.abstractmethod
    def layers(self) -> Iterator[LayerId]:
        """Every complete layer's id."""

    @abc.abstractmethod
    def parent(self, id: str) -> LayerId | None:
        """The parent of layer ``id``."""

    @abc.abstractmethod
    def mount_count(self, id: str) -> int:
        """How many :meth:`get` calls of ``id`` are not yet given back."""

    def size(self, id: str) -> int:
        """The bytes of ``id``'s own changes, as recorded when it was made where the backend
        keeps that (lamina's, for ``ls``: Docker's layer store keeps ApplyDiff's size the
        same way); else :meth:`diff_size`."""
        return self.diff_size(id)

    def resize(self, id: str, size: str) -> None:
        """Change writable layer ``id``'s size quota (lamina's, not Docker's: the seed's
        ExpandSandboxSize); never below what the layer uses."""
        raise errors.Unsupported(f"backend {self.name} has no size quotas", layer=id)

    def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        """Release what this driver holds (not the mounts other processes counted)."""


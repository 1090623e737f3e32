"""A layer's metadata, ``layer.json``: its one typed reader and its one writer.

Every field is checked when it is read, so a tampered or damaged file is one
``Corrupt`` naming the layer, never a ``TypeError`` somewhere later.  What the front
ends rely on is typed here and nowhere else: the layer's *format* (how its content is
kept), its *identity* (diff id and chain id, for the image store and containerd),
whether it is a *sealed* snapshot, and the counters kept at apply time.  A backend's
own fields (vfs ``touched_ns``) ride along in :attr:`LayerMeta.backend`.  Beside it in
the layer's directory, for the seed driver's tools, ``layerchain.json`` (the
parents' directories, nearest first) and ``layerID`` (the id redirect file).

Crash model.  A new layer's files are written into its staging directory without
an fsync: the ``syncfs`` before the rename that publishes the layer makes them
durable with its content.  A live layer's metadata is replaced with
:func:`lamina.host.fsutil.atomic_write` (temp, fsync, rename, fsync of the
directory): a kill or power cut leaves the old file or the new one, whole.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina import errors
from lamina.driver import LayerId
from lamina.host import fsutil
from lamina.host.usage import Totals

META = "layer.json"
CHAIN = "layerchain.json"
ID_FILE = "layerID"


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
"""The one pattern of a digest lamina keeps or is given (``sha256:`` and 64 hex digits):
diff ids, chain ids, blob digests."""


def is_digest(text: object) -> bool:
    """Whether ``text`` is a ``sha256:`` digest."""
    return isinstance(text, str) and DIGEST.fullmatch(text) is not None


class LayerFormat(enum.StrEnum):
    """How a layer's content is kept (``layer.json``'s ``format``)."""

    DIR = "dir"
    """A directory tree: what the isolated applier writes, and every writable layer."""
    EROFS = "erofs"
    """Overlay's EROFS over the layer's own tar: ``layer.tar`` byte for byte and the
    ``layer.erofs`` metadata image over it, mounted read-only as the layer's lower."""
    WINDOWS = "windowsfilter"
    """Windows container files in the seed driver's layout (``Files/``, ``Hives/``)."""


@dataclass(frozen=True)
class Identity:
    """A read-only layer's identity by content (OCI image-spec ``config.md``): the
    ``diff_id`` (sha256 of its uncompressed tar) and the ``chain_id`` (with its
    parents'); ``chain_id`` is None on a parent of unknown content."""

    diff_id: str | None = None
    chain_id: str | None = None


@dataclass
class Quota:
    """A writable layer's size cap: by project quota (``project``) or a loop image."""

    mechanism: str
    size: int
    project: int | None = None
    base: int = 0
    """Bytes the layer started with (vfs: its copy of the parent), the cap on top."""


@dataclass
class LayerMeta:
    """What ``layer.json`` says of a layer."""

    id: LayerId
    parent: LayerId | None
    rw: bool
    created: str = ""
    chain: list[LayerId] = field(default_factory=list)
    """The layer's ancestors, nearest first (recorded at creation)."""
    totals: Totals | None = None
    """What a read-only layer's own content takes (from its manifest)."""
    quota: Quota | None = None
    size: int | None = None
    """The regular-file bytes of a read-only layer's own changes as its apply counted
    them (what Docker records as a layer's size); None when not known."""
    format: LayerFormat = LayerFormat.DIR
    identity: Identity = field(default_factory=Identity)
    """What the layer is by content (unknown for a writable layer, or for content that
    is no single tar's)."""
    sealed: bool = False
    """A writable layer turned read-only in place (a containerd snapshot's Commit): its
    content was written through mounts, so it has no manifest to check against."""
    usage: Totals | None = None
    """The usage kept by layers sealed before sealing stopped counting it."""
    backend: dict[str, Any] = field(default_factory=dict)
    """The backend's own fields (vfs ``touched_ns``, …), and any this version does not
    know, kept as found."""

    @classmethod
    def from_json(cls, data: object, id: LayerId) -> LayerMeta:
        """The metadata in a decoded ``layer.json``; ``Corrupt`` if a field is off."""
        if not isinstance(data, dict):
            raise errors.Corrupt(f"bad {META}: not an object", layer=id)
        rest = dict(data)
        try:
            meta = cls(
                id=LayerId(_str(rest.pop("id", None), "id")),
                parent=_opt_id(rest.pop("parent", None), "parent"),
                rw=_bool(rest.pop("rw", False), "rw"),
                created=_str(rest.pop("created", ""), "created"),
                chain=[LayerId(_str(c, "chain")) for c in _list(rest.pop("chain", []), "chain")],
                totals=_totals(rest.pop("totals", None)),
                quota=_quota(rest.pop("quota", None)),
                size=_opt_int(rest.pop("size", None), "size"),
                format=_format(rest.pop("format", LayerFormat.DIR.value)),
                identity=Identity(_opt_digest(rest.pop("diff_id", None), "diff_id"),
                                  _opt_digest(rest.pop("chain_id", None), "chain_id")),
                sealed=_bool(rest.pop("sealed", False), "sealed"),
                usage=_totals(rest.pop("usage", None), "usage"),
                backend=rest,
            )
        except _Bad as e:
            raise errors.Corrupt(f"bad {META}: {e}", layer=id) from None
        return meta

    def to_json(self) -> dict[str, Any]:
        """The document written to ``layer.json``."""
        out: dict[str, Any] = {**self.backend, "id": self.id, "parent": self.parent,
                               "rw": self.rw, "created": self.created, "chain": self.chain}
        if self.format is not LayerFormat.DIR:
            out["format"] = self.format.value
        if self.identity.diff_id is not None:
            out["diff_id"] = self.identity.diff_id
        if self.identity.chain_id is not None:
            out["chain_id"] = self.identity.chain_id
        if self.sealed:
            out["sealed"] = True
        if self.usage is not None:
            out["usage"] = dataclasses.asdict(self.usage)
        if self.totals is not None:
            out["totals"] = dataclasses.asdict(self.totals)
        if self.size is not None:
            out["size"] = self.size
        if self.quota is not None:
            out["quota"] = {k: v for k, v in dataclasses.asdict(self.quota).items()
                            if v is not None}
        return out


def read(layer_dir: Path, id: LayerId) -> LayerMeta:
    """Layer ``id``'s metadata; ``NotFound`` when it has none, ``Corrupt`` when it is bad."""
    try:
        data = json.loads((layer_dir / META).read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise errors.NotFound("no such layer", layer=id) from None
    except (OSError, ValueError) as e:
        raise errors.Corrupt(f"unreadable {META}: {e}", layer=id) from e
    return LayerMeta.from_json(data, id)


def write(layer_dir: Path, meta: LayerMeta, *, staged: bool) -> None:
    """Write ``meta`` into ``layer_dir``: a staging directory (``staged``: no fsync, the
    syncfs before publishing covers it) or a live layer's (atomically, durably)."""
    data = json.dumps(meta.to_json(), sort_keys=True).encode()
    if staged:
        (layer_dir / META).write_bytes(data)
    else:
        fsutil.atomic_write(layer_dir / META, data)


def write_seed_files(staged: Path, id: LayerId, ancestors: list[Path]) -> None:
    """The seed driver's files: the chain as layer directories, and the id (no fsync, as
    :func:`write` with ``staged``)."""
    (staged / CHAIN).write_text(json.dumps([str(a) for a in ancestors]))
    (staged / ID_FILE).write_text(id)


class _Bad(Exception):
    pass


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{what} is {type(value).__name__}, not a string")
    return value


def _opt_id(value: object, what: str) -> LayerId | None:
    return None if value is None or value == "" else LayerId(_str(value, what))


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"{what} is {type(value).__name__}, not a boolean")
    return value


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _Bad(f"{what} is {value!r}, not a count")
    return value


def _opt_int(value: object, what: str) -> int | None:
    return None if value is None else _int(value, what)


def _list(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise _Bad(f"{what} is {type(value).__name__}, not a list")
    return value


def _dict(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Bad(f"{what} is {type(value).__name__}, not an object")
    return value


def _totals(value: object, what: str = "totals") -> Totals | None:
    if value is None:
        return None
    d = _dict(value, what)
    return Totals(_int(d.get("bytes"), f"{what}.bytes"), _int(d.get("disk"), f"{what}.disk"),
                  _int(d.get("inodes"), f"{what}.inodes"))


def _opt_digest(value: object, what: str) -> str | None:
    if value is None:
        return None
    if not is_digest(value):
        raise _Bad(f"{what} is {value!r}, not a sha256 digest")
    return str(value)


def _format(value: object) -> LayerFormat:
    try:
        return LayerFormat(_str(value, "format"))
    except ValueError:
        raise _Bad(f"format {value!r} is not one this version knows") from None


def _quota(value: object) -> Quota | None:
    if value is None:
        return None
    d = _dict(value, "quota")
    mechanism = _str(d.get("mechanism"), "quota.mechanism")
    project = d.get("project")
    return Quota(mechanism, _int(d.get("size"), "quota.size"),
                 None if project is None else _int(project, "quota.project"),
                 _int(d.get("base", 0), "quota.base"))

"""Driver options: ``key=value`` pairs checked against a backend's known keys, the
limits they put on one apply, the storage options of a layer, and Docker's size units.

Pure parsing, no I/O: backends and front ends read their options through here, so a
bad option is the same ``InvalidArgument`` whichever way it came in (``--opt``,
``dockerd --storage-opt``, ``options=`` in Python).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypedDict

from lamina import errors

STORAGE_OPTS = frozenset({"size"})
"""The per-layer options :meth:`lamina.Driver.create_rw` takes (Docker's ``--storage-opt``)."""

APPLY_OPTIONS = {
    "apply.max_entries": "refuse a layer tar of more entries than this (default: no limit)",
    "apply.max_size": "refuse a layer tar of more file data than this (Docker's units: 50M, "
                      "1.5GB; default: no limit)",
    "apply.squash_owners": "true: in a user namespace, files of owners it does not map are "
                           "its root's instead of the layer being refused (podman's "
                           "ignore_chown_errors; default false)",
}
"""Driver options of the backends that apply with lamina's tar engine: limits on what one
``apply_diff`` may write (a backend lists them in its ``known_options``)."""

MAX_SIZE = (1 << 63) - 1
"""The largest size there is: a file's offset (``off_t``) holds no more."""

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtpb]?)(i?b)?\s*", re.IGNORECASE)


def parse_size(value: str, *, layer: str | None = None) -> int:
    """Bytes in a size with Docker's units: ``50M``, ``1.5GB``, ``10g``, ``1024`` (binary)."""
    match = _SIZE_RE.fullmatch(str(value))
    if match is None:
        raise errors.InvalidArgument(f"invalid size {value!r}", layer=layer, path="size")
    number, unit, suffix = match.groups()
    if unit.lower() == "b" and suffix:
        raise errors.InvalidArgument(f"invalid size {value!r}", layer=layer, path="size")
    scaled = float(number) * _UNITS[unit.lower()]
    if not scaled < MAX_SIZE:  # inf from a number of 400 digits too
        shown = value if len(value) <= 40 else value[:37] + "..."
        raise errors.InvalidArgument(f"size {shown!r} is too large (at most 8 EiB)",
                                     layer=layer, path="size")
    size = int(scaled)
    if size <= 0:
        raise errors.InvalidArgument(f"size must be positive, not {value!r}", layer=layer,
                                     path="size")
    return size


def parse_options(
    options: Sequence[str] | Mapping[str, str], known: Mapping[str, str], backend: str
) -> dict[str, str]:
    """``key=value`` strings or a mapping, checked against ``known`` (key → help)."""
    pairs: list[tuple[str, str]] = []
    if isinstance(options, Mapping):
        pairs = [(str(k), str(v)) for k, v in options.items()]
    else:
        for item in options:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise errors.InvalidArgument(f"driver option {item!r} is not key=value")
            pairs.append((key.strip(), value.strip()))
    out = {}
    for key, value in pairs:
        if key not in known:
            names = ", ".join(known) or "none"
            raise errors.InvalidArgument(
                f"unknown option {key!r} for backend {backend} (known: {names})"
            )
        out[key] = value
    return out


class ApplyLimits(TypedDict):
    """What one apply may write (the tar engine's ``max_entries`` and ``max_size``)."""

    max_entries: int | None
    max_size: int | None


def apply_limits(options: Mapping[str, str]) -> ApplyLimits:
    """The :class:`ApplyLimits` the ``apply.*`` options set."""
    limits = ApplyLimits(max_entries=None, max_size=None)
    entries = options.get("apply.max_entries")
    if entries is not None:
        if not entries.isdigit() or int(entries) <= 0:
            raise errors.InvalidArgument(f"apply.max_entries must be a positive number, not "
                                         f"{entries!r}", path="apply.max_entries")
        limits["max_entries"] = int(entries)
    size = options.get("apply.max_size")
    if size is not None:
        try:
            limits["max_size"] = parse_size(size)
        except errors.InvalidArgument:
            raise errors.InvalidArgument(f"apply.max_size must be a size (50M, 1.5GB), not "
                                         f"{size!r}", path="apply.max_size") from None
    return limits


def squash_owners(options: Mapping[str, str]) -> bool:
    """Whether ``apply.squash_owners`` is set (``true``/``false``)."""
    value = options.get("apply.squash_owners", "false").lower()
    if value not in ("true", "false"):
        raise errors.InvalidArgument(f"apply.squash_owners must be true or false, not "
                                     f"{value!r}", path="apply.squash_owners")
    return value == "true"


def storage_size(
    opts: Mapping[str, str] | None, *, layer: str, rw: bool, default: str | None
) -> int | None:
    """The quota in bytes that a layer's storage options ask for (``size``, else
    ``default`` for a writable layer); None for no quota."""
    for key in opts or {}:
        if key not in STORAGE_OPTS:
            raise errors.InvalidArgument(f"unknown storage option {key!r}", layer=layer)
    size = (opts or {}).get("size")
    if size is not None and not rw:
        raise errors.InvalidArgument(
            "a size quota applies to writable layers only", layer=layer, path="size"
        )
    if size is None and rw:
        size = default
    return None if size is None else parse_size(size, layer=layer)

"""The backends by name, and the choice of one for a home (moby's ``graphdriver.Register``
and ``graphdriver.New``).

A backend module registers its factory when it is imported (with
:func:`lamina.backends.contract.register_backend`, beside the interface it
implements, as moby's drivers call ``graphdriver.Register``); :func:`open_driver`
imports the built-in ones (:data:`BUILTIN_BACKENDS`) the first time it runs, the one
place where this tier reaches into the one below it by name, as moby's daemon does with
its drivers' ``register`` package.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lamina import errors
from lamina.backends.contract import BackendFactory, register_backend
from lamina.backends.contract import registered as _backends
from lamina.host import userns
from lamina.store.layers import namespace_problem, recorded_backend

if TYPE_CHECKING:
    from lamina.driver import Driver, IdMap

__all__ = ["BackendFactory", "backends", "open_driver", "register_backend"]

_AUTO_ORDER = ("overlay", "vfs")  # auto never picks a backend of Windows layers


def backends(layer_format: str | None = "linux") -> list[str]:
    """The registered backends' names: those storing ``layer_format`` layers (Linux
    layers by default; ``"windows"`` for Windows container layers; None for all)."""
    _load_builtin_backends()
    return sorted(
        name for name, factory in _backends.items()
        if layer_format is None or factory.layer_format == layer_format
    )


BUILTIN_BACKENDS = ("lamina.backends.overlay", "lamina.backends.vfs",
                    "lamina.backends.windowsfilter")
"""The modules of the built-in backends, each registering one when imported."""


def _load_builtin_backends() -> None:
    # Importing a backend module registers it.
    for module in BUILTIN_BACKENDS:
        importlib.import_module(module)


def open_driver(
    home: str | Path,
    backend: str = "auto",
    options: Sequence[str] | Mapping[str, str] = (),
    uid_map: IdMap | None = None,
    gid_map: IdMap | None = None,
) -> Driver:
    """Open (creating if needed) the store at ``home`` with ``backend``; recovers it.
    ``Unsupported`` before anything is read or written where this process can keep no
    layers (an ordinary user outside a user namespace: :mod:`lamina.host.userns`)."""
    _load_builtin_backends()
    home = Path(home)
    # Before any backend probes the home: who may keep layers, and where it was made.
    problem = userns.why_not_privileged() or namespace_problem(home)
    if problem is not None:
        raise errors.Unsupported(problem, path=str(home))
    recorded = recorded_backend(home)
    if recorded is None:
        # A home without its record but with layers: never guess over them (a wrong
        # backend would take them for damage); their layout says whose they are.
        found = _backend_of_layers(home)
        if found is not None and backend not in ("auto", found):
            raise errors.InvalidArgument(
                f"home has no lamina.json but holds {found} layers; not opening them with "
                f"backend {backend!r}", path=str(home))
        recorded = found  # written again when the store opens
        if found is not None:
            backend = found
    if backend == "auto":
        backend = recorded or _pick_auto(home, options, uid_map, gid_map)
    if backend not in _backends:
        raise errors.InvalidArgument(
            f"unknown backend {backend!r} (known: {', '.join(sorted(_backends))})", path=str(home)
        )
    if recorded is not None and recorded != backend:
        raise errors.InvalidArgument(
            f"home was made with backend {recorded!r}, not {backend!r}", path=str(home)
        )
    return _backends[backend](home, options, uid_map, gid_map)


def _backend_of_layers(home: Path) -> str | None:
    """The backend whose layout the layers in ``home`` have (None: no layers);
    ``Corrupt`` when they have none's, or several backends'."""
    try:
        entries = sorted(os.listdir(home / "layers"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    markers = {name: f.layout_marker for name, f in _backends.items()}
    seen: set[str] = set()
    for entry in entries[:16]:  # a few are enough: every layer of a home has one layout
        layer = home / "layers" / entry
        if not layer.is_dir():
            continue
        seen.update(name for name, marker in markers.items()
                    if marker and os.path.lexists(layer / marker))
    if not entries:
        return None
    if len(seen) != 1:
        raise errors.Corrupt("home has layers but no lamina.json, and their layout does not "
                             "tell their backend", path=str(home))
    return seen.pop()


def _pick_auto(
    home: Path,
    options: Sequence[str] | Mapping[str, str],
    uid_map: IdMap | None,
    gid_map: IdMap | None,
) -> str:
    for name in _AUTO_ORDER:
        factory = _backends.get(name)
        if factory is not None and factory.supported(home) is None:
            return name
    raise errors.Unsupported("no backend can work here", path=str(home))

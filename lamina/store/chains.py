"""The index from chain id to layer: how every front end finds "the layer with this
chain id" (the image store, the snapshotter's commits and its remote-snapshotter path).

A layer's chain id lives in its metadata (:class:`lamina.store.meta.Identity`); this
index only says where to look, so a lookup reads one or two layers' metadata, not
every layer's::

    HOME/chains/HEX/LAYER    an empty file: layer LAYER has chain id sha256:HEX

Crash model.  An entry is made before the layer (or the seal) that it names is
committed, and the syncfs that makes the layer durable makes the entry durable too;
it is removed after the layer is retired.  So the index always names every layer of
a chain id, and may name some that are gone or changed (a build that died, a removal
cut short): a lookup believes the layer's metadata, never the index alone, and
``check --repair`` rebuilds the index from the metadata.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from lamina import errors
from lamina.driver import LayerId, check_id
from lamina.store.meta import is_digest

DIR = "chains"


class ChainIndex:
    """``HOME/chains/``: chain id → the layers that may have it."""

    def __init__(self, home: Path) -> None:
        self.dir = home / DIR
        self.dir.mkdir(mode=0o700, exist_ok=True)

    def _bucket(self, chain: str) -> Path:
        if not is_digest(chain):
            raise errors.InvalidArgument(f"chain id {chain!r} is not a sha256 digest")
        return self.dir / chain.removeprefix("sha256:")

    def add(self, chain: str, id: LayerId) -> None:
        """Name layer ``id`` under ``chain`` (no fsync: see the crash model)."""
        bucket = self._bucket(chain)
        for _ in range(8):  # a removal may drop the (empty) bucket between the two steps
            with contextlib.suppress(FileExistsError):
                bucket.mkdir(mode=0o700)
            try:
                os.close(os.open(bucket / id, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
                return
            except FileNotFoundError:
                continue
        raise errors.Busy("cannot index the layer's chain id (its entry keeps vanishing)",
                          layer=id, path=str(bucket))

    def discard(self, chain: str, id: LayerId) -> None:
        """Forget that layer ``id`` has ``chain`` (it is gone, or has another now)."""
        bucket = self._bucket(chain)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bucket / id)
        with contextlib.suppress(OSError):
            bucket.rmdir()  # only when it is empty (ENOTEMPTY otherwise)

    def named(self, chain: str) -> list[LayerId]:
        """The layers the index names under ``chain`` (to be checked by the caller)."""
        try:
            entries = os.listdir(self._bucket(chain))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(LayerId(e) for e in entries if _valid_id(e))

    def entries(self) -> Iterator[tuple[str, LayerId]]:
        """Every ``(chain id, layer)`` entry of the index."""
        for hexpart in sorted(os.listdir(self.dir)):
            chain = "sha256:" + hexpart
            if not is_digest(chain):
                continue
            for lid in self.named(chain):
                yield chain, lid

    def clear(self) -> None:
        """Drop every entry (before a rebuild)."""
        for chain, lid in list(self.entries()):
            self.discard(chain, lid)


def _valid_id(name: str) -> bool:
    try:
        check_id(name)
    except errors.InvalidArgument:
        return False
    return True

"""One step of the image-and-snapshots sequence of ``test_holds_kills``, in a process of
its own (so that a crash point can kill it): ``python -m tests.crash.holds_child HOME
STEP [ARCHIVE]``.

- ``adopt``: containerd's snapshots take the image's layers (the remote-snapshotter
  protocol: each Prepare answers AlreadyExists);
- ``rm``: ``image rm test/app:1``;
- ``load``: ``image load ARCHIVE``;
- ``unsnap``: containerd removes its snapshots of them, top first;
- ``recover``: a snapshotter opens the home (its recovery runs) and closes it.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import lamina
from lamina import errors
from lamina.frontends.containerd.snapshotter import REF_LABEL, Snapshotter
from lamina.image import load
from lamina.image.store import ImageStore, chain_ids

NAME = "test/app:1"


def main(home: Path, step: str, archive: str = "") -> None:
    with lamina.open_driver(home) as drv:
        store = ImageStore(drv)
        if step == "rm":
            try:
                store.remove(NAME)
            except errors.NotFound:  # untagged before a kill: its caller prunes
                store.collect()
        elif step == "load":
            with open(archive, "rb") as f:
                load.load(store, stream=f)
        else:
            chains = chain_ids(Path(home, "chains.txt").read_text().split())
            sn = Snapshotter(drv)  # type: ignore[arg-type]
            try:
                if step == "recover":
                    pass
                elif step == "adopt":
                    parent = ""
                    for i, chain in enumerate(chains):
                        with contextlib.suppress(errors.AlreadyExists):
                            sn.prepare(f"default/{i}/extract {chain}", parent,
                                       {REF_LABEL: chain})
                        parent = chain
                else:
                    for chain in reversed(chains):
                        with contextlib.suppress(errors.NotFound):  # removed before a kill
                            sn.remove(chain)
            finally:
                sn.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])

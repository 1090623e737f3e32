"""Size caps of writable layers, as every backend over a store keeps them.

Two mechanisms (:mod:`lamina.host.quota` has the system calls): a project quota
on the layer's writable directories where the home's filesystem has them (xfs
``pquota``, ext4 ``prjquota``), else a loop-mounted ext4 image inside the layer's
directory that holds its writable content.

Crash model: a cap is set up inside the layer's staging directory (its project id
or its image), so a layer killed while being made takes its cap with it when the
staging dir is swept.  A resize changes the limit (or grows the image) first and
then rewrites ``layer.json`` atomically: a kill between leaves a larger cap than
recorded, which the next resize corrects.  Loop images do not survive a reboot
mounted; opening the store mounts them again.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lamina import errors
from lamina.driver import LayerId
from lamina.host import fsutil, loop, mount, quota, userns
from lamina.store.layers import Store
from lamina.store.meta import Quota

log = logging.getLogger("lamina")


class LayerQuotas:
    """The caps of one store's writable layers (see the module docstring)."""

    def __init__(self, home: Path, store: Store, unsupported: str | None = None) -> None:
        self.home = home
        self.store = store
        self.mechanism: str | None
        if unsupported is not None:
            self.mechanism, self.reason = None, unsupported
        else:
            self.mechanism, self.reason = self._support()

    def _support(self) -> tuple[str | None, str]:
        # The mechanism this home can use, and what status() says of it.
        if os.geteuid() != 0 or userns.IN_USER_NAMESPACE:
            return None, "they need root of the initial user namespace"
        reason = quota.project_quota_reason(self.home)
        if reason is None:
            return quota.PROJECT, f"project quotas ({fsutil.fs_type(self.home)})"
        if shutil.which("mkfs.ext4") and shutil.which("mount"):
            return quota.LOOP, f"loop-mounted ext4 images ({reason})"
        return None, f"{reason}; and no mkfs.ext4 for loop images"

    def status(self) -> str:
        """What ``status()`` says of quotas."""
        return self.reason if self.mechanism else f"none: {self.reason}"

    def require(self, id: LayerId) -> None:
        """``Unsupported`` unless layers can be capped here."""
        if self.mechanism is None:
            raise errors.Unsupported(f"size quotas: {self.reason}", layer=id, path="size")

    def start(self, staged: Path, size: int | None, base: int = 0) -> tuple[Path, Quota | None]:
        """Prepare a new writable layer's capped space inside ``staged``.

        Returns the directory that will hold the layer's writable content, and the cap
        to record.  ``base``: bytes the layer starts with (vfs: the parent's copy),
        which the quota comes on top of.
        """
        if size is None:
            return staged, None
        if self.mechanism == quota.PROJECT:
            return staged, Quota(quota.PROJECT, size, project=quota.allocate_project(self.home))
        quota.make_image(staged / quota.IMAGE, base + size, staged / quota.IMAGE_MOUNT)
        return staged / quota.IMAGE_MOUNT, Quota(quota.LOOP, size, base=base)

    def capped_space(self, id: LayerId) -> Path | None:
        """Where a loop-capped layer's writable content is (mounted on demand), else None."""
        layer_dir = self.store.layer_dir(id)
        if not (layer_dir / quota.IMAGE).is_file():
            return None
        point = layer_dir / quota.IMAGE_MOUNT
        if not os.path.ismount(point):
            loop.mount(layer_dir / quota.IMAGE, point)
        return point

    def remount_all(self) -> None:
        """Mount every layer's loop image again (after a reboot or a cleanup)."""
        for lid in self.store.ids():
            try:
                self.capped_space(lid)
            except (OSError, errors.LaminaError) as e:
                log.warning("lamina: cannot mount the quota image of %s: %s", lid, e)

    def release_idle(self) -> None:
        """Unmount the loop images of layers nobody has mounted (``cleanup()``)."""
        for lid in self.store.ids():
            point = self.store.layer_dir(lid) / quota.IMAGE_MOUNT
            if self.store.count(lid) == 0 and os.path.ismount(point):
                try:
                    mount.unmount(str(point), lazy=False)
                except OSError as e:
                    log.warning("lamina: cleanup cannot unmount %s: %s", point, e)

    def resize(self, id: LayerId, new: int, writable_dir: Callable[[], Path]) -> None:
        """Grow (or shrink, not below what is in use) layer ``id``'s cap to ``new`` bytes;
        the caller holds its layer lock.  ``writable_dir``: where its content is written."""
        meta = self.store.meta(id)
        info = meta.quota
        if info is None:
            raise errors.InvalidArgument("layer has no size quota", layer=id, path="size")
        layer_dir = self.store.layer_dir(id)
        if info.mechanism == quota.PROJECT and info.project is not None:
            where = writable_dir()
            used, _ = quota.usage(where, info.project)
            limit = info.base + new
            if used > limit:
                raise errors.InvalidArgument(
                    f"{used} bytes are in use, more than {new}", layer=id, path="size")
            quota.set_limit(where, info.project, limit)
        else:
            if new < info.size:
                raise errors.InvalidArgument(
                    "a loop-image quota can grow, not shrink", layer=id, path="size")
            quota.grow_image(layer_dir / quota.IMAGE, layer_dir / quota.IMAGE_MOUNT,
                             info.base + new, in_use=self.store.count(id) > 0)
        info.size = new
        self.store.rewrite_meta(meta)

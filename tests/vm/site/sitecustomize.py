"""Imported by every Python in the VM when the runner forces overlay's legacy mount path
(``PYTHONPATH`` names this directory only then, with ``LAMINA_VM_LEGACY_MOUNT=1``): lamina
mounts through mount(2) with a ``lowerdir=`` string even where the kernel has
``lowerdir+``, in the test process and in every process it starts."""

import os

if os.environ.get("LAMINA_VM_LEGACY_MOUNT") == "1":
    from lamina.host import mount

    mount.lowerdir_plus_available = lambda: False  # type: ignore[assignment]

"""The backends, side by side; importing this package registers them all."""

from lamina.backends import overlay, vfs, windowsfilter

__all__ = ["overlay", "vfs", "windowsfilter"]

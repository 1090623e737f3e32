"""The backends, side by side; importing this package registers them all."""

from lamina.backends import vfs

__all__ = ["vfs"]

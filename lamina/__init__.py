"""lamina: a container-layer storage driver for Linux (Docker's graph driver contract)."""

from lamina import errors
from lamina.driver import Change, ChangeKind, Driver
from lamina.registry import open_driver, register_backend

__all__ = ["Change", "ChangeKind", "Driver", "errors", "open_driver", "register_backend"]
__version__ = "0.1.0"

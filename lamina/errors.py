"""The errors lamina lets escape, and only these (contract §1).

Every error a caller can cause with bad input is a :class:`LaminaError`; each
subclass has a stable CLI exit code and a message naming the layer and the path
or option involved.  Bugs are not user errors and stay ordinary exceptions.
"""

from __future__ import annotations


class LaminaError(Exception):
    """A lamina operation failed because of its input or the store's state."""

    exit_code = 1

    def __init__(self, message: str, *, layer: str | None = None, path: str | None = None) -> None:
        parts = []
        if layer is not None:
            parts.append(f"layer {layer}")
        if path is not None:
            parts.append(f"path {path}")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.layer = layer
        self.path = path


class NotFound(LaminaError):
    """The layer (or a parent it names) does not exist."""


class AlreadyExists(LaminaError):
    """A layer with that id exists already."""


class InvalidArgument(LaminaError):
    """An id, option or argument is not acceptable."""


class Unsupported(LaminaError):
    """The backend or feature cannot work on this machine; the message says why."""


class Busy(LaminaError):
    """The layer is in use (it has children, or is locked by another operation)."""


class UnsafeArchive(LaminaError):
    """A layer tar tried to reach outside the layer, or is malformed."""


class QuotaExceeded(LaminaError):
    """A write went past the layer's size quota."""


class Corrupt(LaminaError):
    """The store's on-disk state is damaged."""


class Unauthorized(LaminaError):
    """A registry refused the credentials given (or wants some and none were given)."""


__all__ = [
    "AlreadyExists",
    "Busy",
    "Corrupt",
    "InvalidArgument",
    "LaminaError",
    "NotFound",
    "QuotaExceeded",
    "Unsupported",
    "Unauthorized",
    "UnsafeArchive",
]

"""The backends, side by side, one module each (``overlay``, ``vfs``, ``windowsfilter``);
importing one registers that one (:data:`lamina.registry.BUILTIN_BACKENDS` names them
all)."""

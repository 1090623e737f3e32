"""The machine: the file system primitives (``fsutil``), overlayfs mounts (``mount``), size
quotas (``quota``), uid/gid maps (``idmap``) and the one size walk (``usage``)."""

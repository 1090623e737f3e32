"""The machine: the file system primitives (``fsutil``), overlayfs mounts (``mount``), size
quotas (``quota``), uid/gid maps (``idmap``), the one size walk (``usage``) and a process's
jail: namespaces, a root of its own, capabilities (``jail``)."""

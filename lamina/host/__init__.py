"""The machine: the file system primitives (``fsutil``), overlayfs mounts (``mount``), size
quotas (``quota``), image files through loop devices (``loop``), uid/gid maps (``idmap``),
idmapped mounts (``idmapped``), the user namespace this process runs in (``userns``), the
one size walk (``usage``), a server's stop on SIGTERM (``signals``), a process's jail:
namespaces, a root of its own, capabilities (``jail``), and the C library they call
(``libc``)."""

"""A home on disk: its layers (``layers``), their metadata (``meta``) and manifests
(``manifest``), ``check`` and ``df`` (``usage``), and containerd's snapshots over them.
Each module states its crash model."""

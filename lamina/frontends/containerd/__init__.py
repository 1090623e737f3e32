"""``lamina snapshotter``: lamina as a containerd snapshotter (a proxy plugin over gRPC).

:mod:`.snapshotter` maps containerd's snapshot calls onto the layer store,
:mod:`.filters` parses containerd's filter syntax, :mod:`.server` serves the
``containerd.services.snapshots.v1.Snapshots`` API on a unix socket, and :mod:`.api`
holds that API's messages and service, generated from the ``.proto`` files there.
"""

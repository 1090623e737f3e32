"""The front ends, thin layers over the library: the ``lamina`` command (``cli``), Docker's
graph driver plugin (``docker``) and containerd's snapshotter (``containerd``)."""

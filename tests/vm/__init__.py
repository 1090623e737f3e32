"""lamina's tests on the kernels users run: Debian bookworm's 6.1 and bookworm-backports'
6.12, booted under qemu (TCG) with the host's root shared read-only over 9p.

:mod:`tests.vm.runner` fetches the kernels (``apt-get download``, never installed on the
host), builds a busybox initramfs, boots each kernel and runs suites of lamina's tests
inside it (project quotas on xfs and ext4, the overlay backend through the legacy mount
path where the kernel has no ``lowerdir+``), with pytest's summary back over the serial
console.  ``tests/vm/test_kernels.py`` runs it from the normal test suite;
``scripts/vm-test.sh`` runs it by hand.
"""

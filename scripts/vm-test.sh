#!/usr/bin/env bash
# lamina's tests on Debian's 6.1 and 6.12 kernels under qemu (see tests/vm/runner.py).
#
#   scripts/vm-test.sh [--kernel 6.1|6.12]… [--suite NAME]… [--legacy-mount] [-v]
#
# As root, after scripts/bootstrap.sh (qemu-system-x86, busybox-static, cpio,
# libcap2-bin); the kernels are fetched with apt-get download into
# $LAMINA_VM_CACHE (default /var/tmp/lamina-vm), never installed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m tests.vm.runner "$@"

#!/usr/bin/env bash
# Makes this checkout ready to run and test: the Debian packages lamina and its tests
# use, and a .venv with lamina installed in it (editable, with the dev extra).
#
#   scripts/bootstrap.sh          (run from anywhere; as root it also installs packages)
#
# Idempotent and quick when nothing changed: packages are installed only when one is
# missing, and pip runs only when pyproject.toml (or the interpreter) changed since the
# last successful install, which .venv/.lamina-bootstrap records.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'bootstrap: %s\n' "$*" >&2; }

# The Debian packages: filesystems for the backends' tests (ext4, xfs), xattr tools,
# the codecs and GNU tar for compat tests, Docker, skopeo and debootstrap for the
# corpus and the Docker tests, containerd, runc, Go and containerd's Go source
# for the snapshotter's tests (containerd's own suite is built from that source),
# umoci for the image tests, docker-registry (distribution) for the registry's, and
# uidmap (newuidmap) and rootlesskit for the rootless tests' user namespaces.
DEB_PACKAGES=(e2fsprogs xfsprogs attr zstd pigz tar docker.io skopeo debootstrap
              containerd runc golang-go golang-github-containerd-containerd-dev
              qemu-system-x86 busybox-static cpio libcap2-bin umoci docker-registry
              uidmap rootlesskit)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

# Picks the newest python3 on PATH that is at least 3.11 (pyenv's, or Debian's).
find_python() {
  local py
  for py in "${PYTHON:-}" python3 python3.13 python3.12 python3.11 /usr/bin/python3; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$py"
      return 0
    fi
  done
  return 1
}

install_packages() {
  local missing=() pkg
  for pkg in "${DEB_PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
  done
  # A venv needs ensurepip; Debian's python3 has it only with python3-venv.
  local py
  py=$(find_python || true)
  if [ -z "$py" ]; then
    missing+=(python3 python3-venv)
  elif ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
  fi
  [ ${#missing[@]} -gt 0 ] || return 0
  if [ "$(id -u)" != 0 ]; then
    say "missing Debian packages (run as root to install them): ${missing[*]}"
    return 0
  fi
  say "apt-get install ${missing[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 \
    "${missing[@]}" >/dev/null
}

make_venv() {
  local py stamp want
  py=$(find_python) || { say "no python3 >= 3.11 found"; exit 1; }
  stamp=.venv/.lamina-bootstrap
  want="$(sha256sum pyproject.toml | cut -d' ' -f1) $("$py" -c 'import sys; print(sys.version.split()[0])')"
  if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  # A venv made by another interpreter (an upgrade, another machine) is made anew.
  if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import sys; print(sys.version)' 2>/dev/null \
      | cmp -s - <("$py" -c 'import sys; print(sys.version)'); then
    say "removing .venv made by another python"
    rm -rf .venv
  fi
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $py"
    "$py" -m venv .venv
  fi
  say "pip install -e '.[dev]'"
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  printf '%s\n' "$want" >"$stamp"
}

install_packages
make_venv

#!/usr/bin/env bash
# Builds containerd 2.x's own snapshotter conformance suite
# (github.com/containerd/containerd/v2/core/snapshots/testsuite, from Debian sid's
# golang-github-containerd-containerd-dev in the engines' lab) around
# tests/containerd/suite2/, the driver that runs it against `lamina snapshotter`.
#
#   build-containerd2-suite.sh [OUT_DIR]   (default: $LAMINA_SUITE2_BUILD, else build/containerd2-suite)
#
# Prints the path of the test binary (OUT_DIR/containerd2-suite.test) on standard output;
# OUT_DIR/VERSION says which containerd it was built from. The build runs inside the lab
# ($LAMINA_LAB, else /var/tmp/lamina-lab: scripts/build-lab.sh), in mount and PID
# namespaces of its own with only the sources and OUT_DIR bound in, offline: GOPATH mode
# (GO111MODULE=off) over the lab's /usr/share/gocode, where Debian lays each module out at
# its import path (containerd's /v2 module in github.com/containerd/containerd/v2), so no
# go.mod, no module proxy, no toolchain download. The binary is static (CGO_ENABLED=0): it
# runs on the host. Idempotent: when the sources, this script and the lab are those of the
# last build, it only prints the path.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=$REPO/scripts/$(basename "${BASH_SOURCE[0]}")
SRC=$REPO/tests/containerd/suite2
PKG=lamina.test/containerd2-suite
GOCODE=/usr/share/gocode
TESTSUITE=$GOCODE/src/github.com/containerd/containerd/v2/core/snapshots/testsuite
NAME=containerd2-suite.test

if [ "${1:-}" = --in-lab ]; then
  # Inside the lab (see below): build into $2 from $SRC.
  OUT=$2
  export GOROOT=$(go env GOROOT 2>/dev/null || true)
  export GOPATH="$OUT/gopath:$GOCODE" GO111MODULE=off GOFLAGS= GOENV=off GOPROXY=off \
    GOTOOLCHAIN=local GOTELEMETRY=off GOCACHE="$OUT/gocache" GOTMPDIR= CGO_ENABLED=0 HOME="$OUT"
  go version >&2
  rm -rf "$OUT/gopath"
  mkdir -p "$OUT/gopath/src/$PKG"
  cp -- "$SRC"/*.go "$OUT/gopath/src/$PKG/"
  cd "$OUT/gopath/src/$PKG"
  go vet .
  go test -c -trimpath -o "$OUT/$NAME.new" .
  dpkg-query -W -f 'containerd ${Version} (${Package})\n' golang-github-containerd-containerd-dev \
    >"$OUT/VERSION.new"
  go version >>"$OUT/VERSION.new"
  exit 0
fi

LAB=${LAMINA_LAB:-/var/tmp/lamina-lab}
OUT=${1:-${LAMINA_SUITE2_BUILD:-$REPO/build/containerd2-suite}}
[ "$(id -u)" = 0 ] || { echo "build-containerd2-suite.sh: entering the lab needs root" >&2; exit 2; }
[ -f "$LAB/.lamina-lab-stamp" ] && [ -f "$LAB/VERSIONS" ] || {
  echo "build-containerd2-suite.sh: no lab at $LAB (make lab: scripts/build-lab.sh)" >&2
  exit 2
}
[ -d "$LAB$TESTSUITE" ] || {
  echo "build-containerd2-suite.sh: no $TESTSUITE in the lab" \
       "(Debian's golang-github-containerd-containerd-dev 2.x)" >&2
  exit 2
}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BIN=$OUT/$NAME

exec 9>"$OUT/.lock"
flock 9
stamp=$(
  {
    cd "$SRC" && sha256sum -- *.go
    sha256sum -- "$SELF"
    cat -- "$LAB/.lamina-lab-stamp" "$LAB/VERSIONS"
  } | sha256sum | cut -d' ' -f1
)
if [ -x "$BIN" ] && [ -f "$OUT/VERSION" ] && [ "$(cat "$OUT/stamp" 2>/dev/null || true)" = "$stamp" ]; then
  echo "$BIN"
  exit 0
fi
echo "building containerd 2's snapshotter suite in the lab into $BIN…" >&2
# The lab, entered as tests/lab.py enters it: a private mount namespace (nothing mounted
# here is seen outside), a PID namespace (nothing started outlives the build), the
# lab's /proc, /dev and a /tmp, and the paths the build needs bound at the same paths.
# shellcheck disable=SC2016
SELF=$SELF OUT=$OUT unshare --mount --propagation private --pid --fork --kill-child -- /bin/sh -c '
  set -eu
  lab=$1; shift
  mount --bind "$lab" "$lab"
  mount -t proc -o nosuid,nodev,noexec proc "$lab/proc"
  mount --rbind /dev "$lab/dev"
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$lab/tmp"
  for path in "$@"; do
    if [ -d "$path" ]; then mkdir -p "$lab$path"; else mkdir -p "$lab${path%/*}"; : >>"$lab$path"; fi
    mount --rbind "$path" "$lab$path"
  done
  exec chroot "$lab" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin LC_ALL=C.UTF-8 \
    /bin/bash "$SELF" --in-lab "$OUT"
' lab "$LAB" "$SRC" "$SELF" "$OUT" >&2
mv -f "$OUT/$NAME.new" "$BIN"
mv -f "$OUT/VERSION.new" "$OUT/VERSION"
echo "$stamp" >"$OUT/stamp"
echo "$BIN"

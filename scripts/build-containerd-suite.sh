#!/usr/bin/env bash
# Builds containerd's own snapshotter conformance suite (containerd 1.6's
# snapshots/testsuite, from Debian's golang-github-containerd-containerd-dev) around
# tests/containerd/suite/, the driver that runs it against `lamina snapshotter`.
#
#   build-containerd-suite.sh [OUT_DIR]    (default: $LAMINA_SUITE_BUILD, else build/containerd-suite)
#
# Prints the path of the test binary (OUT_DIR/containerd-suite.test) on standard output.
# Offline: GOPATH mode (GO111MODULE=off) over Debian's /usr/share/gocode, no module proxy.
# Idempotent: when the sources, Go and the Debian Go packages are those of the last build,
# it only prints the path. Needs golang-go and golang-github-containerd-containerd-dev.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-${LAMINA_SUITE_BUILD:-$REPO/build/containerd-suite}}
SRC=$REPO/tests/containerd/suite
GOCODE=/usr/share/gocode
PKG=lamina.test/containerd-suite
BIN=$OUT/containerd-suite.test

command -v go >/dev/null 2>&1 || { echo "build-containerd-suite.sh: no go (Debian's golang-go)" >&2; exit 2; }
[ -d "$GOCODE/src/github.com/containerd/containerd/snapshots/testsuite" ] || {
  echo "build-containerd-suite.sh: no containerd sources in $GOCODE" \
       "(Debian's golang-github-containerd-containerd-dev)" >&2
  exit 2
}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BIN=$OUT/containerd-suite.test

# Go's own state stays in OUT: no $HOME, no user go env file, never the network.
export GOPATH="$OUT/gopath:$GOCODE" GO111MODULE=off GOFLAGS= GOENV=off GOPROXY=off \
  GOTOOLCHAIN=local GOCACHE="$OUT/gocache" GOTMPDIR= CGO_ENABLED=0 HOME="${HOME:-$OUT}"

exec 9>"$OUT/.lock"
flock 9
stamp=$(
  {
    cd "$SRC" && sha256sum -- *.go
    go version
    dpkg-query -W -f '${Package} ${Version}\n' 'golang-*' 2>/dev/null | sort || true
  } | sha256sum | cut -d' ' -f1
)
if [ -x "$BIN" ] && [ "$(cat "$OUT/stamp" 2>/dev/null || true)" = "$stamp" ]; then
  echo "$BIN"
  exit 0
fi
echo "building containerd's snapshotter suite into $BIN…" >&2
rm -rf "$OUT/gopath"
mkdir -p "$OUT/gopath/src/$PKG"
cp -- "$SRC"/*.go "$OUT/gopath/src/$PKG/"
(cd "$OUT/gopath/src/$PKG" && go vet . && go test -c -o "$BIN.new" .)
mv -f "$BIN.new" "$BIN"
echo "$stamp" >"$OUT/stamp"
echo "$BIN"

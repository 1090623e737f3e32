#!/usr/bin/env bash
# Builds the engines' lab: a Debian sid userland in a directory, for the tests to chroot
# into (tests/lab.py). It holds what Debian 12 has too old: erofs-utils >= 1.8 (fsck.erofs
# and mkfs.erofs are the oracles of lamina's EROFS writer; 1.5 cannot read 512-byte
# blocks), and the engines of today (containerd 2.x, runc, Docker with buildx), with Go
# and containerd 2.x's and the CRI's Go sources to build their tests offline.
#
#   build-lab.sh [DIR]      (default: $LAMINA_LAB, else /var/tmp/lamina-lab; needs root)
#
# The host's apt sources are never touched: debootstrap makes DIR, apt-get runs inside it.
# Cached: when DIR's stamp (this script's sha256 and the package list) matches, it only
# prints DIR/VERSIONS. Otherwise the lab is built in DIR.tmp (a half-built one from an
# interrupted attempt is thrown away first) and renamed to DIR last, so DIR is always
# either a whole lab or absent. Concurrent builds wait for each other (flock on DIR.lock).
# Maintainer scripts run with /proc and /dev mounted in a private mount namespace that
# dies with the build (nothing to unmount, even after a kill), and a policy-rc.d that
# starts no service.
set -euo pipefail
SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
DIR=${1:-${LAMINA_LAB:-/var/tmp/lamina-lab}}
DIR=${DIR%/}
MIRROR=${LAMINA_LAB_MIRROR:-http://deb.debian.org/debian}

# What the lab is for decides the list: the EROFS oracles; the engines (Docker's daemon
# needs iptables, registries need the CA certificates); Go with containerd 2.x's and the
# CRI API's sources (GOPATH-style under /usr/share/gocode) for suites built offline.
# The CRI API is golang-github-kubernetes-cri-api-dev (0.32, what containerd-dev's
# golang-github-containerd-nri-dev depends on), not golang-k8s-cri-api-dev: sid's 0.36
# of that Breaks the 0.32 that containerd-dev needs, so apt cannot install both.
PACKAGES=(erofs-utils containerd runc docker.io docker-cli docker-buildx iptables
          ca-certificates golang-go golang-github-containerd-containerd-dev
          golang-github-kubernetes-cri-api-dev)
# The packages VERSIONS names.
KEY_PACKAGES=(erofs-utils containerd runc docker.io docker-cli docker-buildx golang-go
              golang-github-containerd-containerd-dev golang-github-kubernetes-cri-api-dev)

say() { printf 'build-lab: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { say "needs root (debootstrap, chroot)"; exit 2; }
for tool in debootstrap unshare chroot flock; do
  command -v "$tool" >/dev/null 2>&1 || { say "no $tool (Debian's $tool)"; exit 2; }
done

want=$( { sha256sum <"$SCRIPT"; printf '%s\n' "$MIRROR" "${PACKAGES[@]}"; } \
        | sha256sum | cut -d' ' -f1)
STAMP=.lamina-lab-stamp

mkdir -p "$(dirname "$DIR")"
exec 9>"$DIR.lock"
flock 9

if [ "$(cat "$DIR/$STAMP" 2>/dev/null || true)" = "$want" ] && [ -f "$DIR/VERSIONS" ]; then
  cat "$DIR/VERSIONS"
  exit 0
fi

# Removes a tree that an earlier attempt may have left with mounts in it (a build of an
# older version of this script, or a hand's): unmount what is below it, deepest first,
# and never cross into another filesystem while removing.
remove_tree() {
  local tree=$1 point
  [ -e "$tree" ] || return 0
  while read -r point; do
    umount -l -- "$point" 2>/dev/null || true
  done < <(awk -v t="$tree" '$5 == t || index($5, t "/") == 1 { print $5 }' \
             /proc/self/mountinfo | sort -r)
  rm -rf --one-file-system -- "$tree"
}

# Only a lab (or nothing) is ever replaced: a DIR without a stamp is someone's data.
if [ -e "$DIR" ] && [ ! -f "$DIR/$STAMP" ] && [ -n "$(ls -A "$DIR" 2>/dev/null || echo x)" ]; then
  say "$DIR exists and is not a lab (no $STAMP in it): not replacing it"
  exit 2
fi

TMP=$DIR.tmp
remove_tree "$TMP"
remove_tree "$DIR.old"
started=$(date +%s)

say "debootstrap sid into $TMP…"
# Documentation and translations are not needed by a test; leaving them out of the
# packages keeps the lab smaller.
mkdir -p "$TMP/etc/dpkg/dpkg.cfg.d"
cat >"$TMP/etc/dpkg/dpkg.cfg.d/lamina-lab-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
# No fsync per unpacked file (tens of thousands of Go sources): the lab is synced once,
# as a whole, before its stamp is written (below).
echo force-unsafe-io >"$TMP/etc/dpkg/dpkg.cfg.d/lamina-lab-unsafe-io"
debootstrap --variant=minbase sid "$TMP" "$MIRROR" >"$TMP.debootstrap.log" 2>&1 || {
  tail -n 30 "$TMP.debootstrap.log" >&2
  say "debootstrap failed (the whole log: $TMP.debootstrap.log)"
  exit 1
}
rm -f "$TMP.debootstrap.log"

# No service starts from a maintainer script, here or when the tests install nothing.
printf '#!/bin/sh\nexit 101\n' >"$TMP/usr/sbin/policy-rc.d"
chmod 755 "$TMP/usr/sbin/policy-rc.d"
# Valid-Until is not checked: a mirror that serves a snapshot of sid (as this machine's
# does) has a Release file past its date, which apt would refuse to read.
cat >"$TMP/etc/apt/apt.conf.d/90lamina-lab" <<'EOF'
Acquire::Check-Valid-Until "false";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
EOF
cp -L /etc/resolv.conf "$TMP/etc/resolv.conf"

say "apt-get install ${PACKAGES[*]}…"
# In a private mount namespace: /proc and /dev vanish with it, whatever happens.
unshare --mount --propagation private -- /bin/bash -euo pipefail -c '
  root=$1; shift
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev"
  mount -t tmpfs tmpfs "$root/tmp"
  export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
  chroot "$root" apt-get update -q
  chroot "$root" apt-get install -y -q "$@"
  chroot "$root" apt-get clean
' lab "$TMP" "${PACKAGES[@]}" >"$TMP.apt.log" 2>&1 || {
  tail -n 30 "$TMP.apt.log" >&2
  say "apt-get failed (the whole log: $TMP.apt.log)"
  exit 1
}
rm -f "$TMP.apt.log"
rm -rf "$TMP/var/lib/apt/lists/"*

dpkg-query --admindir="$TMP/var/lib/dpkg" -W -f '${Package} ${Version}\n' \
  "${KEY_PACKAGES[@]}" >"$TMP/VERSIONS"
# The whole tree on disk before the stamp says it is whole (dpkg did not fsync), the
# stamp on disk before the rename publishes it: after a power cut DIR is a whole lab
# or none, and DIR.tmp is thrown away by the next build.
sync -f "$TMP"
echo "$want" >"$TMP/$STAMP"
sync -f "$TMP/$STAMP"

# The whole lab replaces the old one at once (an old lab is set aside, then removed).
if [ -e "$DIR" ]; then
  mv -- "$DIR" "$DIR.old"
fi
mv -- "$TMP" "$DIR"
remove_tree "$DIR.old"
say "built $DIR in $(( $(date +%s) - started ))s, $(du -sh --one-file-system "$DIR" | cut -f1)"
cat "$DIR/VERSIONS"

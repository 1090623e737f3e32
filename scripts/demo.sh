#!/usr/bin/env bash
# A layer's whole life cycle with the lamina CLI, on the default home ($LAMINA_HOME, else
# /var/lib/lamina as root): a base layer from a tar, an image layer on it (a new file, a
# whiteout, a symlink), a container layer mounted and changed, its changes and diff, and
# then everything removed again.  Each command is printed before it runs.
#
#   scripts/demo.sh        (`make demo` runs it after installing what it needs)
#
# It uses the layer ids demo-base, demo-app and demo-ctr, and leaves no layer behind.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)

if [ -x "$REPO/.venv/bin/lamina" ]; then
  LAMINA_BIN="$REPO/.venv/bin/lamina"
elif command -v lamina >/dev/null 2>&1; then
  LAMINA_BIN=$(command -v lamina)
else
  echo "demo: no lamina command; run scripts/bootstrap.sh (or make demo) first" >&2
  exit 1
fi
lamina() { "$LAMINA_BIN" "$@"; }

if [ -t 1 ]; then BOLD=$'\e[1m' DIM=$'\e[2m' OFF=$'\e[0m'; else BOLD='' DIM='' OFF=''; fi
say() { printf '\n%s# %s%s\n' "$DIM" "$*" "$OFF"; }
# show TEXT: print a command line, with the demo's long paths as $WORK and $ROOT.
show() {
  local text=$1
  [ -z "${ROOT:-}" ] || text=${text//"$ROOT"/\$ROOT}
  text=${text//"$WORK"/\$WORK}
  printf '%s$ %s%s\n' "$BOLD" "$text" "$OFF"
}
# run CMD...: print the command, then run it.
run() { show "$*"; "$@"; }
# run_sh 'LINE': the same for a shell line with pipes or redirections.
run_sh() { show "$1"; eval "$1"; }

WORK=$(mktemp -d /tmp/lamina-demo.XXXXXX)
LAYERS=(demo-ctr demo-app demo-base)  # children first
# Whatever happens, leave no demo layer (nor mount) behind.
remove_layers() {
  local id
  for id in "${LAYERS[@]}"; do
    if lamina exists "$id" 2>/dev/null; then
      lamina rm "$id" || true
    fi
  done
}
trap 'status=$?; if [ $status != 0 ]; then remove_layers; fi; rm -rf "$WORK"' EXIT
remove_layers  # leftovers of an interrupted demo
ROOT=''

say "the store: ${LAMINA_HOME:-the default home}"
run lamina status

say "a small root filesystem in \$WORK ($WORK), tarred as an image layer is"
mkdir -p "$WORK/base"/{etc,bin,usr/share/doc/demo,var/log}
echo demo-host >"$WORK/base/etc/hostname"
echo 'Welcome to the lamina demo.' >"$WORK/base/etc/motd"
printf '#!/bin/sh\necho hello from lamina\n' >"$WORK/base/bin/hello"
chmod 0755 "$WORK/base/bin/hello"
echo 'read me, then delete me' >"$WORK/base/usr/share/doc/demo/README"
run_sh 'tar --numeric-owner -C "$WORK/base" -cf - . | lamina apply demo-base -'

say "an image layer on it: adds a file, deletes one with a .wh. whiteout, adds a symlink"
mkdir -p "$WORK/app"/{etc,usr/bin,usr/share/doc/demo}
echo 'greeting=hello' >"$WORK/app/etc/app.conf"
: >"$WORK/app/usr/share/doc/demo/.wh.README"
ln -s ../../bin/hello "$WORK/app/usr/bin/app"
run tar --numeric-owner -C "$WORK/app" -cf "$WORK/app.tar" .
run tar tvf "$WORK/app.tar"
run lamina apply demo-app --parent demo-base "$WORK/app.tar"
run lamina ls

say "a container: a writable layer on the image, mounted"
run lamina create --rw demo-ctr --parent demo-app
show 'ROOT=$(lamina mount demo-ctr)'
ROOT=$(lamina mount demo-ctr)
echo "$ROOT"
run ls -l "$ROOT" "$ROOT/usr/bin" "$ROOT/usr/share/doc/demo"
run cat "$ROOT/etc/app.conf"

say "the container changes its files"
run_sh "echo 'changed in the container' >>\"\$ROOT/etc/motd\""
run rm "$ROOT/etc/hostname"
run mkdir "$ROOT/data"
run_sh "echo note >\"\$ROOT/data/note.txt\""
run lamina changes demo-ctr
run lamina diff-size demo-ctr

say "its diff, as a layer tar a commit would make"
run lamina diff demo-ctr -o "$WORK/ctr.tar"
run tar tvf "$WORK/ctr.tar"
run lamina unmount demo-ctr

say "removing everything, children first"
run lamina rm demo-ctr
run lamina rm demo-app
run lamina rm demo-base
run lamina ls
for id in "${LAYERS[@]}"; do
  if lamina exists "$id"; then
    echo "demo: layer $id is still there" >&2
    exit 1
  fi
done
say "done: no layer left behind"

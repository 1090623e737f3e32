"""lamina without root against the reference tools in the same user namespace (issue 26).

    sudo .venv/bin/python bench/bench_rootless.py [--runs N] [--corpus DIR]

Makes an ordinary user (as the rootless tests do: :func:`tests.rootless.conftest.made_user`,
65536 subordinate ids, a work directory under /var/tmp), then, as that user, rounds of:

- **apply**, in ``unshare --user --map-root-user --map-auto --mount``: ``lamina apply`` of
  the corpus's Debian root filesystem (``rootfs.tar``, 200 MB; overlay with directory
  layers, the isolated applier, durable when it returns) against GNU ``tar -xf`` of the
  same tar into a directory then ``sync -f`` of it (its device nodes excluded: the kernel
  makes none in a user namespace, and lamina leaves them out), each after an untimed
  ``sync``, nothing deleted until the last round;
- **unpack**, in ``rootlesskit`` running Debian's containerd 1.6 rootless with lamina as its
  proxy snapshotter in the same namespace: ``ctr images import`` of the corpus image
  (``app-docker-save.tar``, 3 layers, 355 MB) into ``lamina`` against containerd's own
  ``overlayfs`` snapshotter (rootless, ``userxattr``), the image and its snapshots removed
  between rounds, untimed.

Each figure is timed from inside the namespace (``date +%s.%N`` around the command), the
order alternating by round; one untimed round first; medians, and the ratio to the
reference tool.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.rootless.conftest import User, made_user


def timed(user: User, ns: str, setup: str, command: str, stdin_path: Path | None = None
          ) -> float:
    """Seconds ``command`` took inside ``ns`` as ``user``, after the untimed ``setup``."""
    text = f"""
        {setup}
        start=$(date +%s.%N)
        {command}
        end=$(date +%s.%N)
        echo "$start $end"
        """
    if stdin_path is None:
        done = user.script(text, ns)
    else:
        with open(stdin_path, "rb") as f:
            done = user.run(user.script_argv(text), ns, stdin=f.fileno())
    if done.returncode != 0:
        raise SystemExit(f"failed: {command}\n{done.stderr[-2000:]}")
    start, end = (float(v) for v in done.stdout.split()[-2:])
    return end - start


def apply_round(user: User, tar: Path, n: int) -> dict[str, float]:
    """One round of lamina's apply and GNU tar's extract, each made durable as lamina's
    layer is (tar's directory with ``sync -f``), each after an untimed ``sync`` (nothing
    of the other's left dirty to flush).  What a round makes stays until the end: no
    tree is deleted before a timed run."""
    out: dict[str, float] = {}
    order = ["lamina", "GNU tar"] if n % 2 else ["GNU tar", "lamina"]
    for name in order:
        if name == "lamina":
            out[name] = timed(user, "unshare", "sync", f"L apply r{n} - > /dev/null", tar)
        else:
            target = user.work / f"tar{n}"
            out[name] = timed(user, "unshare", f"mkdir {target}; sync",
                              f"tar -xf - -C {target} --exclude='./dev/*' && sync -f {target}",
                              tar)
    return out


def remove_applied(user: User, rounds: int) -> None:
    """Untimed, after the last round: the layers and trees the rounds made."""
    for n in range(rounds + 1):
        done = user.script(f"L rm r{n}; rm -rf {user.work}/tar{n}", "unshare")
        assert done.returncode == 0, done.stderr


def unpack_rounds(user: User, image: Path, runs: int) -> list[dict[str, float]]:
    """All rounds in one rootless containerd (one rootlesskit session): timings printed
    by the script, one line a round."""
    rounds = []
    for n in range(runs + 1):
        order = ["lamina", "overlayfs"] if n % 2 else ["overlayfs", "lamina"]
        for name in order:
            rounds.append((n, name))
    steps = []
    for n, name in rounds:
        steps.append(f"""
            s=$(date +%s.%N)
            C images import --snapshotter {name} {user.work}/app.tar > /dev/null
            e=$(date +%s.%N)
            echo "{n} {name} $s $e"
            C images rm $(C images ls -q) > /dev/null
            C snapshots --snapshotter {name} ls | awk 'NR > 1 {{ print $1 }}' | sort -r |
                while read k; do C snapshots --snapshotter {name} rm "$k" 2>/dev/null || true; done
            sleep 1
            """)
    # The image tar must be the user's to read: a hard link would keep root's mode.
    copy = user.work / "app.tar"
    with open(image, "rb") as src, open(copy, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.chown(copy, user.uid, user.gid)
    script = textwrap.dedent(user.containerd_script(user.work)) + "".join(
        textwrap.dedent(step) for step in steps)
    done = user.script(script, "rootlesskit", timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"rootless containerd failed:\n{done.stderr[-3000:]}")
    results: dict[int, dict[str, float]] = {}
    for line in done.stdout.splitlines():
        n_text, name, s, e = line.split()
        results.setdefault(int(n_text), {})[name] = float(e) - float(s)
    return [results[n] for n in sorted(results) if n > 0]  # round 0 is the untimed one


def report(title: str, rounds: list[dict[str, float]], ours: str, ref: str) -> None:
    mine = statistics.median(r[ours] for r in rounds)
    theirs = statistics.median(r[ref] for r in rounds)
    ratios = sorted(r[ours] / r[ref] for r in rounds)
    print(f"{title}: {ours} {mine:.2f} s, {ref} {theirs:.2f} s, ratio {mine / theirs:.2f}x "
          f"(rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x, {len(rounds)} rounds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--corpus", type=Path, default=Path("/var/tmp/lamina-corpus"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench makes its own ordinary user")
    with made_user() as user:
        print(f"user {user.name} (uid {user.uid}, subordinate ids from {user.subuid}); "
              f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
        apply_round(user, args.corpus / "rootfs.tar", 0)  # untimed
        rounds = [apply_round(user, args.corpus / "rootfs.tar", n)
                  for n in range(1, args.runs + 1)]
        remove_applied(user, args.runs)
        report("apply rootfs.tar (unshare)", rounds, "lamina", "GNU tar")
        unpacks = unpack_rounds(user, args.corpus / "app-docker-save.tar", args.runs)
        report("ctr images import, rootless containerd 1.6 (rootlesskit)", unpacks,
               "lamina", "overlayfs")


if __name__ == "__main__":
    main()

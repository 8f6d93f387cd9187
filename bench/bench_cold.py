#!/usr/bin/env python3
"""Cold-cache benchmark of ``rlmask.diff`` (or ``rlmask.trajectory``) against plain parallel
reads of the same files (run by hand, as root or the files' owner).

Before every measurement every checkpoint file is evicted from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)`` after ``sync``); then, in turn: one ``cat`` per file,
all in parallel, two parallel ``dd`` per file with 4 MiB reads (each file in two halves), and
``rlmask.diff`` in a fresh interpreter (its own pass only, start-up excluded).

    python bench/bench_cold.py BASE.safetensors TUNED.safetensors [--repeat 5] [--before DIR]
    python bench/bench_cold.py --trajectory BASE STEP1 STEP2 ...   # rlmask.trajectory instead

``--warm`` runs the same programs on cached files (nothing evicted). ``--before DIR`` also
times the ``rlmask`` package found in ``DIR`` (a ``python/`` folder of another build, e.g. a
worktree of an earlier commit with its extension built), interleaved.

(``python bench/bench_patch.py --keep --dir D`` leaves a 0.46 GB pair in ``base`` and
``tuned-0.05`` of a new directory ``D/rlmask-bench-patch-*``; ``--dir`` itself is never deleted.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from _common import evict

DIFF = """
import sys, time
import rlmask
rlmask.diff  # the API loads on first use: before the clock
t = time.perf_counter()
rlmask.diff(sys.argv[1], sys.argv[2], progress=False)
print(time.perf_counter() - t)
"""

TRAJECTORY = """
import sys, time
import rlmask
rlmask.trajectory  # the API loads on first use: before the clock
t = time.perf_counter()
rlmask.trajectory(sys.argv[1], sys.argv[2:], progress=False)
print(time.perf_counter() - t)
"""


COLD = True


def timed(
    files: list[str], cmd: list[str] | str, env: dict[str, str] | None = None
) -> tuple[float, str]:
    if COLD:
        evict(files)
    t = time.perf_counter()
    out = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(out.stderr)
    return time.perf_counter() - t, out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("files", nargs="+", metavar="FILE", help="BASE TUNED, or a run's files")
    ap.add_argument(
        "--trajectory",
        action="store_true",
        help="time rlmask.trajectory(FILE1, [FILE2, ...]) instead of rlmask.diff",
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--before", help="a python/ folder holding another build of rlmask")
    ap.add_argument(
        "--warm", action="store_true", help="files cached, not evicted: the same runs warm"
    )
    args = ap.parse_args()
    global COLD
    COLD = not args.warm
    files = args.files
    if len(files) < 2 or (len(files) > 2 and not args.trajectory):
        ap.error("diff takes two files (BASE TUNED); --trajectory takes two or more")
    code = TRAJECTORY if args.trajectory else DIFF
    what = "trajectory" if args.trajectory else "diff"
    size = sum(os.path.getsize(f) for f in files)
    cat = " & ".join(f"cat {f} > /dev/null" for f in files) + " & wait"
    dd = []
    for f in files:
        h = os.path.getsize(f) // 2
        for skip, count in ((0, h), (h, os.path.getsize(f) - h)):
            dd.append(
                f"dd if={f} bs=4M skip={skip} count={count} iflag=skip_bytes,count_bytes "
                "of=/dev/null status=none"
            )
    dd4 = " & ".join(dd) + " & wait"
    if args.warm:
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    n = len(files)
    print(f"{size / 1e9:.2f} GB in {n} files, {'warm' if args.warm else 'cold before every run'}")
    print(
        f"rep   {n} cat s   {2 * n} dd s   {what} s   {what} / best read (throughput)"
        + ("   before s" if args.before else "")
    )
    runs = []
    for rep in range(args.repeat):
        c2, _ = timed(files, cat)
        c4, _ = timed(files, dd4)
        d = float(timed(files, [sys.executable, "-c", code, *files])[1].split()[0])
        row = [c2, c4, d]
        line = f"{rep:3}  {c2:8.3f} {c4:8.3f} {d:8.3f}   {min(c2, c4) / d:.2f}"
        if args.before:
            env = dict(os.environ, PYTHONPATH=args.before)
            row.append(float(timed(files, [sys.executable, "-c", code, *files], env)[1].split()[0]))
            line += f"   {row[-1]:8.3f}"
        runs.append(row)
        print(line, flush=True)
    # This kind of disk is noisy from run to run (a VM's disk moved between two speeds here):
    # the best of each method, all measured interleaved, is the fairest comparison.
    best = [min(col) for col in zip(*runs, strict=True)]
    c2, c4, d = best[:3]
    read = min(c2, c4)
    print(
        f"best: {n} cat {c2:.3f} s, {2 * n} dd {c4:.3f} s, {what} {d:.3f} s "
        f"({size / d / 1e9:.2f} GB/s): {what} at {read / d:.0%} of the best read's throughput"
    )
    if args.before:
        print(f"before: {best[3]:.3f} s, at {read / best[3]:.0%} of the best read's throughput")


if __name__ == "__main__":
    main()

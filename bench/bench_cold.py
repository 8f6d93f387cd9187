#!/usr/bin/env python3
"""Cold-cache benchmark of ``rlmask.diff`` (or ``rlmask.trajectory``, or ``patch create``)
against plain parallel reads of the same files (run by hand, as root or the files' owner).

Before every measurement every checkpoint file is evicted from the page cache
(``posix_fadvise(POSIX_FADV_DONTNEED)`` after ``sync``); then, in turn: one ``cat`` per file,
all in parallel, two parallel ``dd`` per file with 4 MiB reads (each file in two halves), and
``rlmask.diff`` in a fresh interpreter (its own pass only, start-up excluded).

    python bench/bench_cold.py BASE.safetensors TUNED.safetensors [--repeat 5] [--before DIR]
    python bench/bench_cold.py --trajectory BASE STEP1 STEP2 ...   # rlmask.trajectory instead
    python bench/bench_cold.py --patch BASE TUNED --memory-mb 1024     # a laptop's share of RAM
    python bench/bench_cold.py BASE TUNED --sample 1%                  # a sampled diff

``--patch`` times ``rlmask.patch.create`` (the patch written to a scratch folder beside BASE,
then deleted). ``--memory-mb N`` runs the rlmask programs in a memory cgroup of N MiB (cgroup
v1 or v2, as root), so that a pair larger than N does not stay in the page cache between two
reads of it, as on a machine whose RAM is smaller than the pair. Every rlmask run also reports
the bytes it read from disk (``read_bytes`` of ``/proc/self/io``).

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
sample = sys.argv[3] if len(sys.argv) > 3 else None
t = time.perf_counter()
rlmask.diff(sys.argv[1], sys.argv[2], sample=sample, progress=False)
print(time.perf_counter() - t, read_bytes())
"""

TRAJECTORY = """
import sys, time
import rlmask
rlmask.trajectory  # the API loads on first use: before the clock
t = time.perf_counter()
rlmask.trajectory(sys.argv[1], sys.argv[2:], progress=False)
print(time.perf_counter() - t, read_bytes())
"""

PATCH = """
import os, sys, tempfile, time
import rlmask.patch
t = time.perf_counter()
with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(sys.argv[1]))) as d:
    rlmask.patch.create(sys.argv[1], sys.argv[2], d + "/p.rlpatch", progress=False)
    print(time.perf_counter() - t, read_bytes())
"""

# Bytes this process read from disk (page-cache hits are not counted).
READ_BYTES = """
def read_bytes():
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["read_bytes"])
"""

COLD = True


def memory_cgroup(mb: int) -> str:
    """A memory cgroup limited to ``mb`` MiB; returns its ``cgroup.procs`` file."""
    v1 = "/sys/fs/cgroup/memory"
    if os.path.isdir(v1):
        folder, limit = f"{v1}/rlmask-bench", "memory.limit_in_bytes"
    else:
        folder, limit = "/sys/fs/cgroup/rlmask-bench", "memory.max"
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/{limit}", "w") as f:
        f.write(str(mb << 20))
    return f"{folder}/cgroup.procs"


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
    ap.add_argument(
        "--patch", action="store_true", help="time rlmask.patch.create(BASE, TUNED) instead"
    )
    ap.add_argument(
        "--memory-mb", type=int, help="run the rlmask programs in a memory cgroup of this size"
    )
    ap.add_argument(
        "--sample", help="time a sampled diff (rlmask diff --sample F, e.g. 1%%) instead"
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
    what = "trajectory" if args.trajectory else "patch" if args.patch else "diff"
    code = READ_BYTES + {"trajectory": TRAJECTORY, "patch": PATCH, "diff": DIFF}[what]
    run: list[str] = [sys.executable, "-c", code, *files]
    if args.sample:
        if what != "diff" or args.before:
            ap.error("--sample times a diff, of this build only")
        run.append(args.sample)
        what = "sampled diff"
    if args.memory_mb:
        procs = memory_cgroup(args.memory_mb)
        run = ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *run]
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
    limit = f", rlmask in {args.memory_mb} MiB of memory" if args.memory_mb else ""
    cached = "warm" if args.warm else "cold before every run"
    print(f"{size / 1e9:.2f} GB in {n} files, {cached}{limit}")
    print(
        f"rep   {n} cat s   {2 * n} dd s   {what} s (GB read)   {what} / best read (throughput)"
        + ("   before s (GB read)" if args.before else "")
    )
    runs = []
    for rep in range(args.repeat):
        c2, _ = timed(files, cat)
        c4, _ = timed(files, dd4)
        d, got = map(float, timed(files, run)[1].split())
        row = [c2, c4, d]
        line = f"{rep:3}  {c2:8.3f} {c4:8.3f} {d:8.3f} ({got / 1e9:.2f})   {min(c2, c4) / d:.2f}"
        if args.before:
            env = dict(os.environ, PYTHONPATH=args.before)
            b, got = map(float, timed(files, run, env)[1].split())
            row.append(b)
            line += f"   {b:8.3f} ({got / 1e9:.2f})"
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

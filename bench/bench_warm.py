#!/usr/bin/env python3
"""Warm ``rlmask.diff`` against the memory-mapped floor (issue 14; run by hand).

The floor (``MMAP_FLOOR`` in ``_common.py``): every file of both checkpoints memory-mapped with
numpy and summed as uint64, the files dealt over one thread per core (numpy releases the GIL
inside the sum), so the cores touch every byte once and do the least work a comparison could.
Against it, in the same run, each in a fresh interpreter with its imports done before the clock
(files in the page cache throughout, the mapping inside the clock for every method):

  (a) one tolerance      ``rlmask.diff(base, tuned)`` (default 1e-5)
  (b) packed mask        the same with ``mask=True`` (the changed bits kept, 1 bit per element,
                         returned as numpy arrays: numpy is imported before the clock, as
                         every other import is; a first ``mask=True`` in a process pays its
                         import once, 35-120 ms on these machines)
  (c) sweep              ``tolerances=DEFAULT_SWEEP`` (four tolerances in one pass)

    python bench/bench_warm.py BASE TUNED [--repeat 7]   # files, or checkpoint directories

Interleaved, best and median of ``--repeat``; the ratios are floor time / method time
(throughput against the floor's). ``python bench/bench_patch.py --keep --dir D`` or
``bench_curve.py --keep`` leave pairs to use. ``--before DIR`` adds (a), (b) and (c) run with the
``rlmask`` package in ``DIR`` (another build's ``python/`` folder), interleaved.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys

from _common import MMAP_FLOOR

DIFF = """
import sys, time
import rlmask
kw = {"one": {}, "mask": {"mask": True}, "sweep": {"tolerances": rlmask.DEFAULT_SWEEP}}[sys.argv[3]]
rlmask.diff  # the API loads on first use: before the clock
if kw.get("mask"):
    import numpy, rlmask._mask  # what a mask is returned as: imported before the clock too
t = time.perf_counter()
r = rlmask.diff(sys.argv[1], sys.argv[2], progress=False, **kw)
print(time.perf_counter() - t, r.changed)
"""

METHODS = {"floor": None, "one": "one", "mask": "mask", "sweep": "sweep"}
GOALS = {"one": 0.8, "mask": 0.6, "sweep": 0.7}


def shard_files(path: str) -> list[str]:
    """A checkpoint's files: the file itself, or a directory's ``*.safetensors`` shards."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return [path]


def run(code: str, args: list[str], env: dict[str, str] | None = None) -> float:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True
    )
    return float(out.stdout.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("tuned")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument(
        "--before", help="also time (a), (b), (c) with the rlmask package in this python/ folder"
    )
    args = ap.parse_args()
    files = [*shard_files(args.base), *shard_files(args.tuned)]
    size = sum(os.path.getsize(f) for f in files)
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    methods: dict[str, tuple[str | None, dict[str, str] | None]] = {
        m: (kind, None) for m, kind in METHODS.items()
    }
    if args.before:
        env = dict(os.environ, PYTHONPATH=args.before)
        methods |= {f"{m} (before)": (m, env) for m in ("one", "mask", "sweep")}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeat):
        for m, (kind, env) in methods.items():
            sides = [args.base, args.tuned, kind]
            code, argv = (MMAP_FLOOR, files) if kind is None else (DIFF, sides)
            times[m].append(run(code, argv, env))
    print(f"{size / 1e9:.2f} GB in {len(files)} files, warm; best / median of {args.repeat} s")
    floor = min(times["floor"])
    floor_med = statistics.median(times["floor"])
    print(
        "| method | best s | median s | GB/s | of the floor (best) | of the floor (median) | goal |"
    )
    print("|---|---|---|---|---|---|---|")
    for m, xs in times.items():
        best, med = min(xs), statistics.median(xs)
        goal = f"{GOALS[m]:.0%}" if m in GOALS else "-"
        print(
            f"| {m} | {best:.3f} | {med:.3f} | {size / best / 1e9:.1f} | {floor / best:.0%} | "
            f"{floor_med / med:.0%} | {goal} |"
        )


if __name__ == "__main__":
    main()

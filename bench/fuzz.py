"""The fuzzer of tests/fuzzing.py at scale, run by hand (CI runs a few thousand cases per kind).

    python bench/fuzz.py --headers 1000000 --indexes 100000 --masks 100000

Cases run in worker processes (one per core), in chunks; a worker that dies (a signal, an abort)
is counted as a crash of its whole chunk and reported with the chunk's seeds, so the run goes on.
Prints one Markdown table row per kind and the disagreements with the official safetensors
reader, for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fuzzing

CHUNK = 2000


def _chunk(kind: str, start: int, stop: int) -> fuzzing.Tally:
    with tempfile.TemporaryDirectory(prefix="rlmask-fuzz-") as d:
        return fuzzing.run(kind, range(start, stop), Path(d))


def campaign(kind: str, cases: int, seed0: int, workers: int) -> tuple[fuzzing.Tally, float]:
    total = fuzzing.Tally()
    t = time.perf_counter()
    chunks = [(s, min(s + CHUNK, seed0 + cases)) for s in range(seed0, seed0 + cases, CHUNK)]
    while chunks:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(_chunk, kind, a, b): (a, b) for a, b in chunks}
            chunks = []
            try:
                for f in as_completed(futures):
                    total.add(f.result())
                    print(f"\r{kind}: {total.cases:,} / {cases:,}", end="", file=sys.stderr)
            except BrokenProcessPool:
                # A worker died: its chunk is a crash; the chunks not finished run again.
                for f, (a, b) in futures.items():
                    if f.done() and f.exception() is None:
                        continue
                    if f.done():
                        total.cases += b - a
                        total.outcomes["crash"] += b - a
                        total.crashes.append(f"{kind} seeds {a}..{b}: worker died")
                    else:
                        chunks.append((a, b))
    print(file=sys.stderr)
    return total, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--headers", type=int, default=100_000)
    p.add_argument("--indexes", type=int, default=10_000)
    p.add_argument("--masks", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=1_000_000, help="first seed (CI uses 0..)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    rows, disagreements = [], {}
    for kind, n in (("header", args.headers), ("index", args.indexes), ("mask", args.masks)):
        if n <= 0:
            continue
        tally, secs = campaign(kind, n, args.seed, args.workers)
        o = tally.outcomes
        rows.append(
            f"| {kind} | {tally.cases:,} | {o['ok']:,} | {o['error']:,} | {o['crash']:,} | "
            f"{o['hang']:,} | {tally.slowest * 1000:.1f} ms | {secs:.0f} s |"
        )
        for line in tally.crashes[:10] + tally.hangs[:10]:
            print("  !", line)
        if kind == "header":
            disagreements = dict(tally.disagreements)
    print("| kind | cases | accepted | clean errors | crashes | hangs | slowest case | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\nheaders accepted by one reader and refused by the other:")
    for why, count in sorted(disagreements.items(), key=lambda kv: -kv[1]):
        print(f"- {count:,}: {why}")


if __name__ == "__main__":
    main()

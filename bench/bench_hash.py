#!/usr/bin/env python3
"""The two fingerprints of a patch against each other, on one core (issue 31; run by hand).

A patch's fingerprint is hashed while each 64 KiB leaf is in the cache (design §9), so what
matters is a hash's speed on data in the cache: each hash runs over one buffer again and again
(64 KiB: the leaf; 1 MiB: the core's L2), and over a buffer larger than the caches once, as the
memory delivers it. XXH3-128 through the `xxhash` package (xxHash's C code) and BLAKE3 through
the `blake3` package (the reference Rust crate, one thread), both called from Python with the
GIL released, so the call's own cost is included (negligible at these sizes).

    python bench/bench_hash.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import time

import blake3
import xxhash


def rate(fn: object, buf: bytes, reps: int, repeat: int) -> float:
    """Best GB/s of `repeat` runs of `reps` calls of ``fn(buf)``."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(reps):
            fn(buf)  # type: ignore[operator]
        best = min(best, time.perf_counter() - t)
    return len(buf) * reps / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    hashes = {
        "xxh3-128": lambda b: xxhash.xxh3_128(b).digest(),
        "blake3": lambda b: blake3.blake3(b).digest(),
    }
    print(f"{'buffer':>10}  " + "  ".join(f"{h + ' GB/s':>14}" for h in hashes) + "     ratio")
    for size, reps in ((64 << 10, 8192), (1 << 20, 512), (1 << 30, 1)):
        buf = os.urandom(size)
        got = [rate(fn, buf, reps, args.repeat) for fn in hashes.values()]
        label = f"{size >> 10} KiB" if size < (1 << 30) else "1 GiB"
        cells = "  ".join(f"{g:14.2f}" for g in got)
        print(f"{label:>10}  {cells}  {got[0] / got[1]:7.2f}x")


if __name__ == "__main__":
    main()

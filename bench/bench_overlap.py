#!/usr/bin/env python3
"""Benchmark of ``rlmask.overlap`` on two masks of an 8B-parameter model (run by hand).

Writes two ``.rlmask`` files over Llama-3.1-8B's tensor shapes (8.03 billion elements, about
1 GB each) into a scratch directory, warms the page cache, then times in the same run:

  (a) rlmask     ``rlmask.overlap(path_a, path_b)``: the full report (per tensor, layer,
                 module, total), on memory-mapped files
  (b) numpy      per tensor, on the same zero-copy views: ``np.bitwise_count(a).sum()``,
                 ``np.bitwise_count(b).sum()``, ``np.bitwise_count(a & b).sum()``
  (c) torch      the bool-tensor way: per tensor, unpack both to torch bool tensors
                 (``np.unpackbits``), then ``a.sum()``, ``b.sum()``, ``(a & b).sum()``
  (d) read floor one pass that reads every byte of both files

and checks that every method gives the same |I1|, |I2| and |I1 ∩ I2|.

    python bench/bench_overlap.py [--repeat 3] [--dir DIR] [--keep] [--scale 1.0]

``--scale`` shrinks the model (0.25: a quarter of the elements) for a quick look.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import READ_FLOOR, llama_shapes, print_table, run_program, summarize

import rlmask
from rlmask._mask import Mask, _Entry, padded_len


def llama8b_shapes(scale: float) -> dict[str, tuple[int, ...]]:
    """Llama-3.1-8B's tensors; ``scale`` < 1 keeps that share of the layers and vocabulary."""
    layers, vocab = max(1, round(32 * scale)), max(1, round(128256 * scale))
    return llama_shapes(4096, 14336, layers, vocab, 1024)


def write_mask(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> int:
    """A random mask of density about 1/4 (the AND of two random bytes); returns numel."""
    rng = np.random.default_rng(seed)
    entries = {}
    for name, shape in shapes.items():
        numel = int(np.prod(shape))
        n = padded_len(numel)
        packed = rng.integers(0, 256, n, dtype=np.uint8) & rng.integers(0, 256, n, dtype=np.uint8)
        entries[name] = _Entry(shape, "BF16", numel, packed)
    Mask(entries, {"source": "bench"}).save(path)
    return sum(e.numel for e in entries.values())


PROGRAMS = {
    "rlmask": """
import sys, time, rlmask
rlmask.overlap  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.overlap(sys.argv[1], sys.argv[2])
tot = r.total
print(time.perf_counter() - t, tot["size_1"], tot["size_2"], tot["intersection"])
""",
    "numpy": """
import sys, time, numpy as np, rlmask
rlmask.load_mask  # the API loads on first use: before the clock
a, b = rlmask.load_mask(sys.argv[1]), rlmask.load_mask(sys.argv[2])  # zero-copy views
t = time.perf_counter()
s1 = s2 = s12 = 0
for n in a.names:
    x, y = a.packed(n), b.packed(n)  # padding bits are zero in both files
    s1 += int(np.bitwise_count(x).sum(dtype=np.uint64))
    s2 += int(np.bitwise_count(y).sum(dtype=np.uint64))
    s12 += int(np.bitwise_count(x & y).sum(dtype=np.uint64))
print(time.perf_counter() - t, s1, s2, s12)
""",
    "torch": """
import sys, time, numpy as np, torch, rlmask
rlmask.load_mask  # the API loads on first use: before the clock
a, b = rlmask.load_mask(sys.argv[1]), rlmask.load_mask(sys.argv[2])
t = time.perf_counter()
s1 = s2 = s12 = 0
for n in a.names:
    x = torch.from_numpy(np.unpackbits(a.packed(n), bitorder="little").view(np.bool_))
    y = torch.from_numpy(np.unpackbits(b.packed(n), bitorder="little").view(np.bool_))
    s1 += int(x.sum()); s2 += int(y.sum()); s12 += int((x & y).sum())
print(time.perf_counter() - t, s1, s2, s12)
""",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlmask-bench-overlap-", dir=args.dir))
    try:
        shapes = llama8b_shapes(args.scale)
        a, b = root / "a.rlmask", root / "b.rlmask"
        numel = write_mask(a, shapes, 1)
        write_mask(b, shapes, 2)
        nbytes = a.stat().st_size + b.stat().st_size
        with open(a, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
        bound = sum(int(np.prod(s)) / 8 + 8 for s in shapes.values()) + 8 + header
        programs = {**PROGRAMS, "read-floor": READ_FLOOR}
        run_program(READ_FLOOR, [str(a), str(b)])  # warm the page cache
        results: dict[str, list[dict]] = {m: [] for m in programs}
        for _ in range(args.repeat):
            for m, code in programs.items():
                results[m].append(run_program(code, [str(a), str(b)]))
        answers = {m: results[m][0]["output"] for m in PROGRAMS}
        assert len({tuple(v) for v in answers.values()}) == 1, answers
        summary = {m: summarize(runs, nbytes) for m, runs in results.items()}
        r = summary["rlmask"]["seconds"]
        print(
            f"masks: {numel / 1e9:.2f}B elements, {len(shapes)} tensors, "
            f"{a.stat().st_size / 1e9:.3f} GB each (bound numel/8 + 8 per tensor + header: "
            f"{bound / 1e9:.3f} GB; within: {a.stat().st_size <= bound})"
        )
        print_table(summary)
        print(
            f"rlmask is {summary['numpy']['seconds'] / r:.1f}x numpy, "
            f"{summary['torch']['seconds'] / r:.1f}x torch, and reaches "
            f"{100 * summary['read-floor']['seconds'] / r:.0f}% of the read floor's throughput"
        )
        print(json.dumps({"numel": numel, "bytes": nbytes, **summary}))
        m = rlmask.load_mask(a)
        print(f"density check: {m.density:.4f}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

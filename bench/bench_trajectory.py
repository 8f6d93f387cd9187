#!/usr/bin/env python3
"""Benchmark of ``rlmask trajectory`` against plain diffs (run by hand).

Writes a llama-shaped bf16 base and a run of K checkpoints (``checkpoint-<step>/``) into a
scratch directory, each step moving some elements by one bf16 ULP and returning some to the base
value, warms the page cache, then times in the same run on the same warm files:

  (a) trajectory  ``rlmask.trajectory(base, run)``: K checkpoints against the base and their
                  predecessors, one pass
  (b) K diffs     ``rlmask.diff(base, checkpoint_k)`` for every k, one after the other in one
                  interpreter: the same vs-base figures without the consecutive ones, the
                  categories or Figure 6

Each runs in its own interpreter, sampled every 5 ms for peak anonymous memory.

    python bench/bench_trajectory.py                    # 8 checkpoints of a 0.33B model
    python bench/bench_trajectory.py --checkpoints 4 --repeat 3

Needs numpy and about 6 GB of free disk (deleted after unless --keep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import READ_FLOOR, llama_shapes, print_table, run_program, summarize

SHAPE = (1024, 2816, 20, 32000, 4)  # hidden, intermediate, layers, vocab, kv heads: 0.33B


def _write(path: Path, tensors: dict[str, tuple[tuple[int, ...], np.ndarray]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name, (shape, bits) in tensors.items():
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + 2 * bits.size],
        }
        offset += 2 * bits.size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, bits in tensors.values():
            f.write(bits.tobytes())


def write_run(root: Path, k: int) -> int:
    """Writes base/ and run/checkpoint-<100 j>/ for j = 1..k; returns the parameter count."""
    rng = np.random.default_rng(0)
    hidden, inter, layers, vocab, kv = SHAPE
    shapes = llama_shapes(hidden, inter, layers, vocab, kv * 64)
    base = {}
    for name, s in shapes.items():
        n = int(np.prod(s))
        bits = rng.integers(0x3C00, 0x3CFF, n, dtype=np.uint16) | (
            rng.integers(0, 2, n, dtype=np.uint16) << 15
        )
        base[name] = (s, bits)
    _write(root / "base", base)
    current = {name: bits.copy() for name, (_, bits) in base.items()}
    for j in range(1, k + 1):
        for name, bits in current.items():
            n = bits.size
            bits += (rng.random(n, dtype=np.float32) < 0.05).astype(np.uint16)
            back = rng.random(n, dtype=np.float32) < 0.02
            bits[back] = base[name][1][back]
        _write(
            root / "run" / f"checkpoint-{100 * j}", {n: (base[n][0], b) for n, b in current.items()}
        )
    return sum(b.size for _, b in base.values())


PROGRAMS = {
    "trajectory": """
import sys, time, rlmask
rlmask.trajectory  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.trajectory(sys.argv[1], sys.argv[2], progress=False)
print(time.perf_counter() - t, r.total_frame()["changed_vs_base"].to_list())
""",
    "K diffs": """
import sys, time, glob, rlmask
rlmask.diff  # the API loads on first use: before the clock
from rlmask._trajectory import discover
ckpts = discover([sys.argv[2]])
t = time.perf_counter()
out = [rlmask.diff(sys.argv[1], c, progress=False).changed for c in ckpts]
print(time.perf_counter() - t, out)
""",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoints", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dir",
        type=Path,
        help="where to make the scratch directory (a new one inside it; default: the temp dir)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    ap.add_argument("--reuse", action="store_true", help="use checkpoints kept by --keep in --dir")
    args = ap.parse_args()
    root = Path(
        tempfile.mkdtemp(prefix="rlmask-bench-trajectory-", dir=args.dir)
    )  # never --dir itself
    try:
        if args.reuse:
            params = sum(
                s[0] * (s[1] if len(s) > 1 else 1)
                for s in llama_shapes(*SHAPE[:4], SHAPE[4] * 64).values()
            )
        else:
            params = write_run(root, args.checkpoints)
        files = [str(f) for f in sorted(root.rglob("*.safetensors"))]
        nbytes = sum(Path(f).stat().st_size for f in files)
        run_program(READ_FLOOR, files)  # warm the page cache
        a = [str(root / "base"), str(root / "run")]
        results: dict[str, list[dict]] = {m: [] for m in PROGRAMS}
        for _ in range(args.repeat):
            for m, code in PROGRAMS.items():
                results[m].append(run_program(code, a))
        t_out, d_out = results["trajectory"][0]["output"], results["K diffs"][0]["output"]
        assert "".join(t_out) == "".join(d_out), (t_out, d_out)
        summary = {m: summarize(r, nbytes) for m, r in results.items()}
        gb = nbytes / 1e9
        print(f"{params / 1e9:.2f}B parameters, base + {args.checkpoints} checkpoints, {gb:.2f} GB")
        print_table(summary)
        ratio = summary["trajectory"]["seconds"] / summary["K diffs"]["seconds"]
        print(
            f"trajectory / {args.checkpoints} diffs: {ratio:.2f}x the time (target: at most 1.2x)"
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

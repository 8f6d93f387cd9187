#!/usr/bin/env python3
"""Benchmark of sparse patches (run by hand).

Writes a llama-shaped bf16 base (weights normal with std 0.02) and three tuned versions in
which 1%, 5% and 20% of the elements moved by an RL-sized step (1 to 3 bf16 units in the last
place, either way), warms the page cache and measures, each in a fresh interpreter on the same
warm files:

  (a) ``rlmask diff --criterion exact`` and ``rlmask.patch.create`` on the same pair: create
      throughput against diff's (goal: at least 50%); and the floor a create cannot go below
      that a diff does not have: writing a file of the patch's size and syncing it;
  (b) ``rlmask.patch.apply`` against copying the base checkpoint (``shutil.copyfile`` of every
      file, then fsync, as apply syncs): goal within 1.3x; and ``apply_in_place`` on a copy of
      the base (the copy not timed);
  (c) patch bytes per changed element at each density: the plain codec, the compact codec
      (``--codec compact``), and zstd (level 3, the `zstandard` package) over the XOR of the
      two checkpoints' data, the generic way to ship a small change; with the compact create
      and apply times beside the plain ones.

    python bench/bench_patch.py                   # 0.23B parameters, 0.46 GB per checkpoint
    python bench/bench_patch.py --repeat 5

Needs numpy, zstandard and about 3 GB of free disk (deleted after unless --keep).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import READ_FLOOR, llama_shapes, print_table, run_program, summarize, write_bf16

SHAPE = (1024, 2816, 16, 32000, 256)  # hidden, intermediate, layers, vocab, kv dim
CODECS = ("plain", "compact")

DIFF = """
import sys, time
import rlmask
rlmask.diff  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.diff(sys.argv[1], sys.argv[2], criterion="exact", progress=False)
print(time.perf_counter() - t, r.changed)
"""
CREATE = """
import sys, time
import rlmask.patch
def io():  # bytes this process dirtied in the page cache, and of those, dropped unwritten
    fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return int(fields["write_bytes"]), int(fields["cancelled_write_bytes"])
d = io()
t = time.perf_counter()
info = rlmask.patch.create(
    sys.argv[1], sys.argv[2], sys.argv[3], codec=sys.argv[4], progress=False
)
dt = time.perf_counter() - t
e = io()
print(dt, info.changed, info.bytes, e[0] - d[0], e[1] - d[1])
"""
WRITE = """
import sys, time, os
n, buf = int(sys.argv[2]), memoryview(os.urandom(1 << 20))
t = time.perf_counter()
with open(sys.argv[1], "wb") as f:
    while n:
        n -= f.write(buf[: min(n, len(buf))])
    f.flush()
    os.fsync(f.fileno())
print(time.perf_counter() - t)
"""
XOR_ZSTD = """
import sys, time
import numpy as np, zstandard
a = np.memmap(sys.argv[1], np.uint8, "r")
b = np.memmap(sys.argv[2], np.uint8, "r")
t = time.perf_counter()
n = len(zstandard.ZstdCompressor(level=3).compress(np.bitwise_xor(a, b).tobytes()))
print(time.perf_counter() - t, n)
"""
APPLY = """
import sys, time, shutil
import rlmask.patch
shutil.rmtree(sys.argv[3], ignore_errors=True)
t = time.perf_counter()
rlmask.patch.apply(sys.argv[1], [sys.argv[2]], sys.argv[3], progress=False)
print(time.perf_counter() - t)
"""
IN_PLACE = """
import sys, time, shutil
import rlmask.patch
shutil.rmtree(sys.argv[3], ignore_errors=True)
shutil.copytree(sys.argv[1], sys.argv[3])  # the checkpoint to update (not timed)
t = time.perf_counter()
rlmask.patch.apply_in_place(sys.argv[3], [sys.argv[2]], progress=False)
print(time.perf_counter() - t)
"""
COPY = """
import sys, time, shutil, os
from pathlib import Path
shutil.rmtree(sys.argv[2], ignore_errors=True)
t = time.perf_counter()
os.mkdir(sys.argv[2])
for f in sorted(Path(sys.argv[1]).iterdir()):
    shutil.copyfile(f, Path(sys.argv[2]) / f.name)
    with open(Path(sys.argv[2]) / f.name, "rb+") as h:
        os.fsync(h.fileno())
print(time.perf_counter() - t)
"""


def write_pairs(root: Path, densities: list[float]) -> int:
    """base/ and tuned-<d>/ for each density; returns the parameter count."""
    rng = np.random.default_rng(0)
    shapes = llama_shapes(*SHAPE)
    base = {}
    for name, shape in shapes.items():
        w = (rng.standard_normal(shape).astype(np.float32) * 0.02).view(np.uint32)
        base[name] = (shape, (w >> 16).astype(np.uint16))
    write_bf16(root / "base", {n: bits for n, (_, bits) in base.items()})
    for d in densities:
        tuned = {}
        for name, (shape, bits) in base.items():
            moved = rng.random(bits.shape) < d
            # An RL-sized step: 1 to 3 units in the last place, either way.
            step = rng.integers(1, 4, bits.shape, dtype=np.int32) * rng.choice([-1, 1], bits.shape)
            new = np.where(moved, (bits.astype(np.int32) + step).astype(np.uint16), bits)
            tuned[name] = (shape, new)
        write_bf16(root / f"tuned-{d:g}", {n: bits for n, (_, bits) in tuned.items()})
    return sum(int(np.prod(s)) for s in shapes.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dir",
        type=Path,
        help="where to make the scratch directory (a new one inside it; default: the temp dir)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlmask-bench-patch-", dir=args.dir))  # never --dir itself
    densities = [0.01, 0.05, 0.2]
    try:
        params = write_pairs(root, densities)
        base = str(root / "base")
        size = (root / "base" / "model.safetensors").stat().st_size
        print(f"{params / 1e9:.2f}B parameters, {size / 1e9:.2f} GB per checkpoint")
        sizes = []
        for d in densities:
            tuned = str(root / f"tuned-{d:g}")
            files = [str(root / "base" / "model.safetensors"), tuned + "/model.safetensors"]
            results: dict[str, list[dict]] = {"diff exact": []}
            apply: dict[str, list[dict]] = {"copy base": []}
            for _ in range(args.repeat):
                run_program(READ_FLOOR, files)
                results["diff exact"].append(run_program(DIFF, [base, tuned]))
                for codec in CODECS:
                    patch = str(root / f"{d:g}.{codec}.rlpatch")
                    results.setdefault(f"create {codec}", []).append(
                        run_program(CREATE, [base, tuned, patch, codec])
                    )
                    nbytes = str(Path(patch).stat().st_size)
                    results.setdefault(f"write {codec} size", []).append(
                        run_program(WRITE, [str(root / "written"), nbytes])
                    )
                    apply.setdefault(f"apply {codec}", []).append(
                        run_program(APPLY, [base, patch, str(root / "out")])
                    )
                    apply.setdefault(f"in place {codec}", []).append(
                        run_program(IN_PLACE, [base, patch, str(root / "served")])
                    )
                apply["copy base"].append(run_program(COPY, [base, str(root / "copy")]))
            changed = int(results["diff exact"][0]["output"][0])
            row: dict[str, float] = {}
            for codec in CODECS:
                out = results[f"create {codec}"][0]["output"]
                assert int(out[0]) == changed
                row[codec] = int(out[1])
                print(
                    f"create {codec}: the patch {int(out[1]) / 1e6:.1f} MB, bytes written "
                    f"(dirtied in the page cache) {int(out[2]) / 1e6:.1f} MB, of which dropped"
                    f" before reaching the disk "
                    f"{int(out[3]) / 1e6:.1f} MB"
                )
            row["zstd(XOR)"] = int(run_program(XOR_ZSTD, files)["output"][0])
            sizes.append((d, changed, row))
            print(f"\ndensity {100 * d:g}% ({changed:,} changed elements)")
            summary = {m: summarize(r, 2 * size) for m, r in results.items()}
            summary |= {m: summarize(r, size) for m, r in apply.items()}
            print_table(summary)
            for codec in CODECS:
                r1 = summary["diff exact"]["seconds"] / summary[f"create {codec}"]["seconds"]
                floor = summary[f"write {codec} size"]["seconds"]
                r2 = summary[f"apply {codec}"]["seconds"] / summary["copy base"]["seconds"]
                r3 = summary[f"in place {codec}"]["seconds"] / summary["copy base"]["seconds"]
                print(
                    f"{codec}: create throughput / diff's {100 * r1:.0f}% (goal: at least 50%;"
                    f" writing and syncing the patch's bytes alone takes {floor:.3f} s);"
                    f" apply time / copy time {r2:.2f}x (goal: at most 1.3x);"
                    f" in place / copy {r3:.2f}x"
                )
        print("\nbytes per changed element (and of the full model)")
        print("density  changed      " + "  ".join(f"{k:>18}" for k in sizes[0][2]))
        for d, changed, row in sizes:
            cells = [f"{n / changed:8.2f} ({100 * n / size:5.1f}%)" for n in row.values()]
            print(f"{100 * d:6g}%  {changed:>11,}  " + "  ".join(f"{c:>18}" for c in cells))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

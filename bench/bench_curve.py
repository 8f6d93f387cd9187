#!/usr/bin/env python3
"""The cost curve (issue 14): time and peak anonymous memory of ``rlmask.diff``,
``rlmask.patch.create`` and ``apply``, ``rlmask.overlap`` (two masks of the model) and
``rlmask.trajectory`` (two checkpoints of a run) on llama-shaped bf16 models of about 0.1B,
0.5B, 1B and 2B parameters, warm (files in the page cache) against the read floor of the same
files in the same run, and cold (evicted with ``posix_fadvise(DONTNEED)`` after ``sync``) for
the sizes named in ``--cold``, against two parallel ``cat`` of the same files. Each
measurement runs in a fresh interpreter (start-up excluded); best of ``--repeat``.

    python bench/bench_curve.py                  # 0.1B, 0.5B, 1B, 2B; cold for 0.5B and 2B
    python bench/bench_curve.py --sizes 0.1 0.5 --cold 0.5 --repeat 2

Weights are normal with std 0.02 (in bf16); the tuned side moves 5% of them by one unit in
the last place, a second step 5% more. Needs about 4 x 4 GB of free disk at 2B (three
checkpoints and the applied one; written one size at a time and deleted after it unless
--keep) and root or the files' owner for the eviction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import READ_FLOOR, evict, llama_shapes, run_program, summarize

# hidden, intermediate, layers, vocab, kv dim
SHAPES = {
    "0.1": (768, 2048, 8, 32000, 256),
    "0.5": (1024, 2816, 38, 32000, 256),
    "1": (2048, 5632, 20, 32000, 256),
    "2": (2048, 5632, 42, 32000, 256),
}
DIFF = """
import sys, time
import rlmask
rlmask.diff  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.diff(sys.argv[1], sys.argv[2], progress=False)
print(time.perf_counter() - t, r.changed)
"""
OVERLAP = """
import sys, time
import rlmask
rlmask.overlap  # before the clock
t = time.perf_counter()
r = rlmask.overlap(sys.argv[1], sys.argv[2])
print(time.perf_counter() - t, len(r.tensors))
"""
TRAJECTORY = """
import sys, time
import rlmask
rlmask.trajectory  # before the clock
t = time.perf_counter()
r = rlmask.trajectory(sys.argv[1], sys.argv[2:], progress=False)
print(time.perf_counter() - t, len(r.steps))
"""
APPLY = """
import shutil, sys, time
import rlmask.patch
rlmask.patch.apply  # before the clock
t = time.perf_counter()
rlmask.patch.apply(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
print(time.perf_counter() - t)
shutil.rmtree(sys.argv[3])
"""
MASKS = """
import sys
import rlmask
rlmask.diff(sys.argv[1], sys.argv[2], save_mask=sys.argv[3], progress=False)
rlmask.diff(sys.argv[1], sys.argv[4], save_mask=sys.argv[5], progress=False)
print(0)
"""
CREATE = """
import sys, time
import rlmask.patch
rlmask.patch.create  # before the clock
t = time.perf_counter()
info = rlmask.patch.create(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
print(time.perf_counter() - t, info.changed)
"""


def write_pair(root: Path, shape: tuple[int, ...], seed: int = 0) -> tuple[int, list[str]]:
    """base/, tuned/ and step2/ (one .safetensors file each; step2 is tuned with 5% more moved),
    tensor by tensor; the parameter count and the base and tuned files."""
    rng = np.random.default_rng(seed)
    shapes = llama_shapes(*shape)
    header, offset = {}, 0
    for name, s in shapes.items():
        n = int(np.prod(s))
        header[name] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    files = []
    for side in ("base", "tuned", "step2"):
        (root / side).mkdir(parents=True, exist_ok=True)
        files.append(str(root / side / "model.safetensors"))
    with open(files[0], "wb") as fa, open(files[1], "wb") as fb, open(files[2], "wb") as fc:
        for f in (fa, fb, fc):
            f.write(struct.pack("<Q", len(text)) + text)
        for s in shapes.values():
            n = int(np.prod(s))
            for start in range(0, n, 1 << 24):
                m = min(1 << 24, n - start)
                w = (rng.standard_normal(m, dtype=np.float32) * 0.02).view(np.uint32)
                bits = (w >> 16).astype(np.uint16)
                fa.write(bits.tobytes())
                bits[rng.random(m, dtype=np.float32) < 0.05] ^= 1
                fb.write(bits.tobytes())
                bits[rng.random(m, dtype=np.float32) < 0.05] ^= 2
                fc.write(bits.tobytes())
    return sum(int(np.prod(s)) for s in shapes.values()), files[:2]


def cold_cat(files: list[str]) -> float:
    evict(files)
    t = time.perf_counter()
    subprocess.run(" & ".join(f"cat {f} > /dev/null" for f in files) + " & wait", shell=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--cold", nargs="*", default=["0.5", "2"], choices=list(SHAPES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dir",
        type=Path,
        help="where to make the scratch directory (a new one inside it; default: the temp dir)",
    )
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlmask-bench-curve-", dir=args.dir))  # never --dir itself
    rows = []
    try:
        for size in args.sizes:
            pair = root / size
            params, files = write_pair(pair, SHAPES[size])
            nbytes = sum(os.path.getsize(f) for f in files)
            run_program(READ_FLOOR, files)  # warm the cache
            b, t, t2 = (str(pair / side) for side in ("base", "tuned", "step2"))
            masks = [str(pair / "a.rlmask"), str(pair / "b.rlmask")]
            run_program(MASKS, [b, t, masks[0], t2, masks[1]])
            floor, diff, create, cold, cat = [], [], [], [], []
            over, traj, apply = [], [], []
            for _ in range(args.repeat):
                floor.append(run_program(READ_FLOOR, files))
                diff.append(run_program(DIFF, [str(pair / "base"), str(pair / "tuned")]))
                create.append(
                    run_program(
                        CREATE, [str(pair / "base"), str(pair / "tuned"), str(pair / "p.rlpatch")]
                    )
                )
                over.append(run_program(OVERLAP, masks))
                traj.append(run_program(TRAJECTORY, [b, t, t2]))
                apply.append(run_program(APPLY, [b, str(pair / "p.rlpatch"), str(pair / "out")]))
                if size in args.cold:
                    cat.append(cold_cat(files))
                    evict(files)
                    cold.append(
                        run_program(DIFF, [str(pair / "base"), str(pair / "tuned")])["seconds"]
                    )
            d, f, c, o, tr, ap = (
                summarize(r, nbytes) for r in (diff, floor, create, over, traj, apply)
            )
            row = {
                "size": size,
                "params": params,
                "GB": nbytes / 1e9,
                "diff_s": d["seconds"],
                "floor_s": f["seconds"],
                "diff_anon_MB": d["peak_anon_MB"],
                "create_s": c["seconds"],
                "create_anon_MB": c["peak_anon_MB"],
                "overlap_s": o["seconds"],
                "overlap_anon_MB": o["peak_anon_MB"],
                "trajectory_s": tr["seconds"],
                "trajectory_anon_MB": tr["peak_anon_MB"],
                "apply_s": ap["seconds"],
                "apply_anon_MB": ap["peak_anon_MB"],
                "cold_diff_s": min(cold) if cold else None,
                "cold_cat_s": min(cat) if cat else None,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(pair, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(
        "\nPeak anonymous memory (MB) and time (s) of every command: diff, patch create and "
        "apply on the pair, overlap of two masks of the model, trajectory over two checkpoints."
    )
    print(
        "\n| parameters | diff | patch create | patch apply | overlap | trajectory |"
        "\n|---|---|---|---|---|---|"
    )
    for r in rows:
        cells = " | ".join(
            f"{r[k + '_anon_MB']:.0f} MB, {r[k + '_s']:.2f} s"
            for k in ("diff", "create", "apply", "overlap", "trajectory")
        )
        print(f"| {r['params'] / 1e9:.2f}B | {cells} |")
    print(
        "\n| parameters | pair GB | diff s (warm) | s per GB | of the read floor "
        "| diff peak anon MB | patch create s | create peak anon MB | cold diff s "
        "| cold 2x cat s | cold: diff throughput of cat |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cold = (
            f"{r['cold_diff_s']:.2f} | {r['cold_cat_s']:.2f} | "
            f"{r['cold_cat_s'] / r['cold_diff_s']:.0%}"
            if r["cold_diff_s"]
            else "- | - | -"
        )
        print(
            f"| {r['params'] / 1e9:.2f}B | {r['GB']:.2f} | {r['diff_s']:.3f} | "
            f"{r['diff_s'] / r['GB']:.3f} | {r['floor_s'] / r['diff_s']:.0%} | "
            f"{r['diff_anon_MB']:.0f} | {r['create_s']:.2f} | {r['create_anon_MB']:.0f} | {cold} |"
        )


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark of block-scaled FP8 comparisons against BF16 ones of the same element count (run
by hand).

Writes two pairs of checkpoints with the same tensors (DeepSeek-style 7168 x 2048 matrices):
  (a) FP8   F8_E4M3 codes beside F32 ``weight_scale_inv`` block scales (128 x 128), as
            DeepSeek-V3 ships them, about 5% of codes and 1% of scale blocks changed;
  (b) BF16  the same shapes in bf16, about 5% of elements changed;
warms the page cache and times ``rlmask.diff`` on each in its own interpreter (the same run,
the same machine), sampling peak anonymous memory every 5 ms. The FP8 pair has half the bytes,
but each element is dequantised (a table lookup and a multiply by its block's scale) before it
is compared, so the figure of merit is time per element: goal within 1.3x of BF16.

    python bench/bench_fp8.py                 # 24 matrices: 0.35B elements per checkpoint
    python bench/bench_fp8.py --matrices 8 --repeat 5

Needs numpy and about 3 GB of free disk (deleted after unless --keep).
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
from _common import READ_FLOOR, print_table, run_program, summarize

ROWS, COLS, BLOCK = 7168, 2048, 128

PROGRAM = """
import sys, time
import rlmask
rlmask.diff  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.diff(sys.argv[1], sys.argv[2], progress=False)
print(time.perf_counter() - t, r.numel, r.changed)
"""


def _write(folder: Path, tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, _, data in tensors.values():
            f.write(data.tobytes())
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}}
    (folder / "config.json").write_text(json.dumps(config))


def write_pairs(root: Path, matrices: int) -> int:
    """Writes fp8/{base,tuned} and bf16/{base,tuned}; returns the elements per checkpoint."""
    rng = np.random.default_rng(0)
    sb = (ROWS // BLOCK, COLS // BLOCK)
    sides: dict[str, dict[str, dict]] = {k: {"base": {}, "tuned": {}} for k in ("fp8", "bf16")}
    for i in range(matrices):
        name = f"model.layers.{i}.mlp.experts.0.up_proj.weight"
        # Finite E4M3 codes (0x7f and 0xff are NaN), then 5% of them moved by one step.
        codes = rng.integers(0, 0x7E, (ROWS, COLS), dtype=np.uint8)
        codes |= (rng.random((ROWS, COLS)) < 0.5).astype(np.uint8) << 7
        moved = codes ^ (rng.random((ROWS, COLS)) < 0.05).astype(np.uint8)
        scale = (rng.random(sb) + 0.5).astype(np.float32)
        new_scale = np.where(rng.random(sb) < 0.01, scale * 1.5, scale).astype(np.float32)
        sides["fp8"]["base"][name] = ("F8_E4M3", (ROWS, COLS), codes)
        sides["fp8"]["tuned"][name] = ("F8_E4M3", (ROWS, COLS), moved)
        sides["fp8"]["base"][name + "_scale_inv"] = ("F32", sb, scale)
        sides["fp8"]["tuned"][name + "_scale_inv"] = ("F32", sb, new_scale)
        bf = (rng.standard_normal((ROWS, COLS)).astype(np.float32).view(np.uint32) >> 16).astype(
            np.uint16
        )
        bf_moved = bf ^ (rng.random((ROWS, COLS)) < 0.05).astype(np.uint16)
        sides["bf16"]["base"][name] = ("BF16", (ROWS, COLS), bf)
        sides["bf16"]["tuned"][name] = ("BF16", (ROWS, COLS), bf_moved)
    for kind, pair in sides.items():
        for side, tensors in pair.items():
            _write(root / kind / side, tensors)
    return matrices * ROWS * COLS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--matrices", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dir",
        type=Path,
        help="where to make the scratch directory (a new one inside it; default: the temp dir)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlmask-bench-fp8-", dir=args.dir))  # never --dir itself
    try:
        elements = write_pairs(root, args.matrices)
        results: dict[str, list[dict]] = {"FP8": [], "BF16": []}
        for _ in range(args.repeat):
            for kind, folder in (("FP8", "fp8"), ("BF16", "bf16")):
                files = [str(f) for f in sorted((root / folder).rglob("*.safetensors"))]
                run_program(READ_FLOOR, files)  # warm the page cache
                out = run_program(
                    PROGRAM, [str(root / folder / "base"), str(root / folder / "tuned")]
                )
                assert int(out["output"][0]) == elements, out
                results[kind].append(out)
        summary = {}
        for kind, folder in (("FP8", "fp8"), ("BF16", "bf16")):
            nbytes = sum(f.stat().st_size for f in (root / folder).rglob("*.safetensors"))
            summary[kind] = summarize(results[kind], nbytes)
        print(f"{elements / 1e9:.2f}B elements per checkpoint, {args.matrices} matrices")
        print_table(summary)
        per = {k: v["seconds"] / elements * 1e9 for k, v in summary.items()}
        print(f"ns per element: FP8 {per['FP8']:.3f}, BF16 {per['BF16']:.3f}")
        print(f"FP8 / BF16 time per element: {per['FP8'] / per['BF16']:.2f}x (goal: at most 1.3x)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

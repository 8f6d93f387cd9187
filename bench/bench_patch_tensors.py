#!/usr/bin/env python3
"""``patch apply`` against the number of tensors (issue 31; run by hand).

Writes a BF16 base of N tensors of 16 elements (a DeepSeek-V3 checkpoint has about 90k
tensors) and a tuned copy in which one element of every tensor moved, creates the patch, then
times in fresh interpreters, interleaved: ``rlmask.patch.apply`` of that patch, and a copy of
the base (``shutil.copyfile`` then fsync, as apply syncs). Apply's cost should grow linearly
with N: the ratio apply / copy stays flat.

    python bench/bench_patch_tensors.py --tensors 5000 20000 60000 90000 [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import run_program

APPLY = """
import shutil, sys, time
import rlmask.patch
t = time.perf_counter()
rlmask.patch.apply(sys.argv[1], [sys.argv[2]], sys.argv[3], progress=False)
print(time.perf_counter() - t)
shutil.rmtree(sys.argv[3])
"""

COPY = """
import os, shutil, sys, time
t = time.perf_counter()
os.makedirs(sys.argv[3])
out = os.path.join(sys.argv[3], "model.safetensors")
shutil.copyfile(os.path.join(sys.argv[1], "model.safetensors"), out)
with open(out, "rb+") as f:
    os.fsync(f.fileno())
print(time.perf_counter() - t)
shutil.rmtree(sys.argv[3])
"""


def write(root: Path, n: int) -> None:
    import torch
    from safetensors.torch import save_file

    import rlmask.patch

    g = torch.Generator().manual_seed(0)
    base = {
        f"model.layers.{i // 10}.t{i % 10}.weight": torch.randn(16, generator=g).bfloat16()
        for i in range(n)
    }
    tuned = {k: v.clone() for k, v in base.items()}
    for i, v in enumerate(tuned.values()):
        v[i % 16] += 1
    for side, tensors in (("base", base), ("tuned", tuned)):
        (root / side).mkdir(parents=True)
        save_file(tensors, root / side / "model.safetensors")
    rlmask.patch.create(root / "base", root / "tuned", root / "p.rlpatch", progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tensors", type=int, nargs="+", default=[5000, 20000, 60000, 90000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    print(f"{'tensors':>8} {'apply s':>9} {'copy s':>8} {'apply/copy':>11} {'us/tensor':>10}")
    for n in args.tensors:
        root = Path(tempfile.mkdtemp(prefix="rlmask-bench-tensors-", dir=args.dir))
        try:
            write(root, n)
            argv = [str(root / "base"), str(root / "p.rlpatch"), str(root / "out")]
            apply, copy = [], []
            for _ in range(args.repeat):
                apply.append(run_program(APPLY, argv)["seconds"])
                copy.append(run_program(COPY, argv)["seconds"])
            a, c = min(apply), min(copy)
            print(f"{n:>8} {a:>9.3f} {c:>8.3f} {a / c:>10.1f}x {1e6 * a / n:>10.1f}")
        finally:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()

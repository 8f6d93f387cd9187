#!/usr/bin/env python3
"""Benchmark of ``rlmask rank`` against the bare compute floor and the paper's way (by hand).

Writes a llama-shaped bf16 pair with 4096-wide layers (Llama-3.1-8B's layer shapes, a few
layers, an 8192-token vocabulary) into a scratch directory, then times in the same run:

  (a) rlmask      ``rlmask.rank(base, tuned, device=...)``: everything, files to report
  (b) floor       ``torch.linalg.svdvals`` on the same float32 differences, already in memory
                  (only the decomposition is timed: nothing can do less)
  (c) paper's way load both state dicts (``safetensors.torch.load_file``), then per matrix
                  ``torch.linalg.matrix_rank((b - a).float())``

and checks that (a) and (c) find the same ranks.

    python bench/bench_rank.py [--layers 2] [--device cpu|cuda] [--repeat 1] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _common import llama_shapes, print_table, run_program, summarize

HIDDEN, INTER, KVD, VOCAB = 4096, 14336, 1024, 8192


def write_pair(root: Path, layers: int) -> int:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = llama_shapes(HIDDEN, INTER, layers, VOCAB, KVD)
    base, tuned = {}, {}
    for name, s in shapes.items():
        w = torch.randn(s, generator=g) * 0.02
        step = torch.randn(s, generator=g) * 2e-4  # an RL-sized update, full rank in bf16
        base[name] = w.to(torch.bfloat16)
        tuned[name] = (w + step).to(torch.bfloat16)
    save_file(base, root / "base.safetensors")
    save_file(tuned, root / "tuned.safetensors")
    return sum(1 for s in shapes.values() if len(s) == 2)


PROGRAMS = {
    "rlmask": """
import sys, time, rlmask
rlmask.rank  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.rank(sys.argv[1], sys.argv[2], device=sys.argv[3], progress=False)
ranks = r.tensors.sort("name")["rank"].to_list()
print(time.perf_counter() - t, ",".join(map(str, ranks)))
""",
    "floor": """
import sys, time, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
dev = torch.device(sys.argv[3])
deltas = [(b[n].float() - a[n].float()).to(dev) for n in sorted(a) if a[n].ndim == 2]
del a, b
if dev.type == "cuda":
    torch.cuda.synchronize()
t = time.perf_counter()
for d in deltas:
    torch.linalg.svdvals(d)
if dev.type == "cuda":
    torch.cuda.synchronize()
print(time.perf_counter() - t, "-")
""",
    "paper": """
import sys, time, torch
from safetensors.torch import load_file
t = time.perf_counter()
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
dev = torch.device(sys.argv[3])
ranks = [int(torch.linalg.matrix_rank((b[n].to(dev) - a[n].to(dev)).float()))
         for n in sorted(a) if a[n].ndim == 2]
print(time.perf_counter() - t, ",".join(map(str, ranks)))
""",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlmask-bench-rank-", dir=args.dir))
    try:
        matrices = write_pair(root, args.layers)
        files = [str(root / "base.safetensors"), str(root / "tuned.safetensors"), args.device]
        nbytes = sum((root / f).stat().st_size for f in ("base.safetensors", "tuned.safetensors"))
        results: dict[str, list[dict]] = {m: [] for m in PROGRAMS}
        for _ in range(args.repeat):
            for m, code in PROGRAMS.items():
                results[m].append(run_program(code, files))
        assert results["rlmask"][0]["output"] == results["paper"][0]["output"], "ranks differ"
        summary = {m: summarize(runs, nbytes) for m, runs in results.items()}
        floor = summary["floor"]["seconds"]
        print(
            f"{matrices} matrices ({args.layers} layers of width {HIDDEN}, vocab {VOCAB}) "
            f"on {args.device}"
        )
        print_table(summary)
        print(
            f"rlmask takes {summary['rlmask']['seconds'] / floor:.3f}x the compute floor; "
            f"the paper's way {summary['paper']['seconds'] / floor:.3f}x"
        )
        print(json.dumps({"matrices": matrices, "device": args.device, **summary}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""``rlmask spectrum`` against the straightforward torch script (issue 29; run by hand).

Writes a llama-shaped bf16 pair (``--hidden``, ``--layers``; an 8192-token vocabulary) with an
RL-sized update, then times in the same run, each in a fresh interpreter:

  (a) rlmask     ``rlmask.spectrum(base, tuned, device=...)``: files to report, every measure
  (b) script     what a one-off script does: load both state dicts
                 (``safetensors.torch.load_file``), then per matrix compute each measure
                 with the decompositions it needs, recomputed where each measure needs them
                 (the base's SVD for every ratio's principal energies, again for the rotation
                 with the tuned's, again for the drift and the enrichment)

Both decompose in float64 (equal exactness); the script's figures are checked against
rlmask's (principal energy and rotation at r = 0.1, the rank-1 share) before the times are
reported.

    python bench/bench_spectrum.py [--hidden 1024] [--layers 2] [--device cpu] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _common import llama_shapes, print_table, run_program, summarize

VOCAB = 8192

RLMASK = """
import json, sys, time
import rlmask
rlmask.spectrum  # the API loads on first use: before the clock
import torch
t = time.perf_counter()
r = rlmask.spectrum(sys.argv[1], sys.argv[2], device=sys.argv[3], progress=False)
seconds = time.perf_counter() - t
rows = {x["name"]: x for x in r.rows}
check = {n: [x["principal_energy"]["0.1"], x["rotation"]["0.1"], x["energy_top_k"]["1"]]
         for n, x in rows.items()}
json.dump(check, open(sys.argv[4], "w"))
print(seconds)
"""

SCRIPT = """
import json, math, sys, time
import torch
from safetensors.torch import load_file
t = time.perf_counter()
a = load_file(sys.argv[1] + "/model.safetensors")
b = load_file(sys.argv[2] + "/model.safetensors")
dev = torch.device(sys.argv[3])
out = {}
for n in a:
    if a[n].ndim != 2 or "norm" in n:
        continue
    w = a[n].to(dev, torch.float32); wt = b[n].to(dev, torch.float32)
    d = (wt - w).double(); w = w.double(); wt = wt.double()
    m, k_max = d.shape[0], min(d.shape)
    dsq = float((d ** 2).sum())
    s_d = torch.linalg.svdvals(d)
    top1 = float(s_d[0] ** 2) / dsq
    pe = rot = None
    for r in (0.01, 0.05, 0.1, 0.2):
        k = max(1, math.floor(r * k_max))
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        e = float(((U[:, :k].T @ d @ Vh[:k].T) ** 2).sum()) / dsq
        U2, _, _ = torch.linalg.svd(wt, full_matrices=False)
        U1, _, _ = torch.linalg.svd(w, full_matrices=False)
        cos = torch.linalg.svdvals(U1[:, :k].T @ U2[:, :k]).clamp(0, 1)
        ro = float((1 - cos ** 2).clamp(min=0).sqrt().mean())
        if r == 0.1:
            pe, rot = e, ro
    S1 = torch.linalg.svdvals(w); S2 = torch.linalg.svdvals(wt)
    drift = float((S2 - S1).norm() / S1.norm())
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    k = max(1, math.floor(0.1 * k_max))
    principal = ((U[:, :k] * S[:k]) @ Vh[:k]).abs()
    out[n] = [pe, rot, top1]
seconds = time.perf_counter() - t
json.dump(out, open(sys.argv[4], "w"))
print(seconds)
"""


def write_pair(root: Path, hidden: int, layers: int) -> int:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = llama_shapes(hidden, int(hidden * 2.75), layers, VOCAB, hidden // 4)
    base, tuned = {}, {}
    for name, s in shapes.items():
        w = torch.randn(s, generator=g) * 0.02
        step = torch.randn(s, generator=g) * 2e-4
        base[name] = w.bfloat16()
        tuned[name] = (w + step).bfloat16()
    for side, tensors in (("base", base), ("tuned", tuned)):
        (root / side).mkdir(parents=True, exist_ok=True)
        save_file(tensors, root / side / "model.safetensors")
    return sum(t.numel() for t in base.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        params = write_pair(root, args.hidden, args.layers)
        runs: dict[str, list[dict]] = {"rlmask": [], "script": []}
        checks = {}
        for _ in range(args.repeat):
            for name, program in (("rlmask", RLMASK), ("script", SCRIPT)):
                out = root / f"{name}.json"
                argv = [str(root / "base"), str(root / "tuned"), args.device, str(out)]
                runs[name].append(run_program(program, argv))
                checks[name] = json.loads(out.read_text())
        for n, (pe, rot, top1) in checks["script"].items():
            ours = checks["rlmask"][n]
            assert abs(ours[0] - pe) < 1e-6 and abs(ours[2] - top1) < 1e-6, n
            assert abs(ours[1] - rot) < 1e-5, n
        nbytes = 2 * 2 * params  # both bf16 checkpoints
        table = {name: summarize(runs[name], nbytes) for name in runs}
        print(f"{params:,} parameters, device {args.device}, best of {args.repeat}")
        print_table(table)
        ratio = table["script"]["seconds"] / table["rlmask"]["seconds"]
        print(f"rlmask is {ratio:.2f}x the script's speed, with the same figures")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

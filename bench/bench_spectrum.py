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
        [--randomized-above N]
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
above = None if sys.argv[5] == "exact" else int(sys.argv[5])
t = time.perf_counter()
r = rlmask.spectrum(sys.argv[1], sys.argv[2], device=sys.argv[3], randomized_above=above,
                    progress=False)
seconds = time.perf_counter() - t
rows = {x["name"]: x for x in r.rows}
check = {n: [x["principal_energy"]["0.1"], x["rotation"]["0.1"], x["energy_top_k"]["1"]]
         for n, x in rows.items()}
errors = {}
if above is not None:
    # The randomised path's error against the exact one, on the first layer's matrices and the
    # vocabulary's (after the clock).
    from rlmask._spectrum import matrix_measures
    from safetensors import safe_open
    dev = torch.device(sys.argv[3])
    with safe_open(sys.argv[1] + "/model.safetensors", "pt") as a, \
            safe_open(sys.argv[2] + "/model.safetensors", "pt") as b:
        for n, row in rows.items():
            if ".layers.0." not in n and "layers" in n:
                continue
            w, wt = (f.get_tensor(n).to(dev, torch.float32) for f in (a, b))
            exact = matrix_measures(w, wt)
            for key, value in exact.items():
                if not isinstance(value, (float, dict)) or row[key] is None:
                    continue
                pairs = value.items() if isinstance(value, dict) else [("", value)]
                for sub, v in pairs:
                    got = row[key][sub] if sub else row[key]
                    if v is not None and got is not None:
                        err = abs(got - v) / (abs(v) if key == "spectral_norm" else 1.0)
                        tag = f"{key}@{sub}" if sub else key
                        errors[tag] = max(errors.get(tag, 0.0), err)
json.dump({"check": check, "errors": errors}, open(sys.argv[4], "w"))
print(seconds)
"""

SCRIPT = """
import json, math, sys, time
import torch
from safetensors.torch import load_file
above = None if sys.argv[5] == "exact" else int(sys.argv[5])

def svd(x):
    # Exact, or past the size the randomised top-k decomposition of the same class as
    # rlmask's (rank floor(0.2 min_dim) + 10, 2 power iterations: torch.svd_lowrank).
    if above is None or x.numel() <= above:
        return torch.linalg.svd(x, full_matrices=False)
    rank = min(max(1, math.floor(0.2 * min(x.shape))) + 10, *x.shape)
    u, s, v = torch.svd_lowrank(x, q=rank, niter=2)
    return u, s, v.T

def svdvals(x):
    if above is None or x.numel() <= above:
        return torch.linalg.svdvals(x)
    return torch.svd_lowrank(x, q=min(74, *x.shape), niter=2)[1]

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
    s_d = svdvals(d)
    top1 = float(s_d[0] ** 2) / dsq
    pe = rot = None
    for r in (0.01, 0.05, 0.1, 0.2):
        k = max(1, math.floor(r * k_max))
        U, S, Vh = svd(w)
        e = float(((U[:, :k].T @ d @ Vh[:k].T) ** 2).sum()) / dsq
        U2, _, _ = svd(wt)
        U1, _, _ = svd(w)
        cos = torch.linalg.svdvals(U1[:, :k].T @ U2[:, :k]).clamp(0, 1)
        ro = float((1 - cos ** 2).clamp(min=0).sqrt().mean())
        if r == 0.1:
            pe, rot = e, ro
    if above is None or w.numel() <= above:  # the drift needs whole spectra
        S1 = svdvals(w); S2 = svdvals(wt)
        drift = float((S2 - S1).norm() / S1.norm())
    U, S, Vh = svd(w)
    k = max(1, math.floor(0.1 * k_max))
    principal = ((U[:, :k] * S[:k]) @ Vh[:k]).abs()
    out[n] = [pe, rot, top1]
seconds = time.perf_counter() - t
json.dump({"check": out}, open(sys.argv[4], "w"))
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
    ap.add_argument(
        "--randomized-above",
        type=int,
        help="both sides decompose matrices past this many elements by randomised top-k "
        "(rlmask's path; the script with torch.svd_lowrank of the same rank and iterations); "
        "rlmask's error against its exact path is measured on layer 0 and the vocabulary",
    )
    args = ap.parse_args()
    mode = "exact" if args.randomized_above is None else str(args.randomized_above)
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        params = write_pair(root, args.hidden, args.layers)
        runs: dict[str, list[dict]] = {"rlmask": [], "script": []}
        checks = {}
        for _ in range(args.repeat):
            for name, program in (("rlmask", RLMASK), ("script", SCRIPT)):
                out = root / f"{name}.json"
                argv = [str(root / "base"), str(root / "tuned"), args.device, str(out), mode]
                runs[name].append(run_program(program, argv))
                checks[name] = json.loads(out.read_text())
        for n, (pe, rot, top1) in checks["script"]["check"].items():
            ours = checks["rlmask"]["check"][n]
            if mode == "exact":  # equal figures; randomised, each side its own sketches
                assert abs(ours[0] - pe) < 1e-6 and abs(ours[2] - top1) < 1e-6, n
                assert abs(ours[1] - rot) < 1e-5, n
        nbytes = 2 * 2 * params  # both bf16 checkpoints
        table = {name: summarize(runs[name], nbytes) for name in runs}
        print(f"{params:,} parameters, device {args.device}, best of {args.repeat}")
        print_table(table)
        ratio = table["script"]["seconds"] / table["rlmask"]["seconds"]
        same = "the same figures" if mode == "exact" else f"both randomised above {mode}"
        print(f"rlmask is {ratio:.2f}x the script's speed, {same}")
        errors = checks["rlmask"]["errors"]
        if errors:
            print("rlmask's randomised path against its exact path (layer 0 and vocabulary),")
            print("largest error (absolute; relative for spectral_norm):")
            for key, err in sorted(errors.items()):
                print(f"  {key:<32} {err:.2e}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

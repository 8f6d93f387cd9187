#!/usr/bin/env python3
"""Per-tensor and per-pair overheads (run by hand; issue 25).

(1) Per tensor: two checkpoints of N one-element BF16 tensors (a header of ~70 bytes per
    tensor, as a hostile or an extremely fine-grained file has), against the baseline of the
    same bytes in one tensor, in the same run. ``rlmask diff`` as a table, as JSON, and with
    ``--save-mask``, each in a fresh interpreter; time and peak RSS, and the cost per tensor
    ``(t_many - t_one) / N``. (``--save-mask`` is refused at a million tensors: the mask's
    header would pass the 100 MB safetensors readers accept.)
(2) Per pair: a survey of P pairs of tiny checkpoints (one 64-element tensor each, cache off,
    1 job) for two values of P: the time per pair should not grow with P (it grew linearly with
    P before: the local executor scanned every pending pair at each wake-up).

    python bench/bench_tensors.py --tensors 1000000 --pairs 2000 20000
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
from _common import run_program

DIFF = """
import sys, time
t = time.perf_counter()
from rlmask.cli import cli
cli.main(["diff", *sys.argv[1:], "-q"], prog_name="rlmask", standalone_mode=False)
print(time.perf_counter() - t)
"""

SURVEY = """
import sys, time, rlmask
rlmask.survey  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.survey(sys.argv[1], cache="", jobs=1)
assert r.failed == []
print(time.perf_counter() - t)
"""


def write(path: Path, n: int, flip: float, one: bool, seed: int = 0) -> None:
    """N BF16 elements as N tensors of one element (or, ``one``, a single tensor)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 2**15, n, dtype=np.uint16)
    data ^= (np.random.default_rng(seed + 1).random(n) < flip).astype(np.uint16)
    if one:
        header = {"w": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]}}
    else:
        header = {
            f"model.layers.{i // 1000}.w{i % 1000}": {
                "dtype": "BF16",
                "shape": [1],
                "data_offsets": [2 * i, 2 * i + 2],
            }
            for i in range(n)
        }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data.tobytes())


def per_tensor(root: Path, n: int) -> None:
    for kind, one in (("many", False), ("one", True)):
        write(root / kind / "a" / "model.safetensors", n, 0.0, one)
        write(root / kind / "b" / "model.safetensors", n, 0.3, one)
    print(f"(1) {n:,} one-element tensors against one tensor of {n:,} elements")
    print(
        f"{'output':<12} {'many s':>8} {'one s':>7} {'us/tensor':>10} {'many MB':>8} "
        f"{'one MB':>7} {'KB/tensor':>10}"
    )
    # (--save-mask is refused at this count: the mask's header would pass the 100 MB that
    # safetensors readers accept.)
    for label, extra in (("table", []), ("json", ["--format", "json"])):
        got = {}
        for kind in ("many", "one"):
            out = ["-o", str(root / "out.txt"), *extra]
            got[kind] = run_program(DIFF, [str(root / kind / "a"), str(root / kind / "b"), *out])
        m, o = got["many"], got["one"]
        print(
            f"{label:<12} {m['seconds']:8.2f} {o['seconds']:7.2f} "
            f"{1e6 * (m['seconds'] - o['seconds']) / n:10.2f} {m['rss'] / 1e6:8.0f} "
            f"{o['rss'] / 1e6:7.0f} {(m['rss'] - o['rss']) / 1e3 / n:10.2f}"
        )


def per_pair(root: Path, counts: list[int]) -> None:
    base, tuned = root / "pair" / "base.safetensors", root / "pair" / "tuned.safetensors"
    write(base, 64, 0.0, True)
    write(tuned, 64, 0.3, True)
    print("\n(2) survey, cache off, 1 job")
    print(f"{'pairs':>7} {'seconds':>9} {'ms/pair':>8}")
    for p in counts:
        manifest = root / f"survey-{p}.csv"
        manifest.write_text(
            "name,base,tuned\n" + "".join(f"p{i},{base},{tuned}\n" for i in range(p))
        )
        r = run_program(SURVEY, [str(manifest)])
        print(f"{p:>7} {r['seconds']:9.2f} {1e3 * r['seconds'] / p:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tensors", type=int, default=1_000_000)
    ap.add_argument("--pairs", type=int, nargs="*", default=[2000, 20000])
    ap.add_argument("--dir", type=Path, help="scratch directory [default: a temporary one]")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        if args.tensors:
            per_tensor(root, args.tensors)
        if args.pairs:
            per_pair(root, args.pairs)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark of ``rlmask survey``: the local executor against the Ray executor (run by hand).

Writes 6 pairs of llama-shaped bf16 checkpoints (a 0.1B-parameter shape, 0.2 GB per file,
2.4 GB in all) and a manifest into a scratch directory, warms the page cache, then times in the
same run, each in a fresh interpreter, with the cache off:

  (a) local, 1 job    pairs one after the other, each pass on every core
  (b) local, 2 jobs   two pairs at once
  (c) ray             one Ray task per pair on a local Ray instance of 2 CPUs, the instance
                      started by the survey (its start-up is counted, and also shown apart)

All three must give the same rows.

    python bench/bench_survey.py --repeat 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import READ_FLOOR, llama_shapes, run_program, summarize
from bench_trajectory import _write

SHAPE = (768, 2048, 12, 32000, 4)  # hidden, intermediate, layers, vocab, kv heads: ~0.1B
PAIRS = 6

PROGRAMS = {
    "local, 1 job": """
import sys, time, rlmask
rlmask.survey  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.survey(sys.argv[1], cache="", jobs=1)
print(time.perf_counter() - t, r.tensors["changed"].to_list())
""",
    "local, 2 jobs": """
import sys, time, rlmask
rlmask.survey  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.survey(sys.argv[1], cache="", jobs=2)
print(time.perf_counter() - t, r.tensors["changed"].to_list())
""",
    "ray": """
import sys, time, rlmask
rlmask.survey  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.survey(sys.argv[1], cache="", executor="ray")
print(time.perf_counter() - t, r.tensors["changed"].to_list())
""",
    "ray start-up alone": """
import time, ray
t = time.perf_counter()
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
ray.shutdown()
print(time.perf_counter() - t, "-")
""",
}


def write_study(root: Path) -> tuple[Path, int]:
    rng = np.random.default_rng(0)
    shapes = llama_shapes(*SHAPE[:4], SHAPE[4] * 64)
    lines = []
    params = 0
    for p in range(PAIRS):
        base = {}
        for name, s in shapes.items():
            n = int(np.prod(s))
            bits = rng.integers(0x3C00, 0x3CFF, n, dtype=np.uint16)
            base[name] = (s, bits)
        params = sum(b.size for _, b in base.values())
        _write(root / f"base{p}", base)
        tuned = {
            n: (s, b + (rng.random(b.size, dtype=np.float32) < 0.05 * (p + 1)).astype(np.uint16))
            for n, (s, b) in base.items()
        }
        _write(root / f"tuned{p}", tuned)
        group = "GRPO" if p % 2 else "SFT"
        lines.append(
            f'[[pair]]\nname = "pair{p}"\nbase = "base{p}"\ntuned = "tuned{p}"\ngroup = "{group}"\n'
        )
    (root / "survey.toml").write_text("\n".join(lines))
    return root / "survey.toml", params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dir",
        type=Path,
        help="where to make the scratch directory (a new one inside it; default: the temp dir)",
    )
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlmask-bench-survey-", dir=args.dir))  # never --dir itself
    try:
        manifest, params = write_study(root)
        files = [str(f) for f in sorted(root.rglob("*.safetensors"))]
        nbytes = sum(Path(f).stat().st_size for f in files)
        run_program(READ_FLOOR, files)
        results: dict[str, list[dict]] = {m: [] for m in PROGRAMS}
        for _ in range(args.repeat):
            for m, code in PROGRAMS.items():
                results[m].append(run_program(code, [str(manifest)]))
        outputs = {m: "".join(r[0]["output"]) for m, r in results.items() if "alone" not in m}
        assert len(set(outputs.values())) == 1, outputs
        print(f"{PAIRS} pairs of {params / 1e9:.2f}B parameters, {nbytes / 1e9:.2f} GB")
        print(f"{'method':<20} {'best s':>8} {'median s':>9} {'peak anon MB':>13}")
        for m, runs in results.items():
            r = summarize(runs, nbytes)
            print(
                f"{m:<20} {r['seconds']:8.2f} {r['median_seconds']:9.2f} {r['peak_anon_MB']:13.0f}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark of ``rlmask diff`` against the naive way and a read floor (run by hand).

Writes llama-shaped bf16 checkpoint pairs (sharded, as save_pretrained does) into a scratch
directory, warms the page cache, then times in the same run and on the same warm files:

  (a) rlmask     ``rlmask.diff(base, tuned)`` (memory-mapped, one pass, all cores)
  (b) naive      ``safetensors.torch.load_file`` both checkpoints, then per tensor
                 ``((a.float() - b.float()).abs() <= tol).sum()``: what researchers write today
  (c) read floors one pass that only reads every byte of both checkpoints, the least any
                 comparison must do: ``readinto`` a reused buffer, and memory-mapped and summed
                 as uint64 with numpy (``MMAP_FLOOR``), one thread per core each
  (d) whole commands, timed from outside (interpreter start-up and imports included): the
                 ``rlmask diff BASE TUNED --format json`` command (the console script beside
                 this interpreter) against the naive program run as a script (``python -c``,
                 torch imported inside it); for the bounds, a bare ``python -c pass``,
                 ``python -c "import click"``, and the API alone as a whole program (``import
                 rlmask``, ``rlmask.diff``, print the count: the least any command built on
                 rlmask can do, with no command-line parsing and no report);
                 with this interpreter, and again in a plain virtual environment made for the
                 run (see ``_common.plain_venv``: start-up as a user's environment has it)

Each method runs in its own interpreter, sampled every 5 ms for peak RSS and peak anonymous
memory (RssAnon: heap and other private memory, not the page cache that memory maps share).
Reports wall time (best of --repeat), GB/s of checkpoint bytes, and ratios.

    python bench/bench_diff.py                       # ~1.1B and ~0.3B parameter pairs
    python bench/bench_diff.py --sizes medium        # issue 14's 0.46B pair
    python bench/bench_diff.py --sizes small --dir /tmp/rlmask-bench --keep

Needs numpy, torch and safetensors (the ``dev`` extra) and about 7 GB of free disk.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import (
    MMAP_FLOOR,
    READ_FLOOR,
    llama_shapes,
    plain_venv,
    print_table,
    run_program,
    summarize,
)

# Llama-shaped sizes: hidden, intermediate, layers, vocab, kv heads (head dim 64).
SIZES = {
    "large": (2048, 5632, 22, 32000, 4),  # TinyLlama-1.1B's shape: 1.10B parameters
    "medium": (1024, 2816, 35, 32000, 4),  # 0.46B parameters: issue 14's pair (1.84 GB)
    "small": (1024, 2816, 20, 32000, 4),  # 0.29B parameters
}
SHARD_BYTES = 512 * 2**20
CHANGED = 0.2  # share of elements the synthetic update moves (by one bf16 ULP)


def write_pair(root: Path, shape: tuple) -> int:
    """Writes base/ and tuned/ (sharded, with index); returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    hidden, inter, layers, vocab, kv = shape
    shapes = llama_shapes(hidden, inter, layers, vocab, kv * 64)
    for side in ("base", "tuned"):
        (root / side).mkdir(parents=True, exist_ok=True)
    shard, shard_bytes, k, weight_map = {"base": {}, "tuned": {}}, 0, 1, {}

    def flush() -> None:
        nonlocal shard, shard_bytes, k
        name = f"model-{k:05d}.safetensors"
        for side in ("base", "tuned"):
            save_file(shard[side], str(root / side / name), metadata={"format": "pt"})
        for n in shard["base"]:
            weight_map[n] = name
        shard, shard_bytes, k = {"base": {}, "tuned": {}}, 0, k + 1

    numel = 0
    for name, s in shapes.items():
        n = int(np.prod(s))
        numel += n
        # bf16 bit patterns of N(0, 0.02)-like weights, drawn cheaply: sign, exponent near
        # 2^-6, random mantissa.
        bits = rng.integers(0x3C00, 0x3CFF, n, dtype=np.uint16) | (
            rng.integers(0, 2, n, dtype=np.uint16) << 15
        )
        moved = bits + (rng.random(n, dtype=np.float32) < CHANGED).astype(np.uint16)
        for side, b in (("base", bits), ("tuned", moved)):
            shard[side][name] = torch.from_numpy(b.view(np.int16)).view(torch.bfloat16).reshape(s)
        shard_bytes += 2 * n
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard["base"]:
        flush()
    for side in ("base", "tuned"):
        index = {"metadata": {"total_size": 2 * numel}, "weight_map": weight_map}
        (root / side / "model.safetensors.index.json").write_text(json.dumps(index))
    return numel


# Each method is a small program run in a fresh interpreter; it prints its own wall time and
# the number of changed elements.
PROGRAMS = {
    "rlmask": """
import sys, time, rlmask
rlmask.diff  # the API loads on first use: before the clock
t = time.perf_counter()
r = rlmask.diff(sys.argv[1], sys.argv[2], progress=False)
print(time.perf_counter() - t, r.changed)
""",
    "naive": """
import sys, time, glob, torch
from safetensors.torch import load_file
t = time.perf_counter()
def load(d):
    out = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        out.update(load_file(f))
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
changed = 0
for name, x in a.items():
    changed += int(((x.float() - b[name].float()).abs() > 1e-5).sum())
print(time.perf_counter() - t, changed)
""",
}


# The least a whole program using rlmask does: start, import, diff, print the count.
API_ALONE = """
import sys, rlmask
print(rlmask.diff(sys.argv[1], sys.argv[2], progress=False).changed)
"""


def bench(root: Path, size: str, repeat: int) -> dict:
    numel = write_pair(root, SIZES[size])
    base, tuned = root / "base", root / "tuned"
    nbytes = sum(f.stat().st_size for d in (base, tuned) for f in d.glob("*.safetensors"))
    files = [str(f) for d in (base, tuned) for f in sorted(d.glob("*.safetensors"))]
    programs = {**PROGRAMS, "read-floor": READ_FLOOR, "mmap-floor": MMAP_FLOOR}
    args = {m: [str(base), str(tuned)] for m in PROGRAMS}
    args |= {"read-floor": files, "mmap-floor": files}
    run_program(READ_FLOOR, files)  # warm the page cache
    results: dict[str, list[dict]] = {m: [] for m in programs}
    for _ in range(repeat):  # interleaved, so drift on a shared machine hits every method
        for m, code in programs.items():
            results[m].append(run_program(code, args[m]))
    assert results["rlmask"][0]["output"] == results["naive"][0]["output"], "answers differ"
    summary = {"size": size, "params": numel, "bytes": nbytes}
    for m, runs in results.items():
        summary[m] = summarize(runs, nbytes)
    # The console script installed beside this interpreter, as a virtual environment's user
    # runs it (not a version manager's shim on PATH, which adds its own start-up).
    script = shutil.which("rlmask", path=os.path.dirname(sys.executable)) or "rlmask"
    # pip compiles a package's bytecode when it installs it; an editable install under
    # PYTHONDONTWRITEBYTECODE (as on this project's machines) would compile rlmask's modules
    # from source at every start instead. Compile them once, as an install would have.
    import rlmask

    compileall.compile_dir(Path(rlmask.__file__).parent, quiet=1)
    whole: dict[str, list[float]] = {}
    for where, python in (("here", sys.executable), ("venv", plain_venv(root / "venv"))):
        commands = {
            "command": [python, script, "diff", str(base), str(tuned), "--format", "json"],
            "naive script": [python, "-c", PROGRAMS["naive"], str(base), str(tuned)],
            "bare interpreter": [python, "-c", "pass"],
            "click alone": [python, "-c", "import click"],
            "API alone": [python, "-c", API_ALONE, str(base), str(tuned)],
        }
        for _ in range(repeat):
            for m, cmd in commands.items():
                t = time.perf_counter()
                subprocess.run(cmd, capture_output=True, check=True)
                whole.setdefault(f"{where}: {m}", []).append(time.perf_counter() - t)
    for where in ("here", "venv"):
        summary[where] = {
            "whole_command_s": min(whole[f"{where}: command"]),
            "whole_naive_s": min(whole[f"{where}: naive script"]),
            "bare_interpreter_s": min(whole[f"{where}: bare interpreter"]),
            "click_alone_s": min(whole[f"{where}: click alone"]),
            "api_alone_s": min(whole[f"{where}: API alone"]),
        }
    summary["speedup_vs_naive"] = summary["naive"]["seconds"] / summary["rlmask"]["seconds"]
    summary["share_of_read_floor"] = summary["read-floor"]["seconds"] / summary["rlmask"]["seconds"]
    summary["share_of_mmap_floor"] = summary["mmap-floor"]["seconds"] / summary["rlmask"]["seconds"]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="large,small", help="comma-separated: large, medium, small")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--dir",
        type=Path,
        help="where to make the scratch directory (a new one inside it; default: the temp dir)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = ap.parse_args()
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}", flush=True)
    for size in args.sizes.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"rlmask-bench-{size}-", dir=args.dir))
        try:
            s = bench(root, size, args.repeat)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        print(f"\n{size}: {s['params'] / 1e9:.2f}B parameters, {s['bytes'] / 1e9:.2f} GB read")
        print_table({m: s[m] for m in ("rlmask", "naive", "read-floor", "mmap-floor")})
        print(
            f"rlmask is {s['speedup_vs_naive']:.1f}x faster than naive and reaches "
            f"{100 * s['share_of_read_floor']:.0f}% of the read floor's throughput, "
            f"{100 * s['share_of_mmap_floor']:.0f}% of the memory-mapped floor's"
        )
        for where, what in (("here", "this interpreter"), ("venv", "a plain virtual env")):
            w = s[where]
            # No command can beat its own pass plus an interpreter that imports nothing.
            bound = s["rlmask"]["seconds"] + w["bare_interpreter_s"]
            print(
                f"whole commands in {what}: rlmask diff --format json "
                f"{w['whole_command_s']:.3f} s, naive script {w['whole_naive_s']:.3f} s: "
                f"{w['whole_naive_s'] / w['whole_command_s']:.1f}x; bound: a bare interpreter "
                f"({w['bare_interpreter_s']:.3f} s) plus the in-process diff = {bound:.3f} s, "
                f"at most {w['whole_naive_s'] / bound:.1f}x with no imports at all"
            )
            # Nor can any program beat a bare interpreter plus touching every byte once.
            floor = s["mmap-floor"]["seconds"] + w["bare_interpreter_s"]
            print(
                f"  hardware bound: a bare interpreter plus the memory-mapped floor = "
                f"{floor:.3f} s, at most {w['whole_naive_s'] / floor:.1f}x for any program "
                f"that reads every byte once on this machine"
            )
            # The command-line library's import is part of every command.
            with_click = s["rlmask"]["seconds"] + w["click_alone_s"]
            print(
                f"  with click imported and nothing else ({w['click_alone_s']:.3f} s for "
                f"`python -c 'import click'`): {with_click:.3f} s, at most "
                f"{w['whole_naive_s'] / with_click:.1f}x"
            )
            # Nor can a command on click beat click's import plus the memory-mapped floor.
            click_floor = s["mmap-floor"]["seconds"] + w["click_alone_s"]
            print(
                f"  click imported plus the memory-mapped floor: {click_floor:.3f} s, at most "
                f"{w['whole_naive_s'] / click_floor:.1f}x for any command on click"
            )
            print(
                f"  the API alone as a whole program (import rlmask, rlmask.diff, print the "
                f"count): {w['api_alone_s']:.3f} s, {w['whole_naive_s'] / w['api_alone_s']:.1f}x"
            )
        print(json.dumps(s), flush=True)


if __name__ == "__main__":
    main()

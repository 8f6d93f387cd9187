#!/usr/bin/env python3
"""End-to-end weight sync of a ~1B-parameter pair (issue 31; run by hand): a trainer's step
shipped to a server that holds the previous weights, against shipping the full bf16 weights.

A llama-shaped bf16 model of 1.1B parameters (TinyLlama's shapes) is written as ``base`` and a
step of it (``--changed`` of every tensor's elements moved by 1 to 3 units in the last place) as
``tuned``; the server holds a copy of ``base``. Timed, each in a fresh interpreter, warm:

- **full**: every file of ``tuned`` sent through a pipe (``cat`` into a pipe, the receiver
  writing it into the server's directory), then synced: the sync every RL stack can do;
- **patch**: ``rlmask.patch.create(base, tuned)`` on the trainer, the patch sent through a pipe
  the same way, ``rlmask.patch.apply_in_place`` on the server's directory (checked against
  every fingerprint, crash-safe).

Both end with the server's files byte-identical to ``tuned`` (checked). Bytes through the pipe
are reported with the time they would add on a 10 Gb/s link (1.25 GB/s), since a pipe on one
machine is far faster than any network.

    python bench/bench_sync.py [--changed 0.01] [--repeat 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import llama_shapes, write_bf16

SHAPE = (2048, 5632, 22, 32000, 256)  # TinyLlama-1.1B: hidden, intermediate, layers, vocab, kv
LINK = 1.25e9  # bytes per second of a 10 Gb/s link

CREATE = """
import sys, time, rlmask.patch
t = time.perf_counter()
rlmask.patch.create(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
print(time.perf_counter() - t)
"""
APPLY = """
import sys, time, rlmask.patch
t = time.perf_counter()
rlmask.patch.apply_in_place(sys.argv[1], [sys.argv[2]], progress=False)
print(time.perf_counter() - t)
"""


def make(root: Path, changed: float) -> int:
    rng = np.random.default_rng(0)
    base, tuned = {}, {}
    for name, shape in llama_shapes(*SHAPE).items():
        w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).view(np.uint32)
        bits = (w >> 16).astype(np.uint16)
        moved = rng.random(shape, dtype=np.float32) < changed
        step = rng.integers(1, 4, shape, dtype=np.int16) * rng.choice(
            np.array([-1, 1], np.int16), shape
        )
        base[name] = bits
        tuned[name] = np.where(moved, (bits.astype(np.int32) + step).astype(np.uint16), bits)
    write_bf16(root / "base", base)
    write_bf16(root / "tuned", tuned)
    return sum(b.size for b in base.values())


def send(files: list[Path], dest: Path) -> tuple[float, int]:
    """``cat`` of the files into a pipe, the receiver writing them into ``dest``, synced."""
    t = time.perf_counter()
    sent = 0
    for f in files:
        sender = subprocess.Popen(["cat", str(f)], stdout=subprocess.PIPE)
        assert sender.stdout is not None
        with open(dest / f.name, "wb") as out:
            while chunk := sender.stdout.read(1 << 22):
                out.write(chunk)
                sent += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        sender.wait()
    return time.perf_counter() - t, sent


def run(code: str, *args: str) -> float:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return float(out.stdout.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rlmask-bench-sync-", dir=args.dir))
    try:
        params = make(root, args.changed)
        tuned = root / "tuned"
        size = (tuned / "model.safetensors").stat().st_size
        print(
            f"{params / 1e9:.2f}B parameters, {size / 1e9:.2f} GB; {100 * args.changed:g}% changed"
        )
        full, patched = [], []
        for _ in range(args.repeat):
            server = root / "server"
            shutil.rmtree(server, ignore_errors=True)
            server.mkdir()
            t, sent_full = send([tuned / "model.safetensors"], server)
            assert filecmp.cmp(server / "model.safetensors", tuned / "model.safetensors", False)
            full.append(t)

            shutil.rmtree(server)
            shutil.copytree(root / "base", server)
            subprocess.run(["sync"], check=True)
            patch = root / "step.rlpatch"
            patch.unlink(missing_ok=True)
            c = run(CREATE, str(root / "base"), str(tuned), str(patch))
            inbox = root / "inbox"
            shutil.rmtree(inbox, ignore_errors=True)
            inbox.mkdir()
            s, sent_patch = send([patch], inbox)
            a = run(APPLY, str(server), str(inbox / patch.name))
            assert filecmp.cmp(server / "model.safetensors", tuned / "model.safetensors", False)
            patched.append((c, s, a))
        c, s, a = min(patched, key=sum)
        f = min(full)
        print(f"full weights: {f:.3f} s (pipe, write, sync), {sent_full / 1e9:.3f} GB sent")
        print(
            f"patch: create {c:.3f} s + pipe {s:.3f} s + apply in place {a:.3f} s = "
            f"{c + s + a:.3f} s, {sent_patch / 1e9:.3f} GB sent "
            f"({sent_patch / sent_full:.3f} of the full weights)"
        )
        print(
            f"over a 10 Gb/s link add {sent_full / LINK:.2f} s to the full sync and "
            f"{sent_patch / LINK:.3f} s to the patch: {f + sent_full / LINK:.2f} s against "
            f"{c + s + a + sent_patch / LINK:.2f} s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

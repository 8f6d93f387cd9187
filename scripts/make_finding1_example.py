#!/usr/bin/env python3
"""Writes the bundled example ``python/rlmask/examples/finding1`` from the Finding 1 study.

Runs ``examples/finding1/study.py`` into a scratch folder (or reads a study already run, with
``--from OUT``) and keeps what ``rlmask demo`` reads: the bf16 base, the first two RL seeds'
final checkpoints, seed 1's fp32 master weights (for the precision null), seed 1 of the SFT
step count matched to RL's KL from the base (``results.json["matched_sft_steps"]["kl"]``) and
seed 1's run (its four intermediate checkpoints), each a single ``model.safetensors`` whose
metadata records its provenance (script, kind, seed, learning rate, versions). About 1.5 MB.

Training on CPUs of another kind may not reproduce these files bit for bit; CI reruns the study's
``--quick`` form and recomputes its figures instead (tests/test_finding1.py).

    python scripts/make_finding1_example.py [DEST] [--from STUDY_OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def keep(study: Path, dest: Path) -> None:
    res = json.loads((study / "results.json").read_text())
    steps = res["matched_sft_steps"]["kl"]
    run = sorted((study / "rl-seed1").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    wanted = {
        "base": "base",
        "rl-seed1": "rl-seed1/final",
        "rl-seed1-master": "rl-seed1/final-master",
        "rl-seed2": "rl-seed2/final",
        "sft": f"sft-{steps}/seed1",
        **{f"run-seed1/{c.name}": f"rl-seed1/{c.name}" for c in run},
    }
    if dest.exists():
        shutil.rmtree(dest)
    for name, source in wanted.items():
        (dest / name).mkdir(parents=True)
        shutil.copy(study / source / "model.safetensors", dest / name / "model.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dest", nargs="?", type=Path, default=ROOT / "python/rlmask/examples/finding1")
    ap.add_argument("--from", dest="source", type=Path, help="a study's --out folder, already run")
    args = ap.parse_args()
    if args.source is not None:
        keep(args.source, args.dest)
    else:
        with tempfile.TemporaryDirectory(prefix="rlmask-finding1-") as tmp:
            study = ROOT / "examples" / "finding1" / "study.py"
            subprocess.run([sys.executable, str(study), "--out", tmp], check=True)
            keep(Path(tmp), args.dest)
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()

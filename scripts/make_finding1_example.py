#!/usr/bin/env python3
"""Writes the bundled example ``python/rlmask/examples/finding1`` from the Finding 1 study.

Runs ``examples/finding1/study.py`` (about a minute on 2 CPU cores) into a scratch folder and
keeps what ``rlmask demo`` reads: the bf16 base, the two RL seeds' final checkpoints, the SFT
checkpoint and seed 1's run (``checkpoint-25`` ... ``checkpoint-100``), each a single
``model.safetensors`` whose metadata records its provenance (script, kind, seed, learning rate,
versions). About 1.2 MB in all.

Training on CPUs of another kind may not reproduce these files bit for bit; CI reruns the study's
``--quick`` form and recomputes its figures instead (tests/test_finding1.py).

    python scripts/make_finding1_example.py [OUT_DIR]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEP = {
    "base": "base",
    "rl-seed1": "rl-seed1/final",
    "rl-seed2": "rl-seed2/final",
    "sft": "sft",
    **{f"run-seed1/checkpoint-{s}": f"rl-seed1/checkpoint-{s}" for s in (25, 50, 75, 100)},
}


def main() -> None:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "python/rlmask/examples/finding1"
    with tempfile.TemporaryDirectory(prefix="rlmask-finding1-") as tmp:
        study = ROOT / "examples" / "finding1" / "study.py"
        subprocess.run([sys.executable, str(study), "--out", tmp], check=True)
        if dest.exists():
            shutil.rmtree(dest)
        for name, source in KEEP.items():
            (dest / name).mkdir(parents=True)
            shutil.copy(Path(tmp) / source / "model.safetensors", dest / name / "model.safetensors")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()

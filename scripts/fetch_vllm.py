#!/usr/bin/env python3
"""Fetches vLLM's checkpoint-patch module, unmodified, from the vLLM wheel on PyPI, for
tests/test_vllm.py (run by .ci/run).

vLLM's wheel pins its own torch (vllm 0.34.0: torch==2.14.0) and CUDA libraries, so installing
it would replace the test environment's torch; its patch module
(``vllm/model_executor/model_loader/checkpoint_weight_patch.py``: ``CheckpointWeightPatch`` and
``load_checkpoint_weight_patches``) imports only torch. This script downloads the wheel without
its dependencies, checks it, and extracts that one file (and the wheel's METADATA) into
``.deps/vllm/``.

    python scripts/fetch_vllm.py [--version 0.34.0]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODULE = "vllm/model_executor/model_loader/checkpoint_weight_patch.py"
DEST = Path(__file__).resolve().parents[1] / ".deps" / "vllm"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default="0.34.0")
    args = ap.parse_args()
    stamp = DEST / "VERSION"
    if stamp.is_file() and stamp.read_text().split()[0] == args.version:
        print(f"vLLM {args.version} patch module already in {DEST}")
        return
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                d,
                f"vllm=={args.version}",
            ],
            check=True,
        )
        (wheel,) = Path(d).glob("vllm-*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        DEST.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            (DEST / "checkpoint_weight_patch.py").write_bytes(z.read(MODULE))
        stamp.write_text(f"{args.version} {wheel.name} sha256:{digest}\n")
    print(f"vLLM {args.version}: {MODULE} -> {DEST}")


if __name__ == "__main__":
    main()

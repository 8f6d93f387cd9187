"""The example checkpoint family bundled with rlmask.

``tiny-llama`` is a llama-shaped model (4 layers, hidden size 64, vocabulary 512; about 250k
parameters in bf16) with a base checkpoint and two tuned checkpoints. The data is synthetic:
the tuned checkpoints are the base plus small, mostly shared, Adam-like updates accumulated in
float32 and rounded to bf16, which leaves most elements bit-identical, as RL finetuning does.
They are made by ``scripts/make_example.py`` and are not the result of real training.
"""

from __future__ import annotations

from pathlib import Path

#: Directory of the bundled examples.
EXAMPLES_DIR = Path(__file__).resolve().parent

#: The bundled checkpoints of the ``tiny-llama`` family.
NAMES = ("base", "tuned-seed1", "tuned-seed2")


def example_path(name: str = "base") -> Path:
    """The directory of one bundled checkpoint: ``base``, ``tuned-seed1`` or ``tuned-seed2``."""
    if name not in NAMES:
        raise ValueError(f"unknown example '{name}' (one of {', '.join(NAMES)})")
    return EXAMPLES_DIR / "tiny-llama" / name

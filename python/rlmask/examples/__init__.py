"""The example checkpoints bundled with rlmask.

``finding1`` holds weights that training produced: the Finding 1 study
(``examples/finding1/study.py``) pretrains a 76k-parameter llama-shaped model on two-digit
addition (the bf16 ``base``), then runs RL with TRL's ``GRPOTrainer`` (``rl-seed1``,
``rl-seed2``, seed 1's fp32 master weights ``rl-seed1-master`` and its checkpoints in
``run-seed1``) and SFT with TRL's ``SFTTrainer`` (``sft``: seed 1 of the step count matched
to RL's KL from the base). Made by ``scripts/make_finding1_example.py``; ``rlmask demo``
tells the story on them.

``tiny-llama`` (the test suite's fixture) is a llama-shaped model (4 layers, hidden size 64,
vocabulary 512; about 250k parameters in bf16) with a base checkpoint and two tuned checkpoints.
The data is synthetic: the tuned checkpoints are the base plus small, mostly shared, Adam-like
updates accumulated in float32 and rounded to bf16, which leaves most elements bit-identical.
They are made by ``scripts/make_example.py`` and are not the result of real training.
"""

from __future__ import annotations

from pathlib import Path

#: Directory of the bundled examples.
EXAMPLES_DIR = Path(__file__).resolve().parent

#: The bundled checkpoints of the ``tiny-llama`` family.
NAMES = ("base", "tuned-seed1", "tuned-seed2")


#: The bundled checkpoints of the ``finding1`` family (``run-seed1`` is a run directory).
TRAINED = ("base", "rl-seed1", "rl-seed1-master", "rl-seed2", "sft", "run-seed1")


def trained_path(name: str = "base") -> Path:
    """One bundled checkpoint of the trained ``finding1`` family (see :data:`TRAINED`)."""
    if name not in TRAINED:
        raise ValueError(f"unknown example '{name}' (one of {', '.join(TRAINED)})")
    return EXAMPLES_DIR / "finding1" / name


def example_path(name: str = "base") -> Path:
    """The directory of one bundled checkpoint: ``base``, ``tuned-seed1`` or ``tuned-seed2``."""
    if name not in NAMES:
        raise ValueError(f"unknown example '{name}' (one of {', '.join(NAMES)})")
    return EXAMPLES_DIR / "tiny-llama" / name

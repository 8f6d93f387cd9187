#!/usr/bin/env python3
"""Cost of rlmask's sync-cost callback (issue 13) on a Trainer's step time (run by hand).

Trains a 16M-parameter bf16 llama-shaped model for 30 steps on the CPU with a plain Trainer,
without the callback, with ``track_sync(every=1)`` and with ``every=10`` (the first two twice,
interleaved), and prints the time per step and what the measurement itself took (the
``rlmask/measure_seconds`` the callback logs).

    python bench/bench_sync_callback.py
"""

from __future__ import annotations

import tempfile
import time
import warnings

import torch
import transformers
from transformers import Trainer, TrainingArguments

from rlmask.integrations.transformers import track_sync

STEPS = 30
CONFIG = transformers.LlamaConfig(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=128,
)


def run(every: int | None, data: list[dict[str, torch.Tensor]]) -> tuple[float, list[float], int]:
    """Seconds for the run, the measurement times logged, the parameter count."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(CONFIG).to(torch.bfloat16)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=1e-4,
        logging_steps=1000,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    if every is not None:
        track_sync(trainer, every=every)
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    key = "rlmask/measure_seconds"
    measured = [h[key] for h in trainer.state.log_history if key in h]
    return seconds, measured, sum(p.numel() for p in model.parameters())


def main() -> None:
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG.vocab_size, (400, 64), generator=g)
    data = [{"input_ids": x, "labels": x} for x in ids]
    for every in (None, 1, 10, None, 1):
        seconds, measured, n = run(every, data)
        mean = 1000 * sum(measured) / len(measured) if measured else 0.0
        print(
            f"every={every} ({n / 1e6:.1f}M parameters): {1000 * seconds / STEPS:.1f} ms per "
            f"step; measurement {mean:.1f} ms on each of {len(measured)} measured steps"
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Conjecture 1 at toy scale, for real (paper §1 and §4).

A tiny causal language model (llama-shaped, built from a config: no download) is trained in
bfloat16 on data generated here (arithmetic progressions modulo the vocabulary):

1. train fully from θ_init, giving θ_full;
2. take the subnetwork mask θ_init vs θ_full (rlmask.diff at the paper's tolerance, 1e-5);
3. train again from θ_init on the same data, seed and hyperparameters with the mask attached
   (rlmask.torch.attach_mask), giving θ_sub;
4. report the share of identical weights between θ_sub and θ_full at 1e-5 and 1e-4, both final
   losses, the mask density, and whether every element outside the mask stayed bit-identical.

It reports what it measures; it does not assert the paper's outcome.

    python examples/conjecture1.py [--steps 200] [--layers 2] [--hidden 64] [--lr 1e-5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import rlmask
from rlmask.torch import attach_mask

VOCAB, SEQ, BATCH = 97, 24, 16


def batches(steps: int, seed: int) -> list[torch.Tensor]:
    """Arithmetic progressions (a + t*b) mod VOCAB: learnable, and the same for both runs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        a = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
        b = torch.randint(1, 8, (BATCH, 1), generator=g)
        out.append((a + b * torch.arange(SEQ)) % VOCAB)
    return out


def train(model: LlamaForCausalLM, data: list[torch.Tensor], lr: float, mask: Any = None) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    handle = attach_mask(model, mask, opt) if mask is not None else None
    losses = []
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    if handle is not None:
        handle.remove()
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}


def run(
    steps: int = 200,
    layers: int = 2,
    hidden: int = 64,
    lr: float = 1e-5,
    seed: int = 0,
    workdir: str | Path | None = None,
) -> dict[str, Any]:
    """Runs the experiment; returns its figures."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    theta_init = state(model)
    data = batches(steps, seed + 1)
    tmp = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="conj1-"))
    save_file(theta_init, tmp / "init.safetensors")

    torch.manual_seed(seed + 2)
    loss_full = train(model, data, lr)
    save_file(state(model), tmp / "full.safetensors")
    mask = rlmask.diff(
        tmp / "init.safetensors", tmp / "full.safetensors", mask=True, progress=False
    ).mask
    assert mask is not None

    model.load_state_dict(theta_init, strict=False)
    torch.manual_seed(seed + 2)
    loss_sub = train(model, data, lr, mask)
    save_file(state(model), tmp / "sub.safetensors")

    same = {
        t: rlmask.diff(
            tmp / "sub.safetensors", tmp / "full.safetensors", tol=t, progress=False
        ).sparsity
        for t in (1e-5, 1e-4)
    }
    moved = rlmask.diff(
        tmp / "init.safetensors",
        tmp / "sub.safetensors",
        criterion="exact",
        mask=True,
        progress=False,
    ).mask
    assert moved is not None
    return {
        "steps": steps,
        "parameters": mask.numel,
        "mask_density": mask.density,
        "identical_1e-05": same[1e-5],
        "identical_1e-04": same[1e-4],
        "loss_full": loss_full,
        "loss_sub": loss_sub,
        "frozen_identical": (moved - mask).count == 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = run(a.steps, a.layers, a.hidden, a.lr, a.seed)
    print(json.dumps(out, indent=2))
    print(
        f"\nmask density {100 * out['mask_density']:.2f}%; θ_sub vs θ_full identical: "
        f"{100 * out['identical_1e-05']:.2f}% at 1e-5, {100 * out['identical_1e-04']:.2f}% "
        f"at 1e-4; final loss full {out['loss_full']:.4f}, subnetwork {out['loss_sub']:.4f}"
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the bundled example family ``python/rlmask/examples/tiny-llama`` (synthetic data).

A llama-shaped model (Hugging Face tensor names, 4 layers, hidden 64, GQA with 2 KV heads,
vocabulary 512) in bf16: a base checkpoint and two tuned checkpoints, each sharded in two files
with a ``model.safetensors.index.json``, as ``save_pretrained`` writes them.

The tuned checkpoints are synthetic, not trained: each is the float32 master copy of the base
plus an Adam-like update of 64 steps (a direction shared by both "seeds" plus seed-specific
noise), rounded to bf16 once at the end. As in RL finetuning with tiny learning rates, most of
those updates are smaller than half a bf16 ULP and vanish in the rounding, so most elements stay
bit-identical; layer norms (values near 1, with large ULPs) almost never change, and the
embeddings of the 128 tokens the "data" never uses get no update at all.

Deterministic: running it again writes the same bytes (a test checks this). Needs numpy, torch
and safetensors (the ``dev`` extra).

    python scripts/make_example.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 512, 64, 176, 4, 4, 2
UNUSED_TOKENS = 128
STEPS, LR = 64, 1e-6
HEAD_DIM = HIDDEN // HEADS


def shapes() -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        out[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        out[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        out[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        out[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        out[p + "input_layernorm.weight"] = (HIDDEN,)
        out[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def base_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    w = {}
    for name, shape in shapes().items():
        if name.endswith("norm.weight"):
            w[name] = (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        else:
            w[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return w


def tuned_weights(base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    shared = np.random.default_rng(1234)  # the "signal" both seeds follow
    own = np.random.default_rng(seed)
    out = {}
    for name, w in base.items():
        # A persistent per-element drift (shared) plus per-step noise (seed-specific): the sum
        # of STEPS sign-like Adam steps of size LR.
        drift = shared.standard_normal(w.shape).astype(np.float32)
        noise = own.standard_normal(w.shape).astype(np.float32)
        layer = int(name.split(".")[2]) if ".layers." in name else LAYERS
        scale = LR * (0.6 + 0.2 * layer)  # later layers move a little more
        delta = scale * (0.25 * STEPS * np.tanh(drift) + np.sqrt(STEPS) * noise)
        if name == "model.embed_tokens.weight":
            delta[VOCAB - UNUSED_TOKENS :] = 0.0
        out[name] = w + delta.astype(np.float32)
    return out


def save(weights: dict[str, np.ndarray], out: Path) -> None:
    """Two shards and an index, tensors split in name order."""
    out.mkdir(parents=True, exist_ok=True)
    names = list(weights)
    half = len(names) // 2
    shard_names = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    weight_map, total = {}, 0
    for shard, part in zip(shard_names, (names[:half], names[half:]), strict=True):
        tensors = {}
        for n in part:
            bits = to_bf16(weights[n])
            tensors[n] = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
            weight_map[n] = shard
            total += bits.nbytes
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def main(root: Path) -> None:
    base = base_weights(np.random.default_rng(0))
    save(base, root / "base")
    for seed in (1, 2):
        save(tuned_weights(base, seed), root / f"tuned-seed{seed}")
    print(f"wrote {root}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "python" / "rlmask" / "examples" / "tiny-llama"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)

#!/usr/bin/env python3
"""Finding 1 on weights that training produced: RL against SFT on a tiny model, read with rlmask.

    python examples/finding1/study.py                 # the study (a few minutes, 2 CPU cores)
    python examples/finding1/study.py --quick --out /tmp/f1   # about a minute, for CI

A llama-shaped model of 76k parameters (transformers ``LlamaForCausalLM``) is pretrained from
scratch on two-digit addition and stopped at partial competence, then saved as the bf16 base.
From it, with fp32 master weights and bf16 checkpoints as RL stacks do:

- RL with TRL's ``GRPOTrainer`` (reward: the exact answer), two seeds, intermediate checkpoints;
- SFT with TRL's ``SFTTrainer`` on the same prompts with the gold answers;
- controls: the same RL run saved in fp32, and a run that keeps pure bf16 weights;
- a sweep of learning rate x steps;
- Conjecture 1: RL again, training only the first seed's subnetwork (``MaskCallback``).

rlmask then measures every run (sparsity exact and at 1e-5, seed and RL-vs-SFT overlaps with the
uniform and the magnitude-matched baselines, update rank, the trajectory). Everything lands in
``OUT/results.json``; ``--report`` also writes ``RESULTS.md`` beside this script. The finding is
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import rlmask

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
CHARS = "0123456789+="
VOCAB = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    tok.padding_side = "left"
    return tok


def new_model(seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def problems(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append((f"{a}+{b}=", str(a + b)))
    return out


@torch.no_grad()
def accuracy(model: Any, tok: Any, rows: list[tuple[str, str]]) -> float:
    """Exact-answer accuracy, greedy decoding (the reward's mean)."""
    model.eval()
    enc = tok(["<bos>" + p for p, _ in rows], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=1)
    n = enc["input_ids"].shape[1]
    ok = sum(
        tok.decode(o[n:], skip_special_tokens=True).replace(" ", "") == ans
        for (_, ans), o in zip(rows, out, strict=True)
    )
    model.train()
    return ok / len(rows)


def pretrain(tok: Any, eval_rows: list, target: float, max_steps: int) -> tuple[Any, int, float]:
    """Next-token training on ``a+b=c`` (loss on the answer) until exact accuracy reaches
    ``target``: a base of partial competence."""
    model = new_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = problems(64 * max_steps, seed=1)
    acc, step = 0.0, 0
    for step in range(1, max_steps + 1):
        batch = rows[64 * (step - 1) : 64 * step]
        enc = tok(["<bos>" + p + a + "<eos>" for p, a in batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        eq = (labels == VOCAB["="]).int().argmax(1)
        labels[torch.arange(labels.shape[1])[None] <= eq[:, None]] = -100
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            acc = accuracy(model, tok, eval_rows)
            if acc >= target:
                break
    return model, step, acc


def save(model: Any, folder: Path, dtype: torch.dtype, meta: dict[str, str]) -> Path:
    """The weights as ``dtype`` with provenance in the safetensors metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt", **meta})
    model.config.to_json_file(folder / "config.json")
    return folder


def provenance(**extra: Any) -> dict[str, str]:
    import transformers
    import trl

    return {
        "script": "examples/finding1/study.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "rlmask": rlmask.__version__,
        **{k: str(v) for k, v in extra.items()},
    }


def load(folder: Path, dtype: torch.dtype) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, torch_dtype=dtype)


def grpo(
    base: Path,
    tok: Any,
    *,
    seed: int,
    lr: float,
    steps: int,
    dtype: torch.dtype = torch.float32,
    save_every: int = 0,
    out: Path | None = None,
    callbacks: list | None = None,
) -> Any:
    """RL from the base with TRL's GRPOTrainer; reward 1 for the exact answer."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = problems(16 * steps, seed=100 + seed)
    ds = Dataset.from_dict(
        {"prompt": ["<bos>" + p for p, _ in rows], "answer": [a for _, a in rows]}
    )

    def reward(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return [
            float(c.replace(" ", "").strip() == a) for c, a in zip(completions, answer, strict=True)
        ]

    class Checkpoints(TrainerCallback):
        def on_step_end(
            self, args: Any, state: Any, control: Any, model: Any = None, **_: Any
        ) -> None:
            if save_every and out is not None and state.global_step % save_every == 0:
                save(
                    model,
                    out / f"checkpoint-{state.global_step}",
                    torch.bfloat16,
                    provenance(kind="rl", seed=seed, lr=lr, step=state.global_step),
                )

    model = load(base, dtype)
    cfg = GRPOConfig(
        output_dir=str((out or base.parent) / f".trl-{seed}"),
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=4,
        learning_rate=lr,
        max_steps=steps,
        logging_steps=max(1, steps),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        seed=seed,
        beta=0.0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Checkpoints(), *(callbacks or [])],
    )
    trainer.train()
    return trainer.model


def sft(base: Path, tok: Any, *, seed: int, lr: float, steps: int, out: Path) -> Any:
    """SFT from the base with TRL's SFTTrainer on the same prompts with gold answers."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = problems(16 * steps, seed=100 + seed)
    ds = Dataset.from_dict(
        {"prompt": ["<bos>" + p for p, _ in rows], "completion": [a + "<eos>" for _, a in rows]}
    )
    cfg = SFTConfig(
        output_dir=str(out / f".trl-sft-{seed}"),
        per_device_train_batch_size=16,
        learning_rate=lr,
        max_steps=steps,
        logging_steps=max(1, steps),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(
        model=load(base, torch.float32), args=cfg, train_dataset=ds, processing_class=tok
    )
    trainer.train()
    return trainer.model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer steps, no sweep")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="where checkpoints go")
    ap.add_argument("--report", action="store_true", help="also write RESULTS.md beside the script")
    args = ap.parse_args()
    torch.set_num_threads(2)
    quick = args.quick
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    tok = tokenizer()
    eval_rows = problems(200, seed=7)

    def timed(name: str, t: float) -> None:
        timings[name] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    model, pre_steps, pre_acc = pretrain(
        tok, eval_rows, target=0.45, max_steps=300 if quick else 3000
    )
    base = save(model, out / "base", torch.bfloat16, provenance(kind="base", steps=pre_steps))
    timed("pretrain", t)
    reward_base = accuracy(load(base, torch.float32), tok, eval_rows)

    rl_lr, rl_steps = 1e-5, 20 if quick else 100
    sft_lr, sft_steps = 1e-5, 20 if quick else 200
    runs: list[dict[str, Any]] = []

    def record(
        name: str,
        kind: str,
        seed: int,
        lr: float,
        steps: int,
        precision: str,
        model: Any,
        folder: Path,
    ) -> None:
        tol = rlmask.diff(base, folder, progress=False)
        exact = rlmask.diff(base, folder, criterion="exact", progress=False)
        runs.append(
            {
                "name": name,
                "kind": kind,
                "seed": seed,
                "lr": lr,
                "steps": steps,
                "precision": precision,
                "path": os.path.relpath(folder, out),
                "sparsity_exact": exact.sparsity,
                "sparsity_tol": tol.sparsity,
                "sparsity_tol_by_module": dict(
                    zip(tol.by_module()["module"], tol.by_module()["sparsity"], strict=True)
                ),
                "reward_before": reward_base,
                # Measured on the checkpoint as saved, so anyone can recompute it from the file.
                "reward_after": accuracy(load(folder, torch.float32), tok, eval_rows),
            }
        )

    t = time.perf_counter()
    # What syncing seed 1's bf16 weights to an inference engine after every step would send.
    from rlmask.integrations.transformers import SyncCostCallback

    sync = SyncCostCallback(every=1, dtype=torch.bfloat16)
    for seed in (1, 2):
        run = out / f"rl-seed{seed}"
        m = grpo(
            base,
            tok,
            seed=seed,
            lr=rl_lr,
            steps=rl_steps,
            save_every=max(1, rl_steps // 4) if seed == 1 else 0,
            out=run,
            callbacks=[sync] if seed == 1 else None,
        )
        folder = save(
            m,
            run / "final",
            torch.bfloat16,
            provenance(kind="rl", seed=seed, lr=rl_lr, steps=rl_steps),
        )
        record(
            f"rl-seed{seed}", "rl", seed, rl_lr, rl_steps, "fp32 master, bf16 checkpoint", m, folder
        )
        if seed == 1:
            f32 = save(m, out / "rl-seed1-fp32", torch.float32, provenance(kind="rl", seed=1))
            record("rl-seed1-fp32", "rl", 1, rl_lr, rl_steps, "fp32 checkpoint", m, f32)
    timed("rl", t)

    t = time.perf_counter()
    m = grpo(base, tok, seed=1, lr=rl_lr, steps=rl_steps, dtype=torch.bfloat16, out=out / "rl-bf16")
    folder = save(m, out / "rl-bf16", torch.bfloat16, provenance(kind="rl", seed=1, pure_bf16=True))
    record("rl-pure-bf16", "rl", 1, rl_lr, rl_steps, "pure bf16 weights", m, folder)
    timed("rl_pure_bf16", t)

    t = time.perf_counter()
    m = sft(base, tok, seed=1, lr=sft_lr, steps=sft_steps, out=out)
    folder = save(m, out / "sft", torch.bfloat16, provenance(kind="sft", seed=1, lr=sft_lr))
    record("sft", "sft", 1, sft_lr, sft_steps, "fp32 master, bf16 checkpoint", m, folder)
    timed("sft", t)

    t = time.perf_counter()
    sweep = (
        [(1e-6, rl_steps), (1e-4, rl_steps)]
        if quick
        else [(lr, st) for lr in (1e-6, 1e-5, 1e-4) for st in (25, 100, 400)]
    )
    for lr, st in sweep:
        if (lr, st) == (rl_lr, rl_steps):
            continue
        m = grpo(base, tok, seed=1, lr=lr, steps=st, out=out / "sweep")
        folder = save(
            m,
            out / "sweep" / f"lr{lr:g}-steps{st}",
            torch.bfloat16,
            provenance(kind="rl", seed=1, lr=lr, steps=st),
        )
        record(f"rl-lr{lr:g}-steps{st}", "rl", 1, lr, st, "fp32 master, bf16 checkpoint", m, folder)
    timed("sweep", t)

    # Overlaps: seeds, and RL against SFT, with both baselines.
    t = time.perf_counter()
    masks = {}
    for name in ("rl-seed1", "rl-seed2", "sft"):
        path = out / next(r["path"] for r in runs if r["name"] == name)
        masks[name] = out / f"{name}.rlmask"
        rlmask.diff(base, path, save_mask=masks[name], progress=False)
    overlaps = []
    for a, b in (("rl-seed1", "rl-seed2"), ("rl-seed1", "sft")):
        r = rlmask.overlap(masks[a], masks[b], base=base)
        tot = r.total
        overlaps.append(
            {
                "a": a,
                "b": b,
                "o1": tot["o1"],
                "o1_random": tot["o1_random"],
                "o1_matched": tot["o1_matched"],
                "o2": tot["o2"],
                "o2_random": tot["o2_random"],
                "o2_matched": tot["o2_matched"],
            }
        )
    timed("overlaps", t)

    rank = rlmask.rank(base, out / "rl-seed1" / "final", device="cpu", progress=False)
    traj = rlmask.trajectory(base, out / "rl-seed1", progress=False)
    # The figures RESULTS.md shows: the magnitude lens of seed 1 and its run.
    import matplotlib

    matplotlib.use("Agg")
    from rlmask.plot import magnitude_figure, trajectory_figure

    lens = rlmask.diff(base, out / "rl-seed1" / "final", magnitude=True, progress=False)
    magnitude_figure(lens, out / "lens.png")
    trajectory_figure(traj, out / "run.png")

    # Conjecture 1: train only seed 1's subnetwork, same seed, data and steps.
    t = time.perf_counter()
    from rlmask.integrations.transformers import MaskCallback

    m = grpo(
        base,
        tok,
        seed=1,
        lr=rl_lr,
        steps=rl_steps,
        out=out / "rl-sub",
        callbacks=[MaskCallback(masks["rl-seed1"])],
    )
    sub = save(m, out / "rl-sub", torch.bfloat16, provenance(kind="rl-subnetwork", seed=1))
    record("rl-subnetwork", "rl", 1, rl_lr, rl_steps, "fp32 master, bf16 checkpoint", m, sub)
    same = rlmask.diff(out / "rl-seed1" / "final", sub, criterion="exact", progress=False)
    timed("conjecture1", t)

    results = {
        "command": "python examples/finding1/study.py" + (" --quick" if quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "out": "paths below are relative to the --out folder",
        "base": {
            "path": os.path.relpath(base, out),
            "pretrain_steps": pre_steps,
            "accuracy": pre_acc,
        },
        "eval": {"problems": 200, "seed": 7, "decoding": "greedy, 4 new tokens"},
        "runs": runs,
        "overlaps": overlaps,
        "rank": {"run": "rl-seed1", "mean_rank_fraction": rank.mean_rank_fraction},
        "trajectory": {
            "run": "rl-seed1",
            "checkpoints": traj.to_dict()["checkpoints"],
            "categories": traj.categories,
        },
        "conjecture1": {
            "mask": os.path.relpath(masks["rl-seed1"], out),
            "mask_density": rlmask.load_mask(masks["rl-seed1"]).density,
            "reward_full": next(r["reward_after"] for r in runs if r["name"] == "rl-seed1"),
            "reward_subnetwork": runs[-1]["reward_after"],
            "identical_to_full": same.sparsity,
        },
        "sync": {
            "run": "rl-seed1",
            "every": "step",
            "dtype": "bf16 (the fp32 master weights as an inference engine receives them)",
            "full_bytes": sync.history[0]["rlmask/full_bytes"],
            "steps": [h["step"] for h in sync.history],
            "changed_since_last": [h["rlmask/changed_since_last"] for h in sync.history],
            "changed_since_start": [h["rlmask/changed_since_start"] for h in sync.history],
            "plain_bytes": [h["rlmask/sync_bytes"] for h in sync.history],
            "compact_bytes": [h["rlmask/sync_bytes_compact"] for h in sync.history],
        },
        "timings": {**timings, "total": round(time.perf_counter() - t0, 2)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        json.dumps(
            {k: results[k] for k in ("base", "overlaps", "conjecture1", "timings")}, indent=2
        )
    )
    n = len(sync.history)
    plain, compact = sum(results["sync"]["plain_bytes"]), sum(results["sync"]["compact_bytes"])
    full = results["sync"]["full_bytes"] * n
    print(
        f"sync of every step's bf16 weights ({n} steps): plain {plain:,.0f} bytes "
        f"({100 * plain / full:.1f}% of sending the full model each step), compact "
        f"{compact:,.0f} ({100 * compact / full:.1f}%)"
    )
    for r in runs:
        print(
            f"{r['name']:<24} sparsity exact {100 * r['sparsity_exact']:7.3f}%  "
            f"tol {100 * r['sparsity_tol']:7.3f}%  reward {r['reward_before']:.3f} -> "
            f"{r['reward_after']:.3f}"
        )
    return None


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Finding 1 on weights that training produced: RL against SFT on a tiny model, read with rlmask.

    python examples/finding1/study.py --out /tmp/f1            # the study (minutes, 2 CPU cores)
    python examples/finding1/study.py --out /tmp/f1 --report   # and commit its report here
    python examples/finding1/study.py --quick --out /tmp/f1q   # about a minute, for CI

A llama-shaped model of 76k parameters (transformers ``LlamaForCausalLM``) is pretrained from
scratch on two-digit addition for a fixed number of steps and saved as the bf16 base. From it,
with fp32 master weights and bf16 checkpoints as RL stacks do (each run's fp32 weights saved
beside its checkpoint, for the precision null):

- RL with TRL's ``GRPOTrainer`` (reward: the exact answer), five seeds, seed 1 with intermediate
  checkpoints;
- SFT with TRL's ``SFTTrainer`` on the same prompts with the gold answers, three seeds at each
  of four step counts, so that RL can be compared with SFT at matched KL from the base and at
  matched displacement, not only at matched steps;
- controls: seed 1 saved in fp32, and a run that keeps pure bf16 weights; a learning-rate x
  steps sweep;
- Conjecture 1 with controls: RL again training only seed 1's subnetwork, a uniform random mask
  and a magnitude-matched random mask of the same per-tensor counts (``MaskCallback``).

rlmask measures every run: sparsity (exact and at 1e-5) beside the precision null, KL from the
base, the median update, seed overlaps against both baselines with 95% intervals, the update
rank against a shuffled update of the same density, the trajectory and the cost of syncing
every step. Every figure lands in ``OUT/results.json`` and ``OUT/RESULTS.md``, which the study
writes from it (no figure is typed by hand); ``--report`` copies both, with the figures, beside
this script. The finding is reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import rlmask
from rlmask.stats import bootstrap_diff, bootstrap_mean, paired_bootstrap

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
CHARS = "0123456789+="
VOCAB = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
TOL = 1e-5
EVAL_PROBLEMS, EVAL_SEED = 500, 7


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
def scores(model: Any, tok: Any, rows: list[tuple[str, str]]) -> list[int]:
    """Per problem, 1 for the exact answer by greedy decoding (the reward), else 0."""
    model.eval()
    enc = tok(["<bos>" + p for p, _ in rows], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=1)
    n = enc["input_ids"].shape[1]
    got = [
        int(tok.decode(o[n:], skip_special_tokens=True).replace(" ", "") == ans)
        for (_, ans), o in zip(rows, out, strict=True)
    ]
    model.train()
    return got


@torch.no_grad()
def kl_from_base(model: Any, base_model: Any, tok: Any, rows: list[tuple[str, str]]) -> float:
    """Mean KL(tuned || base) of the next-token distributions at the answer positions of the
    gold sequences ``<bos>a+b=c<eos>`` (teacher forcing: the positions that predict the answer's
    digits and the end), over the evaluation problems."""
    enc = tok(["<bos>" + p + a + "<eos>" for p, a in rows], return_tensors="pt", padding=True)
    lt = model(**enc).logits.float().log_softmax(-1)
    lb = base_model(**enc).logits.float().log_softmax(-1)
    kl = (lt.exp() * (lt - lb)).sum(-1)
    ids = enc["input_ids"]
    eq = (ids == VOCAB["="]).int().argmax(1)
    pos = torch.arange(ids.shape[1])[None]
    answer = (pos >= eq[:, None]) & (pos < ids.shape[1] - 1)
    return float(kl[answer].mean())


def pretrain(tok: Any, steps: int) -> Any:
    """Next-token training on ``a+b=c`` (loss on the answer) for a fixed number of steps: a
    base of partial competence, the same on any CPU up to float noise."""
    model = new_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = problems(64 * steps, seed=1)
    for step in range(1, steps + 1):
        batch = rows[64 * (step - 1) : 64 * step]
        enc = tok(["<bos>" + p + a + "<eos>" for p, a in batch], return_tensors="pt", padding=True)
        labels = enc["input_ids"].clone()
        eq = (labels == VOCAB["="]).int().argmax(1)
        labels[torch.arange(labels.shape[1])[None] <= eq[:, None]] = -100
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


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
    """RL from the base with TRL's GRPOTrainer: 16 completions a step (2 prompts x 8
    generations), reward 1 for the exact answer, beta 0, AdamW (weight decay 0), the learning
    rate decaying linearly to 0, gradients clipped at norm 1."""
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
    """SFT from the base with TRL's SFTTrainer on the same kind of prompts with gold answers
    (16 sequences a step, completion-only loss; the same optimizer and schedule as RL)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = problems(16 * steps, seed=100 + seed)
    ds = Dataset.from_dict(
        {"prompt": ["<bos>" + p for p, _ in rows], "completion": [a + "<eos>" for _, a in rows]}
    )
    cfg = SFTConfig(
        output_dir=str(out / f".trl-sft-{seed}-{steps}"),
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


def update_rank(base: Path, tuned: Path, seed: int = 0) -> dict[str, float]:
    """Mean over the 2-D weights of the update's rank fraction and stable rank
    (``||dW||_F^2 / sigma_max^2``, over the smaller dimension), and the same for its null: the
    update's entries shuffled within each matrix (same density, same values, no structure)."""
    from safetensors.torch import load_file

    a, b = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list[float]] = {"rank": [], "stable": [], "rank_null": [], "stable_null": []}
    for name, wa in a.items():
        if wa.ndim != 2:
            continue
        d = b[name].double() - wa.double()
        shuffled = d.reshape(-1)[torch.randperm(d.numel(), generator=gen)].reshape(d.shape)
        k = min(d.shape)
        for key, m in (("", d), ("_null", shuffled)):
            s = torch.linalg.svdvals(m)
            rows["rank" + key].append(float(torch.linalg.matrix_rank(m)) / k)
            rows["stable" + key].append(float((s**2).sum() / s[0] ** 2) / k if s[0] > 0 else 0.0)
    return {
        "matrices": len(rows["rank"]),
        "rank_fraction": float(np.mean(rows["rank"])),
        "rank_fraction_null": float(np.mean(rows["rank_null"])),
        "stable_rank_fraction": float(np.mean(rows["stable"])),
        "stable_rank_fraction_null": float(np.mean(rows["stable_null"])),
    }


def ci(pair: tuple[float, float] | None) -> list[float] | None:
    return None if pair is None else [pair[0], pair[1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer runs and steps")
    ap.add_argument("--out", type=Path, default=HERE / "out", help="where checkpoints go")
    ap.add_argument(
        "--report",
        action="store_true",
        help="also copy RESULTS.md, results.json and the figures beside the script",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    quick = args.quick
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    tok = tokenizer()
    eval_rows = problems(EVAL_PROBLEMS, seed=EVAL_SEED)

    def timed(name: str, t: float) -> None:
        timings[name] = round(time.perf_counter() - t, 2)

    # ---- the base -----------------------------------------------------------------------
    t = time.perf_counter()
    pre_steps = 300 if quick else 700
    model = pretrain(tok, pre_steps)
    base = save(model, out / "base", torch.bfloat16, provenance(kind="base", steps=pre_steps))
    base_model = load(base, torch.float32).eval()
    base_scores = scores(base_model, tok, eval_rows)
    timed("pretrain", t)

    rl_lr, rl_steps = 1e-5, 20 if quick else 100
    rl_seeds = (1, 2, 3) if quick else (1, 2, 3, 4, 5)
    sft_lr = 1e-5
    sft_seeds = (1, 2) if quick else (1, 2, 3)
    sft_steps = (10, 20) if quick else (25, 35, 50, 70, 100, 200)
    runs: list[dict[str, Any]] = []

    def record(
        name: str, kind: str, seed: int, lr: float, steps: int, precision: str, folder: Path
    ) -> dict[str, Any]:
        """Every figure of one run, measured on its saved checkpoint (and fp32 master). A
        masked run gets no null: its updates are zero outside the mask by construction, and
        placing them at random would say nothing about precision."""
        master = folder.parent / (folder.name + "-master")
        has_master = (master / "model.safetensors").exists() and "masked" not in precision
        tol = rlmask.diff(
            base,
            folder,
            null=has_master,
            master=master if has_master else None,
            displacement=True,
            progress=False,
        )
        exact = rlmask.diff(base, folder, criterion="exact", progress=False)
        # The null fitted from the checkpoints alone, to measure its error against the master's.
        fit = rlmask.diff(base, folder, null=True, progress=False) if has_master else None
        fit_null = None if fit is None else fit.null_summary()
        tuned = load(folder, torch.float32).eval()
        got = scores(tuned, tok, eval_rows)
        reward, reward_ci = bootstrap_mean(got)
        null = tol.null_summary()
        lens = tol.by_magnitude() if has_master else None
        assert tol.displacement is not None
        row = {
            "name": name,
            "kind": kind,
            "seed": seed,
            "lr": lr,
            "steps": steps,
            "precision": precision,
            "path": os.path.relpath(folder, out),
            "master": os.path.relpath(master, out) if has_master else None,
            "sparsity_exact": exact.sparsity,
            "sparsity_tol": tol.sparsity,
            "null_sparsity": None if null is None else null["predicted_sparsity"],
            "null_fit_sparsity": None if fit_null is None else fit_null["predicted_sparsity"],
            "null_by_binade": None
            if lens is None
            else [
                {
                    "exponent": r["exponent"],
                    "numel": r["numel"],
                    "changed": r["changed"],
                    "predicted_changed": r["predicted_changed"],
                }
                for r in lens.iter_rows(named=True)
            ],
            "master_disagree": None if null is None else null["master_disagree"],
            "sparsity_tol_by_module": dict(
                zip(tol.by_module()["module"], tol.by_module()["sparsity"], strict=True)
            ),
            "median_abs_update": tol.displacement.quantile(0.5),
            "displacement": tol.displacement.to_dict(),
            "kl_from_base": kl_from_base(tuned, base_model, tok, eval_rows),
            "reward_before": float(np.mean(base_scores)),
            "reward_after": reward,
            "reward_ci95": ci(reward_ci),
            # Per problem, so that every interval can be recomputed from results.json.
            "reward_scores": "".join(map(str, got)),
        }
        runs.append(row)
        return row

    def train_save(model: Any, folder: Path, meta: dict[str, str], master: bool = True) -> Path:
        """The bf16 checkpoint, and the fp32 weights behind it beside it (``NAME-master``)."""
        if master:
            save(model, folder.parent / (folder.name + "-master"), torch.float32, meta)
        return save(model, folder, torch.bfloat16, meta)

    # ---- RL: seeds ----------------------------------------------------------------------
    t = time.perf_counter()
    from rlmask.integrations.transformers import SyncCostCallback

    # What syncing seed 1's bf16 weights to an inference engine after every step would send.
    sync = SyncCostCallback(every=1, dtype=torch.bfloat16)
    for seed in rl_seeds:
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
        meta = provenance(kind="rl", seed=seed, lr=rl_lr, steps=rl_steps)
        folder = train_save(m, run / "final", meta)
        record(
            f"rl-seed{seed}", "rl", seed, rl_lr, rl_steps, "fp32 master, bf16 checkpoint", folder
        )
        if seed == 1:
            f32 = save(m, out / "rl-seed1-fp32", torch.float32, meta)
            record("rl-seed1-fp32", "rl", 1, rl_lr, rl_steps, "fp32 checkpoint", f32)
    timed("rl", t)

    t = time.perf_counter()
    m = grpo(base, tok, seed=1, lr=rl_lr, steps=rl_steps, dtype=torch.bfloat16, out=out / "rl-bf16")
    folder = save(m, out / "rl-bf16", torch.bfloat16, provenance(kind="rl", seed=1, pure_bf16=True))
    record("rl-pure-bf16", "rl", 1, rl_lr, rl_steps, "pure bf16 weights", folder)
    timed("rl_pure_bf16", t)

    # ---- SFT: seeds x steps ---------------------------------------------------------------
    t = time.perf_counter()
    for steps in sft_steps:
        for seed in sft_seeds:
            m = sft(base, tok, seed=seed, lr=sft_lr, steps=steps, out=out)
            meta = provenance(kind="sft", seed=seed, lr=sft_lr, steps=steps)
            folder = train_save(m, out / f"sft-{steps}" / f"seed{seed}", meta)
            record(
                f"sft-{steps}-seed{seed}",
                "sft",
                seed,
                sft_lr,
                steps,
                "fp32 master, bf16 checkpoint",
                folder,
            )
    timed("sft", t)

    # ---- the learning-rate x steps sweep (RL, seed 1) -------------------------------------
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
        meta = provenance(kind="rl", seed=1, lr=lr, steps=st)
        folder = train_save(m, out / "sweep" / f"lr{lr:g}-steps{st}", meta)
        record(f"rl-lr{lr:g}-steps{st}", "rl", 1, lr, st, "fp32 master, bf16 checkpoint", folder)
    timed("sweep", t)

    # ---- RL against SFT, matched three ways -----------------------------------------------
    by_name = {r["name"]: r for r in runs}
    rl_runs = [by_name[f"rl-seed{s}"] for s in rl_seeds]

    def sft_group(steps: int) -> list[dict[str, Any]]:
        return [by_name[f"sft-{steps}-seed{s}"] for s in sft_seeds]

    def nearest(key: str) -> int:
        """The SFT step count whose mean ``key`` is nearest RL's, on a log scale."""
        want = math.log(np.mean([r[key] for r in rl_runs]))
        return min(
            sft_steps, key=lambda st: abs(math.log(np.mean([r[key] for r in sft_group(st)])) - want)
        )

    matched = {
        "steps": rl_steps if rl_steps in sft_steps else sft_steps[-1],
        "kl": nearest("kl_from_base"),
        "displacement": nearest("median_abs_update"),
    }
    comparisons = []
    for how, steps in matched.items():
        group = sft_group(steps)
        d, interval = bootstrap_diff(
            [r["sparsity_tol"] for r in rl_runs], [r["sparsity_tol"] for r in group]
        )
        dn, interval_null = bootstrap_diff(
            [r["null_sparsity"] for r in rl_runs], [r["null_sparsity"] for r in group]
        )
        comparisons.append(
            {
                "a": f"rl ({len(rl_runs)} seeds, {rl_steps} steps)",
                "b": f"sft-{steps} ({len(group)} seeds, {steps} steps)",
                "match": how,
                "kl_from_base": [
                    float(np.mean([r["kl_from_base"] for r in rl_runs])),
                    float(np.mean([r["kl_from_base"] for r in group])),
                ],
                "median_abs_update": [
                    float(np.mean([r["median_abs_update"] for r in rl_runs])),
                    float(np.mean([r["median_abs_update"] for r in group])),
                ],
                "sparsity": [
                    float(np.mean([r["sparsity_tol"] for r in rl_runs])),
                    float(np.mean([r["sparsity_tol"] for r in group])),
                ],
                "sparsity_diff": d,
                "ci95": ci(interval),
                "null_sparsity_diff": dn,
                "null_ci95": ci(interval_null),
            }
        )

    # ---- overlaps: every pair of RL seeds, and RL against the KL-matched SFT -------------
    t = time.perf_counter()
    masks: dict[str, Path] = {}
    for r in [*rl_runs, *sft_group(matched["kl"])]:
        masks[r["name"]] = out / "masks" / f"{r['name']}.rlmask"
        masks[r["name"]].parent.mkdir(exist_ok=True)
        rlmask.diff(base, out / r["path"], save_mask=masks[r["name"]], progress=False)
    seed_names = [r["name"] for r in rl_runs]
    matrix = rlmask.overlap_matrix([masks[n] for n in seed_names], labels=seed_names, base=base)
    excess = {b: matrix.excess(b) for b in ("random", "matched")}
    overlaps = []
    sft_name = f"sft-{matched['kl']}-seed1"
    pairs = [(a, b) for i, a in enumerate(seed_names) for b in seed_names[i + 1 :]]
    for a, b in [*pairs, ("rl-seed1", sft_name)]:
        tot = rlmask.overlap(masks[a], masks[b], base=base).total
        overlaps.append(
            {"a": a, "b": b, **{k: tot[k] for k in ("o1", "o2")}}
            | {k: tot[k] for k in ("o1_random", "o1_matched", "o2_random", "o2_matched")}
        )
    timed("overlaps", t)

    # ---- rank, trajectory, figures ---------------------------------------------------------
    seed1 = out / "rl-seed1" / "final"
    rank = update_rank(base, seed1)
    rank["rlmask_mean_rank_fraction"] = rlmask.rank(
        base, seed1, device="cpu", progress=False
    ).mean_rank_fraction
    traj = rlmask.trajectory(base, out / "rl-seed1", progress=False)
    checkpoints = traj.to_dict()["checkpoints"]
    for c in checkpoints:
        c["path"] = os.path.relpath(c["path"], out)
    import matplotlib

    matplotlib.use("Agg")
    from rlmask.plot import magnitude_figure, trajectory_figure

    lens = rlmask.diff(
        base, seed1, null=True, master=out / "rl-seed1" / "final-master", progress=False
    )
    magnitude_figure(lens, out / "lens.png")
    trajectory_figure(traj, out / "run.png")

    # ---- Conjecture 1, with controls -------------------------------------------------------
    t = time.perf_counter()
    from rlmask.integrations.transformers import MaskCallback

    sub = rlmask.load_mask(masks["rl-seed1"])
    controls = {
        "subnetwork": masks["rl-seed1"],
        "uniform": out / "masks" / "uniform.rlmask",
        "matched": out / "masks" / "matched.rlmask",
    }
    rlmask.Mask.random_like(sub, seed=11).save(controls["uniform"])
    rlmask.Mask.random_like(sub, base=base, seed=12).save(controls["matched"])
    full_row = by_name["rl-seed1"]
    full_scores = [int(c) for c in full_row["reward_scores"]]
    full_changed = rlmask.diff(base, seed1, criterion="exact", mask=True, progress=False).mask
    assert full_changed is not None
    conjecture1 = []
    for kind, mask_path in [("full", None), *controls.items()]:
        if mask_path is None:
            row, folder = full_row, seed1
        else:
            m = grpo(
                base,
                tok,
                seed=1,
                lr=rl_lr,
                steps=rl_steps,
                out=out / f"c1-{kind}",
                callbacks=[MaskCallback(mask_path)],
            )
            meta = provenance(kind=f"rl-{kind}-mask", seed=1, mask=mask_path.name)
            folder = train_save(m, out / f"c1-{kind}" / "final", meta)
            row = record(
                f"rl-{kind}-mask",
                "rl",
                1,
                rl_lr,
                rl_steps,
                f"fp32 master, bf16 checkpoint, masked ({kind})",
                folder,
            )
        got = [int(c) for c in row["reward_scores"]]
        diff, diff_ci = paired_bootstrap(got, full_scores)
        same = rlmask.diff(seed1, folder, criterion="exact", mask=True, progress=False).mask
        assert same is not None
        # Identity where it means something: within the elements the full run changed.
        within = sum(int((full_changed[n] & ~same[n]).sum()) for n in full_changed.names)
        conjecture1.append(
            {
                "mask": kind,
                "mask_path": None if mask_path is None else os.path.relpath(mask_path, out),
                "run": row["name"],
                "reward": row["reward_after"],
                "reward_ci95": row["reward_ci95"],
                "reward_diff_vs_full": diff,
                "reward_diff_ci95": ci(diff_ci),
                "identical_within_changed": within / full_changed.count,
            }
        )
    timed("conjecture1", t)

    results = {
        "command": "python examples/finding1/study.py" + (" --quick" if quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "out": "paths below are relative to the --out folder",
        "base": {
            "path": os.path.relpath(base, out),
            "pretrain_steps": pre_steps,
            "accuracy": float(np.mean(base_scores)),
            "reward_scores": "".join(map(str, base_scores)),
        },
        "eval": {
            "problems": EVAL_PROBLEMS,
            "seed": EVAL_SEED,
            "decoding": "greedy, 4 new tokens",
            "kl": "mean KL(tuned || base) of next-token distributions at the answer positions "
            "of the gold sequences, teacher-forced, over the evaluation problems",
        },
        "training": {
            "rl": {"seeds": list(rl_seeds), "lr": rl_lr, "steps": rl_steps},
            "sft": {"seeds": list(sft_seeds), "lr": sft_lr, "steps": list(sft_steps)},
            "optimizer": "AdamW (TRL's default, fused), weight decay 0, betas (0.9, 0.999), "
            "learning rate decaying linearly to 0 without warm-up, gradients clipped at norm 1",
            "rl_batch": "16 completions a step: 2 prompts x 8 generations, beta 0",
            "sft_batch": "16 sequences a step, completion-only loss",
        },
        "runs": runs,
        "matched_sft_steps": matched,
        "comparisons": comparisons,
        "overlaps": overlaps,
        "seed_overlap_excess": {
            "mean": excess["matched"]["mean"],
            "ci95": excess["matched"]["ci95"],
            "over_random": {"mean": excess["random"]["mean"], "ci95": excess["random"]["ci95"]},
            "pairs": excess["matched"]["pairs"],
            "interval": excess["matched"]["interval"],
        },
        "rank": {"run": "rl-seed1", **rank},
        "trajectory": {
            "run": "rl-seed1",
            "checkpoints": checkpoints,
            "categories": traj.categories,
        },
        "conjecture1": conjecture1,
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
    (out / "RESULTS.md").write_text(report(results))
    if args.report:
        for name in ("results.json", "RESULTS.md", "lens.png", "run.png"):
            shutil.copy(out / name, HERE / name)
    print(
        f"wrote {out / 'results.json'} and {out / 'RESULTS.md'} in {results['timings']['total']} s"
    )


# ---- the report, written from results.json alone -----------------------------------------


def pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def pts(x: float, interval: list[float] | None) -> str:
    """A difference of fractions in percentage points, with its interval."""
    if interval is None:
        return f"{100 * x:+.2f} points (no interval)"
    return f"{100 * x:+.2f} points (95% CI {100 * interval[0]:+.2f} to {100 * interval[1]:+.2f})"


def excludes_zero(interval: list[float] | None) -> bool:
    return interval is not None and (interval[0] > 0 or interval[1] < 0)


def report(res: dict[str, Any]) -> str:
    """RESULTS.md from ``results.json``: every figure, and every claim, computed here."""
    runs = {r["name"]: r for r in res["runs"]}
    tr = res["training"]
    rl = [runs[f"rl-seed{s}"] for s in tr["rl"]["seeds"]]
    n_rl = len(rl)
    lines = [
        "# Finding 1 on weights that training produced",
        "",
        "Written by the study from its own `results.json` (nothing here is typed by hand):",
        "",
        "```bash",
        f"{res['command']} --out OUT --report",
        "```",
        "",
        f"Machine: {res['machine']}; {res['timings']['total']:.0f} s in all. Paths are relative "
        "to `OUT`. Pretraining runs a fixed number of steps, so another CPU gives the same base "
        "up to float noise in the last bits; CI reruns the `--quick` study and recomputes its "
        "figures from the checkpoints (tests/test_finding1.py).",
        "",
        "## Setup",
        "",
        "- Model: transformers `LlamaForCausalLM`, 2 layers, hidden 64, 75,968 parameters, a "
        "15-token character vocabulary. Task: two-digit addition `a+b=`, reward 1 for the exact "
        f"answer (greedy decoding, {res['eval']['problems']} fixed problems).",
        f"- Base: pretrained from scratch (AdamW, lr 3e-3, answer-only loss) for "
        f"{res['base']['pretrain_steps']} steps: {pct(res['base']['accuracy'], 1)} exact "
        "accuracy; saved in bf16.",
        f"- RL: TRL `GRPOTrainer`, {tr['rl_batch']}; lr {tr['rl']['lr']:g}, "
        f"{tr['rl']['steps']} steps, seeds {tr['rl']['seeds']}. SFT: TRL `SFTTrainer`, "
        f"{tr['sft_batch']}; lr {tr['sft']['lr']:g}, steps {tr['sft']['steps']}, seeds "
        f"{tr['sft']['seeds']}. Both: {tr['optimizer']}; fp32 master weights, bf16 checkpoints, "
        "the fp32 weights saved beside each for the precision null.",
        f"- KL from the base: {res['eval']['kl']}.",
        "- Intervals: rewards by bootstrap over problems; differences between groups of seeds by "
        "resampling each group's seeds; the seed-overlap excess by resampling seeds (design §11).",
        "",
        "## Sparsity of every run, beside the precision null",
        "",
        "The null keeps each tensor's accumulated fp32 update (master - base) but places it at "
        "random within the tensor and rounds to bf16: the sparsity rounding alone gives an update "
        "of that size (`rlmask diff BASE RUN --null --master RUN-master`, exact expectation).",
        "",
        "| run | lr | steps | weights | sparsity exact | sparsity 1e-5 | null 1e-5 | KL from base "
        "| median abs update | reward (95% CI) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["runs"]:
        rci = r["reward_ci95"]
        lines.append(
            f"| {r['name']} | {r['lr']:g} | {r['steps']} | {r['precision']} | "
            f"{pct(r['sparsity_exact'])} | {pct(r['sparsity_tol'])} | {pct(r['null_sparsity'])} | "
            f"{r['kl_from_base']:.2e} | {r['median_abs_update']:.2e} | "
            f"{r['reward_after']:.3f} ({rci[0]:.3f}-{rci[1]:.3f}) |"
        )
    gaps = [
        r["sparsity_tol"] - r["null_sparsity"]
        for r in res["runs"]
        if r["null_sparsity"] is not None and r["precision"] == "fp32 master, bf16 checkpoint"
    ]
    fit_err = [
        r["null_fit_sparsity"] - r["null_sparsity"]
        for r in res["runs"]
        if r["null_fit_sparsity"] is not None and r["precision"] == "fp32 master, bf16 checkpoint"
    ]
    lines += [
        "",
        f"Observed minus null over the {len(gaps)} bf16 runs with an fp32 master: from "
        f"{100 * min(gaps):+.2f} to {100 * max(gaps):+.2f} points.",
        "",
        "Without the master, `rlmask diff --null` fits the updates from the checkpoints (each "
        "tensor's quarter of elements nearest zero stands in for its updates). Its error against "
        f"the master-based null over the same {len(fit_err)} runs: from {100 * min(fit_err):+.2f} "
        f"to {100 * max(fit_err):+.2f} points (mean {100 * float(np.mean(fit_err)):+.2f}).",
        "",
        "Per binade of the base value (RL seed 1; binades of 100 or more elements):",
        "",
        "| log2 abs(a) >= | elements | changed | null predicts |",
        "|---:|---:|---:|---:|",
    ]
    bins = [b for b in runs["rl-seed1"]["null_by_binade"] if b["numel"] >= 100]
    worst = 0.0
    for b in bins:
        share, pred = b["changed"] / b["numel"], b["predicted_changed"] / b["numel"]
        worst = max(worst, abs(share - pred))
        floor = "0 or subnormal" if b["exponent"] == 0 else str(b["exponent"] - 127)
        lines.append(f"| {floor} | {b['numel']:,} | {pct(share, 1)} | {pct(pred, 1)} |")
    lines += [
        "",
        f"Largest gap between the changed share and the null's in these binades: "
        f"{100 * worst:.1f} points.",
        "",
        "![changed share per binade, with the null](lens.png)",
        "",
        "## RL against SFT, matched three ways",
        "",
        f"RL: {n_rl} seeds at {tr['rl']['steps']} steps. SFT: the step count whose mean KL from "
        "the base (or median update) is nearest RL's, on a log scale; and the same step count as "
        "RL, labelled `steps`.",
        "",
        "| match | SFT | KL RL / SFT | median update RL / SFT | sparsity RL / SFT | "
        "RL - SFT | null RL - SFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in res["comparisons"]:
        lines.append(
            f"| {c['match']} | {c['b']} | {c['kl_from_base'][0]:.2e} / {c['kl_from_base'][1]:.2e} "
            f"| {c['median_abs_update'][0]:.2e} / {c['median_abs_update'][1]:.2e} | "
            f"{pct(c['sparsity'][0])} / {pct(c['sparsity'][1])} | "
            f"{pts(c['sparsity_diff'], c['ci95'])} | "
            f"{pts(c['null_sparsity_diff'], c['null_ci95'])} |"
        )
    ex = res["seed_overlap_excess"]
    lines += [
        "",
        "## Overlap of the subnetworks (tol 1e-5), with both baselines",
        "",
        "| a | b | o1 | uniform | magnitude-matched | o2 | uniform | matched |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for o in res["overlaps"]:
        lines.append(
            f"| {o['a']} | {o['b']} | {pct(o['o1'], 1)} | {pct(o['o1_random'], 1)} | "
            f"{pct(o['o1_matched'], 1)} | {pct(o['o2'], 1)} | {pct(o['o2_random'], 1)} | "
            f"{pct(o['o2_matched'], 1)} |"
        )
    lines += [
        "",
        f"Across the {ex['pairs']} ordered pairs of RL seeds, o1 exceeds the magnitude-matched "
        f"baseline by {pts(ex['mean'], ex['ci95'])}, and the uniform baseline by "
        f"{pts(ex['over_random']['mean'], ex['over_random']['ci95'])}; {ex['interval']}.",
        "",
        "## Update rank against its null (RL seed 1)",
        "",
    ]
    rk = res["rank"]
    lines += [
        f"Over {rk['matrices']} weight matrices: rank {pct(rk['rank_fraction'], 1)} of full "
        f"(`rlmask rank`: {pct(rk['rlmask_mean_rank_fraction'], 1)}), against "
        f"{pct(rk['rank_fraction_null'], 1)} for the same update shuffled within each matrix "
        f"(same density and values); stable rank {pct(rk['stable_rank_fraction'], 1)} of the "
        f"smaller dimension against {pct(rk['stable_rank_fraction_null'], 1)} shuffled.",
        "",
        "## Trajectory of RL seed 1",
        "",
        "| step | sparsity vs base | vs previous | changes outside the final subnetwork, "
        "of the step's changes | of all elements (paper's Figure 6) |",
        "|---:|---:|---:|---:|---:|",
    ]
    numel = sum(res["trajectory"]["categories"].values())
    for c in res["trajectory"]["checkpoints"]:
        share = c["outside_final"]
        of_all = None if share is None else share * c["changed_vs_base"] / numel
        lines.append(
            f"| {c['step']} | {pct(c['sparsity_vs_base'])} | {pct(c['sparsity_consecutive'])} | "
            f"{pct(share, 1)} | {pct(of_all, 1)} |"
        )
    cat = res["trajectory"]["categories"]
    lines += [
        "",
        "![sparsity over the run, the categories per module, Figure 6](run.png)",
        "",
        f"Categories over the run (Figure 2): never changed {cat['never']:,} "
        f"({pct(cat['never'] / numel, 1)}), changed then returned {cat['returned']:,} "
        f"({pct(cat['returned'] / numel, 1)}), final subnetwork {cat['final']:,} "
        f"({pct(cat['final'] / numel, 1)}).",
        "",
        "## Conjecture 1, with controls",
        "",
        "RL seed 1 again (same data, lr and steps), training only the elements of a mask: seed "
        "1's own subnetwork, a uniform random mask and a magnitude-matched random mask with the "
        "same count in every tensor (`rlmask mask random --like`), against the full run. "
        "Identity is measured within the elements the full run changed.",
        "",
        "| mask | reward (95% CI) | against full, paired (95% CI) | identical to full, "
        "within its changes |",
        "|---|---|---|---|",
    ]
    c1 = {c["mask"]: c for c in res["conjecture1"]}
    for c in res["conjecture1"]:
        rci = c["reward_ci95"]
        lines.append(
            f"| {c['mask']} | {c['reward']:.3f} ({rci[0]:.3f}-{rci[1]:.3f}) | "
            f"{pts(c['reward_diff_vs_full'], c['reward_diff_ci95'])} | "
            f"{pct(c['identical_within_changed'], 1)} |"
        )
    lines += ["", "## What this shows, plainly", ""]
    lines += claims(res, runs, rl, c1, gaps, worst)
    s = res["sync"]
    n = len(s["steps"])
    plain, compact = sum(s["plain_bytes"]), sum(s["compact_bytes"])
    full = s["full_bytes"] * n
    lines += [
        "",
        "## What syncing every step would send",
        "",
        "Seed 1's GRPO run measured by `SyncCostCallback(every=1, dtype=torch.bfloat16)`: after "
        "every optimizer step, the fp32 master weights cast to bf16 against the previous step's.",
        "",
        f"| {n} steps | bytes sent | of sending the full model every step |",
        "|---|---:|---:|",
        f"| full bf16 model each step | {full:,.0f} | 100% |",
        f"| plain patches | {plain:,.0f} | {pct(plain / full, 1)} |",
        f"| compact patches | {compact:,.0f} | {pct(compact / full, 1)} |",
        "",
    ]
    return "\n".join(lines)


def claims(
    res: dict[str, Any],
    runs: dict[str, Any],
    rl: list[dict[str, Any]],
    c1: dict[str, Any],
    gaps: list[float],
    worst: float,
) -> list[str]:
    """The study's conclusions, each worded by its own numbers and intervals."""
    out = []
    fp32, bf16 = runs["rl-seed1-fp32"], runs["rl-seed1"]
    out.append(
        f"- **Precision.** Saved in fp32, RL seed 1 leaves {pct(fp32['sparsity_exact'])} of its "
        f"elements bit-identical; saved in bf16, {pct(bf16['sparsity_exact'])}. The precision "
        "null, which keeps each tensor's update sizes but not where they fell, predicts every "
        f"bf16 run's sparsity to within {100 * max(abs(g) for g in gaps):.2f} points, and seed "
        f"1's changed share per binade to within {100 * worst:.1f} points: at this scale the "
        "sparsity is what bf16's grid makes of an update of this size."
    )
    by = {c["match"]: c for c in res["comparisons"]}
    parts, verdicts = [], set()
    for how in ("kl", "displacement", "steps"):
        c = by[how]
        if not excludes_zero(c["ci95"]):
            verdict = "no difference this study can resolve"
        else:
            verdict = "RL is sparser" if c["sparsity_diff"] > 0 else "SFT is sparser"
        verdicts.add(verdict)
        parts.append(
            f"at matched {how} ({c['b']}): {pts(c['sparsity_diff'], c['ci95'])}, {verdict}"
        )
    lead = (
        "The answer depends on what is held equal: the steps-matched comparison sets runs of "
        "different KL from the base side by side (see the table). "
        if len(verdicts) > 1
        else "The same answer whatever is held equal. "
    )
    out.append(
        "- **RL against SFT.** " + lead + "Sparsity of RL minus SFT " + "; ".join(parts) + "."
    )
    ex = res["seed_overlap_excess"]
    verdict = (
        "more than their magnitudes alone predict"
        if excludes_zero(ex["ci95"]) and ex["mean"] > 0
        else "no more than their magnitudes predict, within the interval"
    )
    out.append(
        f"- **Seed overlap.** {len(rl)} RL seeds share changed elements {verdict}: o1 exceeds the "
        f"magnitude-matched baseline by {pts(ex['mean'], ex['ci95'])} (uniform baseline: "
        f"{pts(ex['over_random']['mean'], ex['over_random']['ci95'])})."
    )
    rk = res["rank"]
    out.append(
        f"- **Rank.** The update is {pct(rk['rank_fraction'], 1)} of full rank, and so is a "
        f"shuffled update of the same density ({pct(rk['rank_fraction_null'], 1)}): full rank "
        "says nothing here; the stable rank "
        f"({pct(rk['stable_rank_fraction'], 1)} against {pct(rk['stable_rank_fraction_null'], 1)}"
        " shuffled) is the measure with a contrast."
    )
    sub, uni, mat = c1["subnetwork"], c1["uniform"], c1["matched"]
    resolves = any(excludes_zero(c["reward_diff_ci95"]) for c in (sub, uni, mat))
    out.append(
        f"- **Conjecture 1.** Against the full run, paired over problems: subnetwork "
        f"{pts(sub['reward_diff_vs_full'], sub['reward_diff_ci95'])}, uniform random mask "
        f"{pts(uni['reward_diff_vs_full'], uni['reward_diff_ci95'])}, magnitude-matched random "
        f"mask {pts(mat['reward_diff_vs_full'], mat['reward_diff_ci95'])}. "
        + (
            "The controls separate from the full run, so the test has power here."
            if resolves
            else "No mask, the random controls included, separates from the full run: at this "
            "size the reward test has no power to tell the subnetwork from any mask of its counts."
        )
        + f" Within the elements the full run changed, the subnetwork run is identical to it in "
        f"{pct(sub['identical_within_changed'], 1)} of them (uniform mask "
        f"{pct(uni['identical_within_changed'], 1)}, matched "
        f"{pct(mat['identical_within_changed'], 1)})."
    )
    out.append(
        "- These are the figures of one tiny model on one task; they say what rlmask can show "
        "on weights that training produced, not what holds for 7B models."
    )
    return out


if __name__ == "__main__":
    sys.exit(main())

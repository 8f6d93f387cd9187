"""Masked training of a tiny transformers Llama sharded with FSDP2, for ``test_fsdp.py``.

Run by ``torchrun --nproc_per_node N tests/fsdp_worker.py OUT [RUN,RUN...]`` (gloo on the CPU), and
imported by the test for the same run in one process without sharding. Each run writes, from
rank 0, the full parameters when the mask was attached and after the last step
(``OUT/{run}.safetensors``: ``before.NAME`` and ``after.NAME``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

#: (name, mixed precision in bf16, unmasked warm-up steps before the mask, mask attached);
#: "ddp" wraps the model in DistributedDataParallel instead of sharding it.
RUNS = [
    ("fp32", False, 0, True),
    ("bf16", True, 0, True),
    ("resumed", False, 2, True),
    ("ddp", False, 0, True),
    ("fp32-unmasked", False, 0, False),
]
STEPS = 6
BATCH, LENGTH, VOCAB = 4, 12, 64


def model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def mask_for(m: torch.nn.Module) -> object:
    """A random mask of about 30% of every parameter (the same on every rank)."""
    import rlmask

    rng = np.random.default_rng(1)
    return rlmask.Mask.from_dict(
        {n: rng.random(tuple(p.shape)) < 0.3 for n, p in m.named_parameters()}
    )


def full(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full, gathered from the shards where the model is sharded."""
    out = {}
    for n, p in m.named_parameters():
        t = p.full_tensor() if type(p).__name__ == "DTensor" else p  # type: ignore[attr-defined]
        out[n.removeprefix("module.")] = t.detach().float().clone()
    return out


def run(name: str, bf16: bool, warmup: int, masked: bool, rank: int, world: int) -> dict:
    """One training run; returns ``{before.NAME, after.NAME}`` (full parameters)."""
    from rlmask.torch import UpdateTracker, attach_mask

    m = model()
    if world > 1 and name == "ddp":
        m = torch.nn.parallel.DistributedDataParallel(m)
    elif world > 1:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None)
        for layer in m.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(m, mp_policy=policy)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)

    def step(k: int) -> None:
        g = torch.Generator().manual_seed(100 + k)
        ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)[rank::world]
        m(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    for k in range(warmup):
        step(k)
    before = full(m)
    handle = attach_mask(m, mask_for(model()), opt) if masked else None
    if handle is not None and warmup:
        assert handle.zeroed_state > 0, "a resumed AdamW holds momentum for frozen elements"
    # The tracker on the same run: under FSDP2 its counts are all-reduced, its masks gathered.
    tracker = UpdateTracker(m, optimizer=opt, name_map=lambda n: n.removeprefix("module."))
    for k in range(warmup, warmup + STEPS):
        step(k)
    after = full(m)
    report = tracker.report()
    final = tracker.final_mask(exact=True)
    tracked = {
        f"tracked.{n}": torch.from_numpy(final[n].reshape(-1).astype(np.uint8)) for n in final.names
    }
    end = report.categories.filter(report.categories["criterion"] == "exact")
    tracked["tracked_counts"] = torch.tensor(
        [int(end["changed_at_end"][0]), int(report.steps["changed_start_exact"][-1]), report.numel]
    )
    tracker.remove()
    if handle is not None:
        handle.remove()
    return {
        **{f"before.{n}": t for n, t in before.items()},
        **{f"after.{n}": t for n, t in after.items()},
        **tracked,
    }


def sync_run(rank: int, world: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """track_sync's callback on a sharded run (driven as the Trainer drives it, bf16 casts of
    fp32 weights): its history, and the full bf16 parameters at the start and after each step
    (``step{k}.NAME``), from which the test recomputes every figure."""
    from types import SimpleNamespace

    from torch.distributed.fsdp import fully_shard

    from rlmask.integrations.transformers import SyncCostCallback

    m = model()
    if world > 1:
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4)
    cb = SyncCostCallback(every=1, dtype=torch.bfloat16)
    state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_log=False)
    cb.on_train_begin(None, state, control, model=m)
    snapshots = {f"step0.{n}": t.bfloat16() for n, t in full(m).items()}
    for k in range(4):
        g = torch.Generator().manual_seed(200 + k)
        ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)[rank::world]
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        state.global_step = k + 1
        cb.on_step_end(None, state, control, model=m)
        snapshots |= {f"step{k + 1}.{n}": t.bfloat16() for n, t in full(m).items()}
    return cb.history, snapshots


def main() -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    out = Path(sys.argv[1])
    # Optionally only some runs (``fp32,bf16``): then nothing else.
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, bf16, warmup, masked in RUNS:
        if only is not None and name not in only:
            continue
        tensors = run(name, bf16, warmup, masked, rank, world)
        if rank == 0:
            save_file(tensors, out / f"{name}.safetensors")
        dist.barrier()
    if only is not None:
        dist.destroy_process_group()
        return
    # track_sync under FSDP2: every rank reports the model's figures.
    import json

    history, snapshots = sync_run(rank, world)
    (out / f"sync-history-{rank}.json").write_text(json.dumps(history))
    if rank == 0:
        save_file(snapshots, out / "sync.safetensors")
    dist.barrier()
    # What would report one rank's shard as the model's refuses instead.
    from torch.distributed.fsdp import fully_shard

    from rlmask.torch import make_patch

    sharded = fully_shard(model())
    refusals = []
    for attempt in (lambda: make_patch(sharded, {}, out / "never.rlpatch"),):
        try:
            attempt()
            refusals.append("accepted")
        except ValueError as e:
            refusals.append(str(e))
    if rank == 0:
        (out / "refusals.txt").write_text("\n".join(refusals))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

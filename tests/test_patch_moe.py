"""Patch records for engines' fused experts (issue 31): per-expert checkpoint tensors moved into
the stacked tensors engines hold, checked against the stacked layout transformers builds for
itself when it loads a mixture-of-experts checkpoint (an independent reference: its own
conversion of the same files into ``experts.gate_up_proj`` and ``experts.down_proj``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    Qwen2MoeConfig,
)

import rlmask.patch

TINY = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2}
CONFIGS = {
    "mixtral": MixtralConfig(
        **TINY, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4
    ),
    "qwen2_moe": Qwen2MoeConfig(
        **TINY,
        num_attention_heads=2,
        num_key_value_heads=1,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=12,
        num_experts=4,
    ),
    "deepseek_v3": DeepseekV3Config(
        **TINY,
        num_attention_heads=2,
        num_key_value_heads=2,
        moe_intermediate_size=8,
        n_routed_experts=4,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
        n_group=1,
        topk_group=1,
    ),
}
# The engine's stacked tensor and transformers' name for it.
THEIRS = {"w13_weight": "gate_up_proj", "w2_weight": "down_proj"}


def _fused_state(folder: Path) -> dict[str, torch.Tensor]:
    """The experts' stacked tensors transformers builds when it loads ``folder``."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    return {k: v for k, v in model.state_dict().items() if k.endswith(tuple(THEIRS.values()))}


def _patched(tmp_path: Path, family: str, share: float, seed: int) -> Path:
    """A tiny model of ``family`` saved as ``base``, an RL-like step on ``share`` of every
    parameter's entries (experts, shared experts, attention) saved as ``tuned``, and the patch
    between them."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            moved = torch.rand(p.shape, generator=g) < share
            p[moved] += (torch.randn(p.shape, generator=g)[moved] * 0.05).to(p.dtype)
    model.save_pretrained(tmp_path / "tuned")
    patch = tmp_path / "p.rlpatch"
    rlmask.patch.create(tmp_path / "base", tmp_path / "tuned", patch, progress=False)
    return patch


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_fused_records_update_the_stacked_experts(tmp_path: Path, family: str) -> None:
    patch = _patched(tmp_path, family, 0.1, seed=1)

    base, tuned = _fused_state(tmp_path / "base"), _fused_state(tmp_path / "tuned")
    plain = {r["name"] for r in rlmask.patch.records(patch)}
    fused = list(rlmask.patch.records(patch, fuse_experts=True))
    seen = set()
    for r in fused:
        stem, _, last = r["name"].rpartition(".")
        if last not in THEIRS:
            # Not one expert's projection (shared experts, the router, attention): as stored.
            assert r["name"] in plain and rlmask.patch.fused_place(r["name"]) is None
            continue
        theirs = f"{stem.replace('block_sparse_moe', 'mlp')}.{THEIRS[last]}"
        want = tuned[theirs]
        assert list(want.shape) == r["shape"], theirs
        flat = base[theirs].clone().reshape(-1)
        flat[r["indices"].long()] = r["values"]
        assert torch.equal(flat.view(torch.int16), want.reshape(-1).view(torch.int16)), theirs
        assert r["indices"].dtype == torch.int32 and not r["int64_indices"]
        seen.add(theirs)
    # Every stacked tensor transformers holds got its update; per-expert names are gone.
    assert seen == {k for k in tuned if not torch.equal(tuned[k], base[k])}
    assert not any(".experts.0." in r["name"] for r in fused)
    assert any(".experts.0." in n for n in plain)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_stacked_records_split_back_into_the_checkpoint_names(tmp_path: Path, family: str) -> None:
    """unfuse_records undoes fuse_experts: the per-expert records rlmask reads from the patch
    itself, name for name and index for index."""
    patch = _patched(tmp_path, family, 0.05, seed=2)
    names = rlmask._rlmask.Checkpoint(tmp_path / "base" / "model.safetensors").names()
    back = rlmask.patch.unfuse_records(rlmask.patch.records(patch, fuse_experts=True), names)
    got = {r["name"]: r for r in back}
    want = {r["name"]: r for r in rlmask.patch.records(patch)}
    assert set(got) == set(want)
    for name, r in want.items():
        assert got[name]["shape"] == r["shape"], name
        assert torch.equal(got[name]["indices"], r["indices"]), name
        assert torch.equal(got[name]["values"].view(torch.int16), r["values"].view(torch.int16))
    with pytest.raises(ValueError, match="no tensor for expert"):
        list(
            rlmask.patch.unfuse_records(
                rlmask.patch.records(patch, fuse_experts=True),
                [n for n in names if ".experts.0." not in n],
            )
        )

"""vLLM's own patch loader applies what rlmask writes (issue 31). vLLM's wheel pins another
torch and CUDA libraries, so its module ``checkpoint_weight_patch.py`` (``CheckpointWeightPatch``,
``load_checkpoint_weight_patches``: NaN-staged sparse tensors handed to the model's
``load_weights``, validated first) is taken unmodified from the PyPI wheel by
``scripts/fetch_vllm.py`` (run by .ci/run) and loaded from its file. The models below load
weights as vLLM's do: a final same-shaped ``copy_`` per checkpoint tensor, into the engine's own
parameters (experts stacked into ``w13_weight``/``w2_weight``, as vLLM's FusedMoE holds them)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import rlmask.patch

MODULE = Path(__file__).resolve().parents[1] / ".deps" / "vllm" / "checkpoint_weight_patch.py"


@pytest.fixture(scope="module")
def vllm() -> Any:
    assert MODULE.is_file(), (
        f"{MODULE} is missing: run `python scripts/fetch_vllm.py` (.ci/run does)"
    )
    spec = importlib.util.spec_from_file_location("vllm_checkpoint_weight_patch", MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Engine(torch.nn.Module):
    """Parameters as an engine holds them, filled by ``load_weights`` from checkpoint-named
    tensors: dense tensors by name, experts into stacked ``w13_weight`` (gate then up) and
    ``w2_weight`` with one ``copy_`` into the expert's slice (as vLLM's FusedMoE loader)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.dense: dict[str, torch.Tensor] = {}
        self.fused: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            place = rlmask.patch.fused_place(name)
            if place is None:
                self.dense[name] = t.clone()
                continue
            fused, expert, slot, slots = place
            rows = t.shape[0]
            if fused not in self.fused:
                experts = 1 + max(
                    p[1] for n in state if (p := rlmask.patch.fused_place(n)) and p[0] == fused
                )
                self.fused[fused] = torch.zeros(experts, rows * slots, t.shape[1], dtype=t.dtype)
            self.fused[fused][expert, slot * rows : (slot + 1) * rows].copy_(t)

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> set[str]:
        for name, w in weights:
            place = rlmask.patch.fused_place(name)
            if place is None:
                self.dense[name].copy_(w)
            else:
                fused, expert, slot, _ = place
                rows = w.shape[0]
                self.fused[fused][expert, slot * rows : (slot + 1) * rows].copy_(w)
        return {n for n, _ in weights}


def _pair(tmp_path: Path, share: float) -> tuple[dict, dict, Path]:
    g = torch.Generator().manual_seed(3)
    base = {"model.embed_tokens.weight": torch.randn(64, 16, generator=g)}
    for layer in range(2):
        base[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(16, 16, generator=g)
        for e in range(4):
            for proj, shape in (("w1", (8, 16)), ("w3", (8, 16)), ("w2", (16, 8))):
                name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{proj}.weight"
                base[name] = torch.randn(*shape, generator=g)
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    tuned = {}
    for k, v in base.items():
        w = v.clone()
        moved = torch.rand(v.shape, generator=g) < share
        w[moved] = (w[moved].float() + 0.1 * torch.randn(int(moved.sum()), generator=g)).to(
            torch.bfloat16
        )
        tuned[k] = w
    for side, state in (("base", base), ("tuned", tuned)):
        (tmp_path / side).mkdir()
        save_file(state, tmp_path / side / "model.safetensors")
    patch = tmp_path / "p.rlpatch"
    rlmask.patch.create(tmp_path / "base", tmp_path / "tuned", patch, progress=False)
    return base, tuned, patch


@pytest.mark.parametrize("share", [0.01, 0.2])
def test_vllm_applies_rlmask_patches_bit_for_bit(vllm: Any, tmp_path: Path, share: float) -> None:
    base, tuned, patch = _pair(tmp_path, share)
    engine = Engine(load_file(tmp_path / "base" / "model.safetensors"))
    want = Engine(tuned)
    patches = list(rlmask.patch.vllm_patches(patch, patch_class=vllm.CheckpointWeightPatch))
    assert all(type(p) is vllm.CheckpointWeightPatch for p in patches)
    assert {p.name for p in patches} == {n for n in base if not torch.equal(base[n], tuned[n])}
    loaded = vllm.load_checkpoint_weight_patches(engine, patches)
    assert loaded == {p.name for p in patches}
    for name in want.dense:
        assert torch.equal(engine.dense[name].view(torch.int16), want.dense[name].view(torch.int16))
    for name in want.fused:
        assert torch.equal(engine.fused[name].view(torch.int16), want.fused[name].view(torch.int16))


def test_vllm_refuses_what_rlmask_also_refuses(vllm: Any, tmp_path: Path) -> None:
    """vLLM's validation and rlmask's agree: rlmask's records pass it; a NaN value (vLLM's
    'unchanged' mark) or an index out of range is refused by both."""
    _, _, patch = _pair(tmp_path, 0.05)
    good = list(rlmask.patch.vllm_patches(patch, patch_class=vllm.CheckpointWeightPatch))
    p = good[0]
    nan = p._replace(values=p.values.clone().index_fill_(0, torch.tensor([0]), float("nan")))
    far = p._replace(indices=p.indices.clone().index_fill_(0, torch.tensor([0]), 10**6))
    engine = Engine(load_file(tmp_path / "base" / "model.safetensors"))
    for bad in (nan, far):
        with pytest.raises(ValueError, match="NaN values|out-of-range"):
            vllm.load_checkpoint_weight_patches(engine, [bad])
        with pytest.raises(ValueError):
            rlmask.patch.vllm_record(
                bad.name, list(bad.shape), "BF16", bad.indices, bad.values, where="x"
            )


def test_convert_to_vllm_and_back(vllm: Any, tmp_path: Path) -> None:
    """``patch convert --to vllm`` writes the records' fields; vLLM's loader applies what
    ``read_vllm`` makes of the file, and ``--to rlmask --base`` rebuilds a patch that applies
    to the tuned weights, bit for bit."""
    from click.testing import CliRunner

    from rlmask.cli import cli

    base, tuned, patch = _pair(tmp_path, 0.05)
    v = tmp_path / "v.safetensors"
    r = CliRunner().invoke(cli, ["patch", "convert", str(patch), "--to", "vllm", "-o", str(v)])
    assert r.exit_code == 0, r.output
    engine = Engine(base)
    vllm.load_checkpoint_weight_patches(
        engine, list(rlmask.patch.read_vllm(v, patch_class=vllm.CheckpointWeightPatch))
    )
    want = Engine(tuned)
    for name in want.dense:
        assert torch.equal(engine.dense[name].view(torch.int16), want.dense[name].view(torch.int16))
    back = tmp_path / "back.rlpatch"
    args = ["patch", "convert", str(v), "--to", "rlmask", "--base", str(tmp_path / "base")]
    r = CliRunner().invoke(cli, [*args, "-o", str(back)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    rlmask.patch.apply(tmp_path / "base", [back], out)
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[n].view(torch.int16), tuned[n].view(torch.int16)) for n in tuned)

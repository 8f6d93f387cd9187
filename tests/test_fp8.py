"""FP8 weights with scales (design §1): block scales of odd shapes, per-row and per-tensor
scales, E4M3 and E5M2, changed codes and changed scales, an FP8 release against its BF16
export, all against a numpy oracle that dequantises explicitly from the format definitions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rlmask
from oracle import changed, values
from rlmask.cli import cli

BLOCK = (16, 32)
SHAPE = (37, 50)  # neither dimension a multiple of the block
F8 = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,  # AMD's variants: one NaN (0x80), other biases
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
W = "model.layers.0.mlp.{}.weight"


def _codes(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 4)
    x[torch.from_numpy(rng.random(shape) < 0.1)] = 0.0  # zeros: unmoved by a changed scale
    return x.to(F8[dtype])


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.uint8).numpy().reshape(-1)


def _expand(
    scale: np.ndarray, shape: tuple[int, int], layout: str, block: tuple[int, int] = BLOCK
) -> np.ndarray:
    """The scale of every element, written out in full (the oracle's dequantisation)."""
    rows, cols = shape
    if layout == "tensor":
        return np.full(shape, scale.reshape(-1)[0], np.float32)
    if layout == "rows":
        return np.repeat(scale.reshape(rows, 1), cols, axis=1)
    br, bc = block
    full = np.repeat(np.repeat(scale, br, axis=0), bc, axis=1)
    return full[:rows, :cols]


def _dequant(
    code: torch.Tensor, dtype: str, scale: np.ndarray, layout: str, block: tuple[int, int] = BLOCK
) -> np.ndarray:
    v = values(dtype, _bits(code)).reshape(code.shape).astype(np.float32)
    return (v * _expand(scale, tuple(code.shape), layout, block)).astype(np.float32)


def _write(folder: Path, tensors: dict[str, torch.Tensor], block: bool = True) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    config = {"model_type": "deepseek_v3"}
    if block:
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(BLOCK)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _fixture(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path, dict]:
    """Base and tuned with three scaled weights (block E4M3, per-row E5M2, per-tensor E4M3):
    some codes changed, one block's scale changed, one row's scale changed; plus an unscaled
    BF16 tensor. Returns the oracle's per-tensor inputs."""
    sb = (math.ceil(SHAPE[0] / BLOCK[0]), math.ceil(SHAPE[1] / BLOCK[1]))
    spec = {
        "up_proj": ("F8_E4M3", "block", "_scale_inv", rng.random(sb).astype(np.float32) + 0.5),
        "gate_proj": ("F8_E5M2", "rows", "_scale", rng.random((SHAPE[0], 1)).astype(np.float32)),
        "down_proj": ("F8_E4M3", "tensor", "_scale", np.array(0.75, np.float32)),
    }
    base: dict[str, torch.Tensor] = {}
    tuned: dict[str, torch.Tensor] = {}
    oracle = {}
    for module, (dtype, layout, suffix, scale) in spec.items():
        name = W.format(module)
        code = _codes(rng, SHAPE, dtype)
        new = code.clone()
        flip = torch.from_numpy(rng.random(SHAPE) < 0.05)
        new.view(torch.uint8)[flip] ^= 1  # a code moves by one step
        new_scale = scale.copy()
        if layout == "block":
            new_scale[1, 1] *= 1.5
        elif layout == "rows":
            new_scale[3, 0] *= 2.0
        base[name], tuned[name] = code, new
        base[name + suffix] = torch.from_numpy(scale.copy())
        tuned[name + suffix] = torch.from_numpy(new_scale)
        oracle[name] = (dtype, layout, suffix, code, scale, new, new_scale)
    bf = torch.randn(8, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    base["model.norm.weight"], tuned["model.norm.weight"] = bf, bf + 1
    return _write(tmp_path / "base", base), _write(tmp_path / "tuned", tuned), oracle


@pytest.mark.parametrize("tol", [1e-5, 0.05])
def test_scaled_fp8_against_the_oracle(tmp_path: Path, tol: float) -> None:
    rng = np.random.default_rng(7)
    base, tuned, oracle = _fixture(tmp_path, rng)
    r = rlmask.diff(base, tuned, tol=tol, mask=True, magnitude=True, progress=False)
    rows = {row["name"]: row for row in r.tensors.iter_rows(named=True)}
    total = 0
    for name, (dtype, layout, suffix, code, scale, new, new_scale) in oracle.items():
        a = _dequant(code, dtype, scale, layout)
        b = _dequant(new, dtype, new_scale, layout)
        want = changed("F32", a.view(np.uint32), "F32", b.view(np.uint32), tol=tol)
        assert rows[name]["changed"] == int(want.sum()), (name, layout)
        assert r.mask is not None
        np.testing.assert_array_equal(r.mask[name], want.reshape(SHAPE), err_msg=name)
        # The scale tensor: compared and listed, not counted as a weight.
        s = rows[name + suffix]
        assert not s["floating"] and s["changed"] == int((scale != new_scale).sum())
        assert name + suffix not in r.mask
        total += want.sum()
    assert dict((n, (a, b)) for n, a, b in r.dequantised) == {
        W.format("up_proj"): ("block 16x32", "block 16x32"),
        W.format("gate_proj"): ("per-row", "per-row"),
        W.format("down_proj"): ("per-tensor", "per-tensor"),
    }
    assert sorted(r.scales) == sorted(n + spec[2] for n, spec in oracle.items())
    # Totals: the three weights and the BF16 tensor, no scale element.
    assert r.numel == 3 * SHAPE[0] * SHAPE[1] + 64
    assert r.changed == total + 64
    # The changed scale moved every nonzero code of its block (at the paper's tolerance).
    if tol == 1e-5:
        dtype, layout, suffix, code, scale, new, new_scale = oracle[W.format("up_proj")]
        block = (slice(16, 32), slice(32, 50))
        moved = np.asarray(r.mask[W.format("up_proj")])[block]
        nonzero = values(dtype, _bits(code)).reshape(SHAPE)[block] != 0
        assert moved[nonzero].all()
    # The magnitude lens sums to the totals (binades of the dequantised base values).
    assert int(r.by_magnitude()["changed"].sum()) == r.changed
    summary = r.summary()
    assert "FP8 and MXFP4 weights compared dequantised" in summary
    assert "2 with changed scales" in summary  # block and row scales moved


@pytest.mark.parametrize("dtype", sorted(F8))
def test_aligned_blocks_every_code(tmp_path: Path, dtype: str) -> None:
    """Shapes whose blocks hold whole runs of 64 elements (the kernel then dequantises as it
    loads, one scale per run): every one of the 256 codes appears, subnormals and -0 included
    (NaN and infinite codes take the table path), scales both tiny and huge."""
    shape, block = (128, 256), (64, 128)
    rng = np.random.default_rng(11)
    codes = rng.integers(0, 256, shape, dtype=np.uint8)
    special = 0x7C if dtype == "F8_E5M2" else 0x7F
    codes[(codes & special) == special] ^= 0x04  # finite codes: the kernel's own path ...
    codes[0, :256] = np.arange(256, dtype=np.uint8)  # ... but the first run holds all 256
    code = torch.from_numpy(codes).view(F8[dtype])
    new = code.clone()
    new.view(torch.uint8)[torch.from_numpy(rng.random(shape) < 0.05)] ^= 1
    scale = np.array([[1e-30, 3.0], [2.0**100, 0.37]], np.float32)
    new_scale = scale.copy()
    new_scale[1, 1] = np.float32(0.38)
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    base = {name: code, name + "_scale_inv": torch.from_numpy(scale)}
    tuned = {name: new, name + "_scale_inv": torch.from_numpy(new_scale)}
    config = {"quantization_config": {"weight_block_size": list(block)}}
    for side, tensors in (("base", base), ("tuned", tuned)):
        (tmp_path / side).mkdir()
        save_file(tensors, tmp_path / side / "model.safetensors")
        (tmp_path / side / "config.json").write_text(json.dumps(config))
    for tol in (0.0, 1e-5, 1e3):
        r = rlmask.diff(tmp_path / "base", tmp_path / "tuned", tol=tol, mask=True, progress=False)
        with np.errstate(over="ignore", invalid="ignore"):
            a = _dequant(code, dtype, scale, "block", block)
            b = _dequant(new, dtype, new_scale, "block", block)
        want = changed("F32", a.view(np.uint32), "F32", b.view(np.uint32), tol=tol)
        # numpy gives every NaN one pattern; distinct NaN codes are distinct stored values,
        # and NaN against any other pattern is changed (design §1).
        want |= np.isnan(a) & np.isnan(b) & (_bits(code) != _bits(new)).reshape(shape)
        assert r.mask is not None
        np.testing.assert_array_equal(r.mask[name], want.reshape(shape), err_msg=f"tol={tol}")
        assert r.changed == int(want.sum())


def test_exact_compares_codes_and_scales_as_stored(tmp_path: Path) -> None:
    base, tuned, oracle = _fixture(tmp_path, np.random.default_rng(8))
    r = rlmask.diff(base, tuned, criterion="exact", mask=True, progress=False)
    for name, (_, layout, _, code, scale, new, new_scale) in oracle.items():
        shape = tuple(code.shape)
        want = (_bits(code) != _bits(new)).reshape(shape) | (
            _expand(scale, shape, layout) != _expand(new_scale, shape, layout)
        )
        assert r.mask is not None
        np.testing.assert_array_equal(r.mask[name], want, err_msg=name)


def test_fp8_release_against_its_bf16_export(tmp_path: Path) -> None:
    """The tuned side stored as BF16 (no scales): compared after dequantising the base;
    flagged as a dtype mismatch; the base's scales are not one-sided tensors."""
    rng = np.random.default_rng(9)
    base, _, oracle = _fixture(tmp_path, rng)
    export = {}
    for name, (dtype, layout, _, code, scale, _, _) in oracle.items():
        v = _dequant(code, dtype, scale, layout)
        bf = torch.from_numpy(v).bfloat16()
        bf.view(torch.int16)[0, :7] += 1  # seven elements moved
        export[name] = bf
    export["model.norm.weight"] = torch.zeros(8, 8).bfloat16()
    tuned = _write(tmp_path / "export", export, block=False)
    r = rlmask.diff(base, tuned, progress=False)
    assert r.only_in_base == [] and sorted(r.dtype_mismatches) == sorted(oracle)
    assert {n: (a, b) for n, a, b in r.dequantised}[W.format("up_proj")] == ("block 16x32", None)
    rows = {row["name"]: row for row in r.tensors.iter_rows(named=True)}
    for name, (dtype, layout, _, code, scale, _, _) in oracle.items():
        a = _dequant(code, dtype, scale, layout)
        b = values("BF16", export[name].view(torch.int16).numpy().view(np.uint16).reshape(-1))
        want = changed("F32", a.reshape(-1).view(np.uint32), "F32", b.view(np.uint32))
        assert rows[name]["changed"] == int(want.sum())


def test_scales_that_cannot_be_read_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    code = _codes(rng, SHAPE, "F8_E4M3")
    scale = torch.ones(3, 2)
    no_config = _write(tmp_path / "a", {"w": code, "w_scale_inv": scale}, block=False)
    with pytest.raises(rlmask.CheckpointFormatError, match="block size is needed") as e:
        rlmask.diff(no_config, no_config, progress=False)
    assert e.value.tensor == "w"
    # Given by hand, it works; a wrong one is refused naming the expected scale shape.
    r = rlmask.diff(no_config, no_config, block_size=BLOCK, progress=False)
    assert r.dequantised == [("w", "block 16x32", "block 16x32")]
    with pytest.raises(rlmask.CheckpointFormatError, match=r"expected scales \[2, 1\]"):
        rlmask.diff(no_config, no_config, block_size=(32, 64), progress=False)
    out = CliRunner().invoke(cli, ["diff", str(no_config), str(no_config), "--block-size", "16x32"])
    assert out.exit_code == 0, out.stderr
    out = CliRunner().invoke(cli, ["diff", str(no_config), str(no_config), "--block-size", "16"])
    assert out.exit_code == 2 and "ROWSxCOLS" in out.stderr
    # A layout rlmask does not know is refused, never compared as if unscaled.
    odd = _write(tmp_path / "b", {"w": code, "w_scale_inv": torch.ones(5)}, block=False)
    with pytest.raises(rlmask.CheckpointFormatError, match="unknown scale layout"):
        rlmask.diff(odd, odd, progress=False)
    # A trajectory needs the block size the same way.
    with pytest.raises(rlmask.CheckpointFormatError, match="block size is needed"):
        rlmask.trajectory(no_config, [no_config], progress=False)


@pytest.mark.parametrize("criterion", ["absolute", "exact"])
def test_trajectory_of_scaled_checkpoints_agrees_with_diff(tmp_path: Path, criterion: str) -> None:
    """A run of scaled FP8 checkpoints: every checkpoint against the base and against its
    predecessor, and each checkpoint's mask, as the (oracle-tested) pairwise diffs give them;
    the scale tensors are listed, not counted."""
    rng = np.random.default_rng(12)
    base, step1, oracle = _fixture(tmp_path, rng)
    step2 = {}
    for name, (_, _, suffix, _, _, new, new_scale) in oracle.items():
        moved = new.clone()
        moved.view(torch.uint8)[torch.from_numpy(rng.random(SHAPE) < 0.03)] ^= 2
        step2[name], step2[name + suffix] = (
            moved,
            torch.from_numpy(np.asarray(new_scale * 1.25, np.float32)),
        )
    step2["model.norm.weight"] = torch.zeros(8, 8).bfloat16()
    run = tmp_path / "run"
    run.mkdir()
    step1.rename(run / "checkpoint-100")
    _write(run / "checkpoint-200", step2)
    kw = {"criterion": criterion, "progress": False}
    r = rlmask.trajectory(base, run, save_masks=tmp_path / "masks", **kw)
    frame = {row["name"]: row for row in r.tensors.iter_rows(named=True)}
    for k, step in enumerate(("checkpoint-100", "checkpoint-200")):
        d = rlmask.diff(base, run / step, mask=True, **kw)
        mask = rlmask.load_mask(tmp_path / "masks" / f"step-{(k + 1) * 100}.rlmask")
        for row in d.tensors.filter(d.tensors["floating"]).iter_rows(named=True):
            assert frame[row["name"]]["changed_vs_base"][k] == row["changed"], (step, row["name"])
            assert d.mask is not None
            np.testing.assert_array_equal(mask[row["name"]], d.mask[row["name"]])
    consecutive = rlmask.diff(run / "checkpoint-100", run / "checkpoint-200", **kw)
    for row in consecutive.tensors.filter(consecutive.tensors["floating"]).iter_rows(named=True):
        assert frame[row["name"]]["changed_consecutive"][1] == row["changed"]
    scales = sorted(n + spec[2] for n, spec in oracle.items())
    assert sorted(n for n, _ in r.skipped) == scales
    assert set(frame) == set(oracle) | {"model.norm.weight"}


def test_rank_and_spectrum_read_scaled_weights_dequantised(tmp_path: Path) -> None:
    """rank and spectrum decompose the dequantised update of a scaled FP8 weight (the block
    size from config.json), never its raw codes; the scale tensors are not matrices of the
    model."""
    base, tuned, oracle = _fixture(tmp_path, np.random.default_rng(13))
    spec = {r["name"]: r for r in rlmask.spectrum(base, tuned, device="cpu", progress=False).rows}
    ranked = rlmask.rank(base, tuned, device="cpu", progress=False).tensors
    sigma = dict(zip(ranked["name"], ranked["sigma_max"], strict=True))
    for name, (dtype, layout, _, code, scale, new, new_scale) in oracle.items():
        a = _dequant(code, dtype, scale, layout)
        b = _dequant(new, dtype, new_scale, layout)
        d = (b - a).astype(np.float64)  # subtracted in float32, as rlmask does
        s = np.linalg.svd(d, compute_uv=False)
        assert spec[name]["delta_fro"] == pytest.approx(np.linalg.norm(d), rel=1e-9), name
        assert spec[name]["spectral_norm"] == pytest.approx(s[0], rel=1e-9), name
        assert sigma[name] == pytest.approx(s[0], rel=1e-5), name
    assert not any(n.endswith(("_scale_inv", "_scale")) for n in spec)


def test_a_sample_of_everything_reads_scaled_weights_as_the_full_pass(tmp_path: Path) -> None:
    """A sampled diff reads FP8 blocks at the block's first element (the scales' offset
    follows it): with blocks of 64 from a fraction of 1, every block is read, and the
    counts are the full pass's, per tensor; a smaller sample estimates them within its
    interval."""
    base, tuned, _ = _fixture(tmp_path, np.random.default_rng(5))
    full = rlmask.diff(base, tuned, tol=1e-5, progress=False)
    whole = rlmask.diff(
        base, tuned, tol=1e-5, sample=rlmask.Sample(fraction=1.0, block=64), progress=False
    )
    assert whole.columns["changed"] == full.columns["changed"]
    part = rlmask.diff(base, tuned, tol=1e-5, sample=0.3, seed=1, progress=False)
    [(low, high)] = part.ci95_per_threshold() or []
    assert part.sample is not None and part.sample["elements"] < 0.5 * full.numel
    assert low - 0.05 <= full.sparsity <= high + 0.05

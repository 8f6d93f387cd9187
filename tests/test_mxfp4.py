"""MXFP4 weights (OCP MX: FP4 E2M1 codes, two per byte, with one E8M0 scale per 32 codes),
stored as F4 with F8_E8M0 scales by the official safetensors writer, or as gpt-oss stores its
experts (U8 ``X_blocks`` of 16 bytes per block beside U8 ``X_scales``): compared dequantised,
against values computed here from the format definitions."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import rlmask
from oracle import changed
from rlmask.cli import cli

EXPERTS, ROWS, GROUPS = 3, 5, 3  # a [3, 5, 96] expert weight: 3 blocks of 32 codes per row
SHAPE = (EXPERTS, ROWS, GROUPS * 32)
NAME = "model.layers.0.mlp.experts.gate_up_proj"


def fp4(codes: np.ndarray) -> np.ndarray:
    """E2M1 (OCP MX v1.0 §5.3.3): sign bit, 2 exponent bits of bias 1, 1 mantissa bit; exponent
    0 is subnormal (0 or 0.5); no infinity or NaN."""
    c = codes.astype(np.int64)
    sign = np.where(c & 8, -1.0, 1.0)
    e, m = (c >> 1) & 3, c & 1
    mag = np.where(e == 0, 0.5 * m, np.ldexp(1.0 + 0.5 * m, (e - 1).astype(np.int32)))
    return (sign * mag).astype(np.float32)


def e8m0(scales: np.ndarray) -> np.ndarray:
    """E8M0 (OCP MX v1.0 §5.4.1): 2^(e - 127); 0xFF is NaN."""
    e = scales.astype(np.int32)
    v = np.ldexp(np.float32(1.0), e - 127).astype(np.float32)
    return np.where(e == 255, np.float32(np.nan), v)


def unpack(packed: np.ndarray) -> np.ndarray:
    """Codes from bytes, the first of each pair in the low nibble (gpt-oss, torchao)."""
    flat = packed.reshape(-1)
    codes = np.empty(2 * flat.size, np.uint8)
    codes[0::2], codes[1::2] = flat & 0xF, flat >> 4
    return codes


def dequant(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The oracle's values, every element's scale written out: ``f32(code) * f32(scale)``."""
    return (fp4(unpack(packed)) * np.repeat(e8m0(scales).reshape(-1), 32)).reshape(SHAPE)


def _side(packed: np.ndarray, scales: np.ndarray, gpt_oss: bool) -> dict[str, torch.Tensor]:
    if gpt_oss:
        return {
            f"{NAME}_blocks": torch.from_numpy(packed.reshape(EXPERTS, ROWS, GROUPS, 16).copy()),
            f"{NAME}_scales": torch.from_numpy(scales.copy()),
        }
    return {
        NAME: torch.from_numpy(packed.copy()).view(torch.float4_e2m1fn_x2),
        f"{NAME}_scales": torch.from_numpy(scales.copy()).view(torch.float8_e8m0fnu),
    }


def _write(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    config = {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _pair(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Base and tuned codes and scales: every code and the extreme scales present; some codes
    moved, one block's scale moved (every nonzero code of that block moves with it)."""
    packed = rng.integers(0, 256, (EXPERTS, ROWS, GROUPS * 16), dtype=np.uint8)
    packed[0, 0, :8] = np.arange(0, 256, 34, dtype=np.uint8)[:8]  # both nibbles vary
    scales = rng.integers(100, 140, (EXPERTS, ROWS, GROUPS), dtype=np.uint8)
    scales[0, 0, :2] = (0, 254)  # 2^-127 (an f32 subnormal) and 2^127
    new = packed.copy()
    flip = rng.random(packed.shape) < 0.1
    new[flip] ^= rng.choice(np.array([0x01, 0x10, 0x11], np.uint8), int(flip.sum()))
    scales[1, 2, 1] = 127  # 1.0: doubled, each nonzero code of its block moves by 0.5 or more
    new_scales = scales.copy()
    new_scales[1, 2, 1] += 1
    return packed, scales, new, new_scales


@pytest.mark.parametrize("gpt_oss", [False, True], ids=["f4", "gpt-oss"])
@pytest.mark.parametrize("tol", [0.0, 1e-5, 0.3])
def test_mxfp4_against_the_oracle(tmp_path: Path, gpt_oss: bool, tol: float) -> None:
    packed, scales, new, new_scales = _pair(np.random.default_rng(21))
    base = _write(tmp_path / "base", _side(packed, scales, gpt_oss))
    tuned = _write(tmp_path / "tuned", _side(new, new_scales, gpt_oss))
    r = rlmask.diff(base, tuned, tol=tol, mask=True, magnitude=True, progress=False)
    with np.errstate(over="ignore", invalid="ignore"):
        a, b = dequant(packed, scales), dequant(new, new_scales)
    want = changed("F32", a.view(np.uint32), "F32", b.view(np.uint32), tol=tol).reshape(SHAPE)
    name = f"{NAME}_blocks" if gpt_oss else NAME
    rows = {row["name"]: row for row in r.tensors.iter_rows(named=True)}
    assert rows[name]["dtype"] == "F4" and rows[name]["shape"] == list(SHAPE)
    assert rows[name]["changed"] == int(want.sum()) and r.changed == int(want.sum())
    assert r.numel == int(np.prod(SHAPE))  # the codes, not the bytes; scales not counted
    assert r.mask is not None
    np.testing.assert_array_equal(r.mask[name], want)
    assert r.dequantised == [(name, "block 1x32", "block 1x32")]
    assert r.scales == [f"{NAME}_scales"]
    s = rows[f"{NAME}_scales"]
    assert not s["floating"] and s["changed"] == 1
    # The doubled scale moved every nonzero code of its block (by 0.5 or more), and no zero.
    nonzero = fp4(unpack(packed)).reshape(SHAPE)[1, 2, 32:64] != 0
    moved = fp4(unpack(packed)).reshape(SHAPE) != fp4(unpack(new)).reshape(SHAPE)
    np.testing.assert_array_equal(want[1, 2, 32:64], nonzero | moved[1, 2, 32:64])
    assert int(r.by_magnitude()["changed"].sum()) == r.changed


@pytest.mark.parametrize("gpt_oss", [False, True], ids=["f4", "gpt-oss"])
def test_exact_compares_codes_and_scales_as_stored(tmp_path: Path, gpt_oss: bool) -> None:
    packed, scales, new, new_scales = _pair(np.random.default_rng(22))
    base = _write(tmp_path / "base", _side(packed, scales, gpt_oss))
    tuned = _write(tmp_path / "tuned", _side(new, new_scales, gpt_oss))
    r = rlmask.diff(base, tuned, criterion="exact", mask=True, progress=False)
    code_moved = unpack(packed) != unpack(new)
    scale_moved = np.repeat((scales != new_scales).reshape(-1), 32)
    want = (code_moved | scale_moved).reshape(SHAPE)
    assert r.mask is not None
    np.testing.assert_array_equal(r.mask[next(iter(r.mask.names))], want)


def test_both_layouts_agree_and_the_mask_file_keeps_the_codes_shape(tmp_path: Path) -> None:
    packed, scales, new, new_scales = _pair(np.random.default_rng(23))
    masks = []
    for form in (False, True):
        base = _write(tmp_path / f"{form}" / "base", _side(packed, scales, form))
        tuned = _write(tmp_path / f"{form}" / "tuned", _side(new, new_scales, form))
        out = tmp_path / f"{form}.rlmask"
        res = CliRunner().invoke(cli, ["diff", str(base), str(tuned), "--save-mask", str(out)])
        assert res.exit_code == 0, res.output
        m = rlmask.load_mask(out)
        (name,) = m.names
        assert tuple(m[name].shape) == SHAPE
        masks.append(np.asarray(m[name]))
    np.testing.assert_array_equal(masks[0], masks[1])


def test_trajectory_of_mxfp4_checkpoints_agrees_with_diff(tmp_path: Path) -> None:
    rng = np.random.default_rng(24)
    packed, scales, new, new_scales = _pair(rng)
    later = new.copy()
    later[rng.random(new.shape) < 0.05] ^= 0x10
    base = _write(tmp_path / "base", _side(packed, scales, True))
    step1 = _write(tmp_path / "run" / "step1", _side(new, new_scales, True))
    step2 = _write(tmp_path / "run" / "step2", _side(later, new_scales, True))
    t = rlmask.trajectory(base, [step1, step2], save_masks=tmp_path / "masks", progress=False)
    (row,) = t.tensors.iter_rows(named=True)
    assert row["name"] == f"{NAME}_blocks" and row["numel"] == int(np.prod(SHAPE))
    for k, step in enumerate((step1, step2)):
        d = rlmask.diff(base, step, mask=True, progress=False)
        assert row["changed_vs_base"][k] == d.changed
        saved = rlmask.load_mask(tmp_path / "masks" / f"step-{k + 1}.rlmask")
        assert d.mask is not None
        np.testing.assert_array_equal(saved[row["name"]], d.mask[row["name"]])
    assert row["changed_consecutive"][1] == rlmask.diff(step1, step2, progress=False).changed
    assert [n for n, _ in t.skipped] == [f"{NAME}_scales"]


def test_what_cannot_be_read_is_refused(tmp_path: Path) -> None:
    packed, scales, _, _ = _pair(np.random.default_rng(25))
    # F4 codes without their scales: no values to compare.
    bare = _write(tmp_path / "bare", {NAME: torch.from_numpy(packed).view(torch.float4_e2m1fn_x2)})
    with pytest.raises(rlmask.CheckpointFormatError, match="without their E8M0 scales") as e:
        rlmask.diff(bare, bare, progress=False)
    assert e.value.tensor == NAME
    # Scales of the wrong shape.
    side = _side(packed, scales, False)
    side[f"{NAME}_scales"] = side[f"{NAME}_scales"][:, :, :2].contiguous()
    odd = _write(tmp_path / "odd", side)
    with pytest.raises(rlmask.CheckpointFormatError, match="one E8M0 scale"):
        rlmask.diff(odd, odd, progress=False)
    # An F4 tensor of an odd number of codes does not fill whole bytes.
    header = json.dumps({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    res = CliRunner().invoke(cli, ["diff", str(path), str(path)])
    assert res.exit_code == 1 and "not whole bytes" in res.stderr
    assert "Traceback" not in res.output
    # Patches carry bytes: gpt-oss's byte blocks are patched, F4 tensors are refused.
    f4 = _write(tmp_path / "f4", _side(packed, scales, False))
    res = CliRunner().invoke(cli, ["patch", "create", str(f4), str(f4), "-o", str(tmp_path / "p")])
    assert res.exit_code == 1 and "F4" in res.stderr, res.output
    oss = _write(tmp_path / "oss", _side(packed, scales, True))
    out = tmp_path / "p.rlpatch"
    res = CliRunner().invoke(cli, ["patch", "create", str(oss), str(oss), "-o", str(out)])
    assert res.exit_code == 0, res.output

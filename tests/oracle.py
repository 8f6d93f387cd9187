"""Independent references for the tests: a numpy re-implementation of the definitions
(DESIGN §1), tensors read back through the official safetensors library, and a byte-level
safetensors writer for files no official writer produces (odd alignment, shuffled data)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

# ---------------------------------------------------------------------------------------
# Reading raw element bits with the official library (through torch, which has every dtype).

_UINT = {
    1: (torch.uint8, np.uint8),
    2: (torch.int16, np.uint16),
    4: (torch.int32, np.uint32),
    8: (torch.int64, np.uint64),
}


def raw_bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's elements as unsigned integers of its width (flattened)."""
    if t.dtype == torch.bool:
        return t.reshape(-1).to(torch.uint8).numpy()
    tdt, ndt = _UINT[t.element_size()]
    return t.reshape(-1).contiguous().view(tdt).numpy().view(ndt)


def load_checkpoint(files: Iterable[Path]) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (safetensors dtype name, raw bits) for every tensor of the given shards."""
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = h.get_tensor(name)
                out[name] = (TORCH_TO_ST[t.dtype], raw_bits(t))
    return out


TORCH_TO_ST = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
FLOATS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}

# ---------------------------------------------------------------------------------------
# Values, written from the format definitions rather than from rlmask's tables.


def _minifloat(
    bits: np.ndarray, exp_bits: int, man_bits: int, ieee_special: bool, fnuz: bool = False
) -> np.ndarray:
    bits = bits.astype(np.int64)
    sign = np.where((bits >> (exp_bits + man_bits)) & 1, -1.0, 1.0)
    e = (bits >> man_bits) & ((1 << exp_bits) - 1)
    m = bits & ((1 << man_bits) - 1)
    bias = (1 << (exp_bits - 1)) - (0 if fnuz else 1)
    normal = np.ldexp(1.0 + m / (1 << man_bits), (e - bias).astype(np.int32))
    sub = np.ldexp(m / (1 << man_bits), 1 - bias)
    v = sign * np.where(e == 0, sub, normal)
    emax = (1 << exp_bits) - 1
    if fnuz:  # AMD: the pattern of negative zero is the one NaN; nothing else is special
        return np.where(bits == 0x80, np.nan, v)
    if ieee_special:
        v = np.where((e == emax) & (m == 0), sign * np.inf, v)
        v = np.where((e == emax) & (m != 0), np.nan, v)
    else:  # OCP E4M3: only S.1111.111 is NaN
        v = np.where((e == emax) & (m == (1 << man_bits) - 1), np.nan, v)
    return v


def values(dtype: str, bits: np.ndarray) -> np.ndarray:
    """Element values widened to float32, or float64 for F64."""
    if dtype == "F64":
        return bits.view(np.float64)
    if dtype == "F32":
        return bits.view(np.float32)
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return _minifloat(bits, 5, 10, True).astype(np.float32)
    if dtype == "F8_E5M2":
        return _minifloat(bits, 5, 2, True).astype(np.float32)
    if dtype == "F8_E4M3":
        return _minifloat(bits, 4, 3, False).astype(np.float32)
    if dtype == "F8_E4M3FNUZ":
        return _minifloat(bits, 4, 3, False, fnuz=True).astype(np.float32)
    if dtype == "F8_E5M2FNUZ":
        return _minifloat(bits, 5, 2, False, fnuz=True).astype(np.float32)
    raise ValueError(dtype)


def changed(
    dtype_a: str,
    a: np.ndarray,
    dtype_b: str,
    b: np.ndarray,
    *,
    criterion: str = "absolute",
    tol: float = 1e-5,
) -> np.ndarray:
    """The changed-mask of DESIGN §1 as a flat bool array."""
    if dtype_a not in FLOATS:
        assert dtype_a == dtype_b
        return a != b
    va, vb = values(dtype_a, a), values(dtype_b, b)
    wide = np.float64 if "F64" in (dtype_a, dtype_b) else np.float32
    va, vb = va.astype(wide), vb.astype(wide)
    same_bits = (a == b) if dtype_a == dtype_b else (va.view(_int(wide)) == vb.view(_int(wide)))
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(va - vb)
        if criterion == "exact":
            close = np.zeros_like(same_bits)
        elif criterion == "absolute":
            close = d <= wide(tol)
        else:
            close = np.isfinite(d) & (d <= wide(tol) * np.maximum(np.abs(va), np.abs(vb)))
    return ~(same_bits | close)


def _int(wide: type) -> type:
    return np.uint64 if wide is np.float64 else np.uint32


def expected_report(
    base: dict[str, tuple[str, np.ndarray]],
    tuned: dict[str, tuple[str, np.ndarray]],
    tolerances: Sequence[float],
    criterion: str = "absolute",
) -> dict[str, list[int]]:
    """name -> changed count per tolerance, for every tensor in both."""
    out = {}
    for name in sorted(set(base) & set(tuned)):
        (da, a), (db, b) = base[name], tuned[name]
        out[name] = [
            int(changed(da, a, db, b, criterion=criterion, tol=t).sum()) for t in tolerances
        ]
    return out


# ---------------------------------------------------------------------------------------
# A byte-level writer.

SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


def write_raw(
    path: Path,
    tensors: Sequence[tuple[str, str, Sequence[int], bytes]],
    *,
    data_order: Sequence[int] | None = None,
    metadata: dict[str, str] | None = None,
    pad_to: int = 1,
) -> None:
    """Writes ``(name, dtype, shape, data)`` tensors with data laid out in ``data_order`` (header
    order is as given), the header padded with spaces to a multiple of ``pad_to`` bytes (1: no
    padding, so data may start at any alignment)."""
    order = list(data_order) if data_order is not None else list(range(len(tensors)))
    offsets, blob, pos = {}, bytearray(), 0
    for i in order:
        data = tensors[i][3]
        offsets[i] = (pos, pos + len(data))
        blob += data
        pos += len(data)
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    for i, (name, dtype, shape, _) in enumerate(tensors):
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets[i])}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % pad_to)
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(blob))


def sparse_pair(folder: Path, elements: int) -> list[Path]:
    """Two F32 checkpoints of zeros held in holes: large to read, nothing on disk."""
    paths = []
    for name in ("a", "b"):
        header = json.dumps(
            {"w": {"dtype": "F32", "shape": [elements], "data_offsets": [0, 4 * elements]}}
        )
        text = header.encode() + b" " * (-len(header) % 8)
        p = folder / f"{name}.safetensors"
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + 4 * elements)
        paths.append(p)
    return paths


def binade(dtype: str, bits: np.ndarray) -> np.ndarray:
    """The IEEE biased exponent of |a| as f32 (f64: rebiased, clamped to 0..255)."""
    if dtype == "F64":
        e = ((bits.view(np.uint64) >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
        out = np.clip(e - 1023 + 127, 0, 255)
        out[e == 0] = 0
        out[e == 0x7FF] = 255
        return out
    f = values(dtype, bits).astype(np.float32)
    return ((f.view(np.uint32) >> 23) & 0xFF).astype(np.int64)

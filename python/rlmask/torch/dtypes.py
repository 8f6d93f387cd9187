"""torch dtypes and their safetensors names."""

from __future__ import annotations

import torch

#: torch dtypes by their safetensors names (those a model's state can hold).
_SAFETENSORS_DTYPE = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``BF16`` -> ``torch.bfloat16``)."""
    for dtype, safetensors_name in _SAFETENSORS_DTYPE.items():
        if safetensors_name == name:
            return dtype
    raise ValueError(f"no torch dtype for safetensors dtype '{name}'")

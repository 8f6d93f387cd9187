"""Shared by masking, tracking and live patches: packed bits on the device, parameter names
as paired, and the DTensor (FSDP2) helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch

from rlmask import _rlmask
from rlmask._mask import Mask, padded_len
from rlmask._names import natural_sorted
from rlmask._report import few
from rlmask.errors import MaskError

NameMap = Callable[[str], str] | Mapping[str, str] | None


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """LSB-first packed uint8 bits -> a flat bool tensor of ``numel`` elements (on the same
    device; one byte per element of temporary space)."""
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:numel].bool()


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A bool tensor -> LSB-first packed uint8 bits, padded to whole u64 words (the
    ``.rlmask`` layout)."""
    flat = flags.reshape(-1).to(torch.uint8)
    pad = padded_len(flat.numel()) * 8 - flat.numel()
    flat = torch.nn.functional.pad(flat, (0, pad))
    return (flat.reshape(-1, 8) << _shifts(flat.device)).sum(dim=1, dtype=torch.uint8)


def canonical_name(name: str, name_map: NameMap = None) -> str:
    """A parameter name as the mask spells it: wrapper segments (FSDP, activation
    checkpointing, torch.compile) and a DDP ``module.`` prefix removed, then ``name_map``
    applied (a callable, or a mapping of prefixes: ``{"": "model."}`` adds ``model.``,
    ``{"base_model.model.": ""}`` strips a PEFT prefix). Checkpoint pairing in
    :func:`rlmask.diff` uses the same rule."""
    if callable(name_map):
        return name_map(_rlmask.canonical_name(name))
    return _rlmask.canonical_name(name, list((name_map or {}).items()))


#: What :func:`attach_mask` does with trainable parameters the mask has no entry for.
Uncovered = Literal["error", "freeze", "train"]


def match_parameters(
    model: torch.nn.Module, mask: Mask, name_map: NameMap = None, *, uncovered: Uncovered = "error"
) -> tuple[list[tuple[torch.nn.Parameter, str, list[str]]], list[tuple[torch.nn.Parameter, str]]]:
    """Pairs every trainable parameter with its mask entry: ``(param, mask name, aliases)``,
    tied parameters once; and lists the trainable parameters the mask does not cover
    ``(param, name)``. Raises :class:`MaskError` for mask entries that match no parameter,
    shape mismatches, tied aliases whose masks differ, and (with ``uncovered="error"``)
    parameters without an entry, saying which of these happened."""
    if uncovered not in ("error", "freeze", "train"):
        raise ValueError(f"uncovered must be 'error', 'freeze' or 'train', not {uncovered!r}")
    by_param: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            by_param.setdefault(id(p), (p, []))[1].append(canonical_name(name, name_map))
    out, missing, bad_shape = [], [], []
    used: set[str] = set()
    for p, aliases in by_param.values():
        present = [a for a in aliases if a in mask]
        if not present:
            missing.append((p, aliases[0]))
            continue
        first = present[0]
        for other in present[1:]:
            if not np.array_equal(mask.packed(first), mask.packed(other)):
                raise MaskError(f"tied parameters '{first}' and '{other}' have different masks")
        used.update(present)
        if tuple(p.shape) != tuple(mask.shape(first)):
            bad_shape.append(
                f"'{first}': parameter {list(p.shape)}, mask {list(mask.shape(first))}"
            )
            continue
        out.append((p, first, aliases))
    unused = natural_sorted(set(mask.names) - used)
    missing_names = [n for _, n in missing]
    problems = []
    if missing and (uncovered == "error" or unused):
        problems.append(
            f"{len(missing)} trainable parameters have no mask entry ({few(missing_names, 4)})"
        )
    if unused:
        problems.append(
            f"{len(unused)} mask entries match no trainable parameter ({few(unused, 4)})"
        )
    if bad_shape:
        problems.append("shape mismatch: " + few(bad_shape, 4))
    if problems:
        if missing and unused:
            hint = (
                "the names differ between the model and the mask: pass name_map to translate "
                "them (wrapper segments such as DDP's 'module.' are removed already)"
            )
        elif missing:
            hint = (
                f"the names match, but the mask covers part of the model ({len(out)} of "
                f"{len(out) + len(missing)} parameters): pass uncovered='freeze' to keep the "
                "others fixed or uncovered='train' to train them fully"
            )
        elif unused:
            hint = (
                "the mask has entries for parameters the model lacks or does not train "
                "(requires_grad=False)"
            )
        else:
            hint = "the mask was taken from a model of another shape"
        raise MaskError("mask does not fit the model: " + "; ".join(problems) + f" ({hint})")
    return out, missing


def _is_dtensor(t: Any) -> bool:
    """An FSDP2 (or tensor-parallel) parameter, gradient or state: a DTensor. Checked by name,
    so that torch.distributed is imported only where it is in use."""
    return type(t).__name__ == "DTensor"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard, a view), or ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]


def refuse_sharded(tensors: Iterable[tuple[str, Any]], what: str) -> None:
    """Refuses FSDP2 (DTensor) parameters where ``what`` would count or fingerprint one rank's
    shard and report it as the model's: a wrong figure is worse than none.

    Raises:
        ValueError: naming the first sharded parameter.
    """
    for name, t in tensors:
        if _is_dtensor(t):
            raise ValueError(
                f"{what} does not support FSDP2 sharded parameters yet ('{name}' is a DTensor): "
                "its figures would be one rank's shard, not the model's. Measure an unsharded "
                "copy (e.g. the full state dict gathered on one rank) instead"
            )


def _local_bits(keep: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter's full flat mask ``keep`` that this rank's shard of ``p`` (a
    DTensor) holds, in the shard's shape."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        p.shape,
        p.device_mesh,  # type: ignore[attr-defined]
        p.placements,  # type: ignore[attr-defined]
    )
    full = keep.reshape(p.shape)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))].contiguous()


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor as same-width integers, for exact comparison (bool as is)."""
    if t.dtype == torch.bool:
        return t
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width)

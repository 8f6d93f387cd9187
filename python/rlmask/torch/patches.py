"""Live patches from a model in memory (design §9): snapshots, the patch of what changed since
one, writing it and applying one to a model; and the torch side of the patch formats."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from rlmask import _rlmask
from rlmask._io import PathArg
from rlmask._report import few
from rlmask.errors import CheckpointFormatError, MaskError, PairingError
from rlmask.patch import (
    _has_fingerprint,
    changes,
    tensor_entry,
    vllm_record,
    write_plain,
)
from rlmask.torch._common import (
    NameMap,
    _bits_view,
    canonical_name,
    refuse_sharded,
)
from rlmask.torch.dtypes import _SAFETENSORS_DTYPE, torch_dtype  # noqa: F401


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer as it is now, on its own device: the "last synced"
    state that :func:`make_patch` compares the model with."""
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=False).items()}


def _synced_state(
    model: torch.nn.Module, synced: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The model's state, checked to be whole (not sharded) and to match ``synced``'s names."""
    state = model.state_dict()
    refuse_sharded(state.items(), "live patches")
    if set(state) != set(synced):
        raise MaskError(
            "the snapshot does not hold the model's tensors: "
            + few(sorted(set(state) ^ set(synced)), 4)
        )
    return state


def make_patch(
    model: torch.nn.Module,
    synced: Mapping[str, torch.Tensor],
    path: PathArg,
    *,
    name_map: NameMap = None,
) -> int:
    """Writes the patch that turns ``synced`` (a :func:`snapshot`) into ``model``'s current
    state to ``path``, atomically, in the plain ``.rlpatch`` form (design §9), then updates
    ``synced`` in place to the current state. The changed elements are found on the
    parameters' device (bits compared, so every dtype and every change counts); only their
    indices and values cross to the host, plus each changed tensor's bytes once for its
    fingerprint. Names are stored as ``canonical_name`` gives them (wrappers removed,
    ``name_map`` applied), as :func:`attach_mask` matches them. Returns the elements changed.
    """
    state = _synced_state(model, synced)
    entries: dict[str, Any] = {}
    stored: dict[str, torch.Tensor] = {}
    total = 0
    for name, t in state.items():
        key = canonical_name(name, name_map)
        entries[key] = tensor_entry(key, synced[name], t.detach(), stored)
        total += entries[key]["changed"]
    write_plain(path, entries, stored)
    with torch.no_grad():
        for name, t in state.items():
            synced[name].copy_(t)
    return total


def live_records(
    model: torch.nn.Module, synced: Mapping[str, torch.Tensor], *, name_map: NameMap = None
) -> Iterator[dict[str, Any]]:
    """The changes since ``synced`` (a :func:`snapshot`) as vLLM-shaped records
    (:func:`rlmask.patch.records`), one per changed tensor, for a live sync loop without a
    file: found on the parameters' device (bits compared), indices and values left there (an
    engine's NCCL path takes them as they are), names as ``canonical_name`` gives them. Each
    tensor's snapshot is brought up to date as its record is taken: a loop that stops early
    leaves ``synced`` at what it sent.

    Example:
        >>> synced = rlmask.torch.snapshot(model)
        >>> ...  # a training step
        >>> for r in rlmask.torch.live_records(model, synced):
        ...     engine.update_sparse(r["name"], r["indices"], r["values"], r["shape"])

    Raises:
        MaskError: the snapshot does not hold the model's tensors.
        ValueError: a NaN value (vLLM refuses them), naming the tensor.
    """
    state = _synced_state(model, synced)
    for name, t in state.items():
        new, old = t.detach(), synced[name]
        flat = new.reshape(-1)
        indices = torch.nonzero(_bits_view(flat) != _bits_view(old.reshape(-1))).reshape(-1)
        if not indices.numel():
            continue
        key = canonical_name(name, name_map)
        dtype = _SAFETENSORS_DTYPE[new.dtype]
        record = vllm_record(key, list(new.shape), dtype, indices, flat[indices], where="model")
        with torch.no_grad():
            old.copy_(new)
        yield record


def apply_patch(model: torch.nn.Module, path: PathArg, *, name_map: NameMap = None) -> None:
    """Applies a ``.rlpatch`` to ``model``'s parameters and buffers in place, checking each
    tensor's fingerprint before (the model must be in the state the patch was made from) and
    after. The patch is validated by the core first; values go to each tensor's own device.

    Raises:
        PairingError: the model is not in the state the patch starts from (naming the tensor),
            or does not hold the patch's tensors.
        CheckpointFormatError: a corrupt patch.
    """
    patch = _rlmask.PatchFile(os.fspath(path))
    entries = {e.name: e for e in patch.entries()}
    state = model.state_dict()
    refuse_sharded(state.items(), "live patches")
    by_key = {canonical_name(n, name_map): n for n in state}
    missing = sorted(set(entries) - set(by_key))
    if missing:
        raise PairingError(f"the model has no tensor for {few(missing, 4)} of patch {path}")
    with torch.no_grad():
        for key, e in entries.items():
            t = state[by_key[key]]
            if e.form == "none":
                continue
            if not _has_fingerprint(t, e.base):
                raise PairingError(
                    f"tensor '{key}' is not in the state patch {path} was made from (its "
                    "fingerprint differs): apply the patches in order, starting from the same "
                    "weights"
                )
            flat = t.view(-1)
            got = changes(patch, e)
            assert got is not None  # the form says it changes
            idx, values = got
            if idx is None:
                flat.copy_(values.to(t.device))
            else:
                flat[idx.to(t.device)] = values.to(t.device)
            if not _has_fingerprint(t, e.tuned):
                raise CheckpointFormatError(
                    f"corrupt patch {path}: tensor '{key}' does not have the fingerprint the "
                    "patch promises"
                )

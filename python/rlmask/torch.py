"""Subnetwork-only finetuning and update tracking for PyTorch (paper §1 Conjecture 1, §4, §6,
Appendix D; design §1). Importing this module imports torch.

Masked training
---------------
:func:`attach_mask` makes an ordinary training loop train only a subnetwork: every gradient is
replaced by ``m ⊙ ∇L`` as it is produced (a tensor hook on each parameter), so gradient
accumulation, clipping and logging all see the subnetwork's gradient, and after any number of
steps every element outside the mask is bit-identical to where it started.

Zero gradients alone do not guarantee that. Weight decay moves every parameter whose gradient
is not None: decoupled decay (AdamW, or ``decoupled_weight_decay=True``) multiplies the whole
tensor by ``1 - lr * wd``; coupled decay (SGD, Adam, RMSprop, ...) adds ``wd * p`` to the
gradient, which then feeds momentum and the update. So while a mask is attached, a step
pre-hook sets each parameter group's ``weight_decay`` to 0 for the duration of the step and
applies the same decay itself to the masked elements only (the decoupled multiply before the
update; the coupled term added to the gradient), and a post-hook puts ``weight_decay`` back.
With the decay handled, every optimizer in ``torch.optim`` of the SGD, Adam and AdamW families,
in their default, ``foreach`` and ``fused`` forms, leaves a zero-gradient element with zero
state and so exactly unchanged (``p + (-0.0) == p``, bit for bit, whatever the dtype); the tests
check this over many steps for each form, with clipping and accumulation, in float32 and
bfloat16.

Memory: the mask is kept on each parameter's device packed, one bit per element. The hook
unpacks one parameter's mask at a time (one byte per element, freed at once) and allocates the
masked gradient (one gradient's worth); the weight-decay emulation allocates one parameter's
worth of temporary space per parameter, one at a time.

Loops without callbacks (verl, OpenRLHF, custom loops) call :func:`attach_mask` once after
building the model and optimizer (for wrapped optimizers, pass the inner ``torch.optim``
optimizer, e.g. ``accelerator_optimizer.optimizer``) and ``handle.remove()`` when done.

Update tracking
---------------
:class:`UpdateTracker` records, after each optimizer step, which elements changed since the
previous step and since the start, exactly and at a tolerance (Appendix D, Figure 7b), keeps
packed "ever changed" bits, and at the end reports the three categories of Figure 2 and the
share of ever-changed elements outside the final subnetwork (Figure 6).
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import polars as pl
import torch

from rlmask import _rlmask
from rlmask._io import PathArg
from rlmask._mask import Mask, padded_len
from rlmask._names import natural_sorted
from rlmask._report import few
from rlmask.errors import CheckpointFormatError, MaskError, PairingError

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


def _is_decoupled(optimizer: torch.optim.Optimizer, group: Mapping[str, Any]) -> bool:
    """AdamW and torch's Adafactor shrink the weights (``p *= 1 - lr * wd``); the others add
    ``wd * p`` to the gradient unless ``decoupled_weight_decay`` is set."""
    return isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adafactor)) or bool(
        group.get("decoupled_weight_decay")
    )


#: The handle attached to each model and optimizer: a second mask on the same model or optimizer
#: would leave the first one's hooks in place (its weight decay would keep moving elements the
#: second mask freezes), so it is refused until the first is removed.
_ATTACHED: weakref.WeakKeyDictionary[Any, MaskHandle] = weakref.WeakKeyDictionary()


@dataclass
class MaskHandle:
    """What :func:`attach_mask` attached; :meth:`remove` returns the model and optimizer to
    ordinary training."""

    params: list[tuple[torch.nn.Parameter, str]]
    _masks: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict, repr=False)
    #: Names of trainable parameters the mask does not cover, frozen (``uncovered="freeze"``)
    #: or trained fully (``uncovered="train"``).
    frozen: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    #: Nonzero first moments (``exp_avg``, ``momentum_buffer``) of frozen elements that a
    #: resumed optimizer held at attach, zeroed so that they cannot push those elements.
    zeroed_state: int = 0
    _hooks: list[Any] = field(default_factory=list, repr=False)
    _saved_decay: list[tuple[dict[str, Any], float]] = field(default_factory=list, repr=False)
    # Weak, so that the registry of attached handles never keeps a model alive.
    _owners: list[weakref.ref[Any]] = field(default_factory=list, repr=False)

    def __repr__(self) -> str:
        trained = sum(int(unpack_bits(t, n).sum()) for t, n in self._masks.values())
        total = sum(n for _, n in self._masks.values())
        share = f" ({100 * trained / total:.3f}%)" if total else ""
        extra = "".join(
            f", {len(names)} uncovered {what}"
            for names, what in ((self.frozen, "frozen"), (self.trained, "trained fully"))
            if names
        )
        state = "attached" if self._owners else "removed"
        return (
            f"<MaskHandle {state}: {len(self.params)} parameters, {trained:,} of {total:,} "
            f"elements trainable{share}{extra}, {self.mask_bytes:,} bytes of masks>"
        )

    def mask_of(self, p: torch.Tensor) -> torch.Tensor:
        """The bool mask of a parameter, in its shape and on its device (of an FSDP2
        parameter, the bits of this rank's shard, in the shard's shape)."""
        packed, numel = self._masks[id(p)]
        return unpack_bits(packed, numel).reshape(_local(p).shape)

    @property
    def mask_bytes(self) -> int:
        """Device memory the packed masks occupy."""
        return sum(t.numel() for t, _ in self._masks.values())

    def remove(self) -> None:
        """Removes every hook and frees the packed masks; another mask may then be attached."""
        for ref in self._owners:
            owner = ref()
            if owner is not None and _ATTACHED.get(owner) is self:
                del _ATTACHED[owner]
        self._owners.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for group, wd in self._saved_decay:  # only if removed mid-step
            group["weight_decay"] = wd
        self._saved_decay.clear()
        self._masks.clear()


#: Optimizers that move an element whose gradient is zero, by class name, and why.
MOVES_FROZEN = {
    "ASGD": "it shrinks every weight at every step (p *= 1 - lambd * eta), whatever its gradient",
    "Muon": "it orthogonalises each matrix's update, which spreads a masked gradient over every "
    "element of the matrix",
}

#: Per-element optimizer state that carries past gradients into later updates (first moments):
#: zeroed for the frozen elements at attach, so a resumed optimizer cannot push them.
_MOMENTUM_STATE = frozenset(("exp_avg", "momentum_buffer"))
#: Per-element state that only scales an update (second moments, step sizes, averages): an
#: element whose gradient is zero gets a zero update whatever these hold, so they are kept.
_SCALING_STATE = frozenset(
    (
        "step",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "square_avg",
        "acc_delta",
        "sum",
        "exp_inf",
        "prev",
        "step_size",
        "grad_avg",
        "row_var",
        "col_var",
        "variance",
        "exp_avg_sq_row",
        "exp_avg_sq_col",
        "eta",
        "mu",
        "ax",
    )
)


def _check_optimizer(
    optimizer: torch.optim.Optimizer,
    targets: list[tuple[torch.Tensor, str]],
    allow_moving_frozen: bool,
) -> None:
    """Refuses an optimizer that would move frozen elements: one that moves weights whatever
    their gradient (unless allowed), one that does not hold the parameters the mask governs,
    a resumed LBFGS, transformers' Adafactor with weight decay, or per-element state whose
    meaning rlmask does not know."""
    kind = type(optimizer).__name__
    for cls in type(optimizer).__mro__:
        if cls.__name__ in MOVES_FROZEN and not allow_moving_frozen:
            raise MaskError(
                f"{kind} would move frozen elements: {MOVES_FROZEN[cls.__name__]}. Use another "
                "optimizer, or pass allow_moving_frozen=True to train with it anyway (frozen "
                "elements then move)"
            )
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for t, name in targets:
        if id(t) not in held:
            raise MaskError(
                f"the optimizer does not hold parameter '{name}', which the mask governs: it "
                "would step other tensors (an fp32 master copy behind a bf16 model?). Pass "
                "masters={model parameter: the tensor the optimizer steps} for master-weight "
                "setups, or the optimizer built on this model's parameters"
            )
    if isinstance(optimizer, torch.optim.LBFGS) and optimizer.state:
        raise MaskError(
            "LBFGS keeps a history of whole-model directions that a mask cannot cut: attach "
            "the mask before its first step (or build a new LBFGS)"
        )
    foreign_adafactor = type(optimizer).__module__.startswith("transformers") and (
        kind == "Adafactor"
    )
    if foreign_adafactor and any(g.get("weight_decay") for g in optimizer.param_groups):
        raise MaskError(
            "transformers' Adafactor applies weight decay with a learning rate it computes "
            "inside its step, which rlmask cannot restrict to the mask: set weight_decay=0 "
            "or use torch.optim.Adafactor"
        )
    for t, name in targets:
        for key, value in optimizer.state.get(t, {}).items():
            per_element = torch.is_tensor(value) and value.shape == t.shape and t.numel() > 1
            if per_element and key not in _MOMENTUM_STATE | _SCALING_STATE:
                raise MaskError(
                    f"{kind} holds per-element state '{key}' for '{name}' whose effect on frozen "
                    "elements rlmask does not know: attach the mask before the optimizer's "
                    "first step"
                )


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


def _mask_local_grad(masks: dict[int, tuple[torch.Tensor, int]]) -> Callable[[Any], None]:
    """A post-accumulate-grad hook for FSDP2 parameters: zeroes the frozen elements of this
    rank's gradient shard once FSDP2 has reduce-scattered it (tensor hooks do not fire on
    sharded parameters), so clipping and the step see the masked gradient."""

    def hook(p: Any) -> None:
        if p.grad is None:
            return
        packed, numel = masks[id(p)]
        grad = _local(p.grad)
        keep = unpack_bits(packed, numel).reshape(grad.shape)
        with torch.no_grad():
            grad.masked_fill_(~keep, 0)

    return hook


def _zero_momentum(
    optimizer: torch.optim.Optimizer, target: torch.Tensor, keep: torch.Tensor
) -> int:
    """Zeroes the first moments of ``target``'s frozen elements (where ``keep`` is False);
    returns how many were nonzero."""
    moved = 0
    for key, value in optimizer.state.get(target, {}).items():
        if key in _MOMENTUM_STATE and torch.is_tensor(value) and value.shape == target.shape:
            local = _local(value)
            frozen = ~keep.to(local.device).reshape(local.shape)
            moved += int((local[frozen] != 0).sum())
            with torch.no_grad():
                local.masked_fill_(frozen, 0)
    return moved


def attach_mask(
    model: torch.nn.Module,
    mask: Mask | str | os.PathLike[str],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    name_map: NameMap = None,
    uncovered: Uncovered = "error",
    masters: Mapping[torch.nn.Parameter, torch.Tensor] | None = None,
    allow_moving_frozen: bool = False,
) -> MaskHandle:
    """Trains only the subnetwork ``mask`` from now on (paper §4, Conjecture 1).

    Args:
        model: the model; its trainable parameters are matched to the mask by name.
        mask: a :class:`~rlmask.Mask`, or the path of an ``.rlmask`` file; 1 = train.
        optimizer: the ``torch.optim`` optimizer; needed so that weight decay cannot move
            frozen elements (see the module docs). Without it only gradients are masked.
        name_map: translates model parameter names to mask names (see :func:`canonical_name`).
        uncovered: what happens to trainable parameters the mask has no entry for (a mask
            of the MLPs only, say): ``"error"`` (default) refuses, ``"freeze"`` keeps them
            fixed (as an all-zero mask would: no gradient, no weight decay), ``"train"``
            trains them fully. The handle lists them in ``frozen`` or ``trained``.
        masters: for mixed-precision setups whose optimizer steps fp32 master copies (and
            copies them back into a bf16 model): ``{model parameter: its master}``. The
            gradient is masked on the model parameter (so the master's, copied from it, is
            masked too); weight decay and optimizer state are masked on the master, which is
            what moves.
        allow_moving_frozen: train with an optimizer of :data:`MOVES_FROZEN` (ASGD, Muon)
            anyway; frozen elements then move.

    A resumed optimizer (one with state from unmasked steps) keeps momentum that would push
    frozen elements: at attach, the first moments (``exp_avg``, ``momentum_buffer``) of the
    frozen elements are zeroed (:attr:`MaskHandle.zeroed_state` counts the nonzero ones);
    second moments and step sizes only scale an update that is zero, and are kept.

    Returns:
        A :class:`MaskHandle`; ``handle.remove()`` detaches everything.

    Raises:
        MaskError: the mask does not fit the model (the message says how: names that differ,
            a mask that covers part of the model, shapes); the model or optimizer already
            has a mask attached (remove that handle first); the optimizer would move frozen
            elements (ASGD, Muon, a resumed LBFGS, transformers' Adafactor with weight decay,
            per-element state of unknown meaning) or does not hold the masked parameters;
            ``masters`` given for FSDP2 parameters, or not matching the parameters.

    Example:
        >>> handle = rlmask.torch.attach_mask(model, rlmask.load_mask("grpo.rlmask"), opt)
        >>> for batch in data:
        ...     loss = model(**batch).loss; loss.backward()
        ...     torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # masked norm
        ...     opt.step(); opt.zero_grad()
        >>> handle.remove()
    """
    if isinstance(mask, (str, os.PathLike)):
        from rlmask._mask import load_mask

        mask = load_mask(mask)
    for owner, what in ((model, "model"), (optimizer, "optimizer")):
        if owner is not None and owner in _ATTACHED:
            raise MaskError(
                f"this {what} already has a mask attached; call remove() on the handle that "
                "attach_mask returned before attaching another"
            )
    matched, missing = match_parameters(model, mask, name_map, uncovered=uncovered)
    frozen = missing if uncovered == "freeze" else []
    governed = [(p, name) for p, name, _ in matched] + list(frozen)
    masters = dict(masters or {})
    unknown = [name for p, name in governed if masters and p not in masters]
    if masters and any(_is_dtensor(p) for p, _ in governed):
        raise MaskError("masters= is for unsharded models; FSDP2 keeps its own fp32 shards")
    if unknown:
        raise MaskError(f"masters has no entry for {few(unknown, 3)}")
    for p, name in governed:
        m = masters.get(p)
        if m is not None and tuple(m.shape) != tuple(p.shape):
            raise MaskError(
                f"the master of '{name}' has shape {list(m.shape)}, the parameter {list(p.shape)}"
            )
    targets = [(masters.get(p, p), name) for p, name in governed]
    if optimizer is not None:
        _check_optimizer(optimizer, targets, allow_moving_frozen)
    handle = MaskHandle([(p, name) for p, name, _ in matched])
    masks = handle._masks
    if uncovered == "train":
        handle.trained = [n for _, n in missing]
    elif uncovered == "freeze":
        handle.frozen = [n for _, n in missing]
    for owner in (model, optimizer):
        if owner is not None:
            _ATTACHED[owner] = handle
            handle._owners.append(weakref.ref(owner))
    for p, packed in [
        *((p, torch.from_numpy(np.array(mask.packed(name)))) for p, name, _ in matched),
        *((p, torch.zeros(padded_len(p.numel()), dtype=torch.uint8)) for p, _ in frozen),
    ]:
        if _is_dtensor(p):
            # Each rank keeps the bits of its own shard only, sliced once here, and masks its
            # gradient shard after the reduce-scatter (tensor hooks do not fire on shards).
            local = _local_bits(unpack_bits(packed, p.numel()), p)
            masks[id(p)] = (pack_bits(local).to(_local(p).device), local.numel())
            local_hook = _mask_local_grad(masks)
            handle._hooks.append(
                p.register_post_accumulate_grad_hook(local_hook)  # type: ignore[no-untyped-call]
            )
        else:
            masks[id(p)] = (packed.to(p.device), p.numel())
            master = masters.get(p)
            if master is not None:  # weight decay and state are masked where the step happens
                masks[id(master)] = (packed.to(master.device), p.numel())

            def hook(grad: torch.Tensor, key: int = id(p)) -> torch.Tensor:
                packed, numel = masks[key]
                keep = unpack_bits(packed, numel).reshape(grad.shape)
                return grad.masked_fill(~keep, 0)

            handle._hooks.append(p.register_hook(hook))  # type: ignore[no-untyped-call]
        if optimizer is not None:
            target = masters.get(p, p)
            handle.zeroed_state += _zero_momentum(optimizer, target, handle.mask_of(target))

    if optimizer is not None:
        handle._hooks += _decay_hooks(optimizer, handle)
    return handle


def _decay_hooks(optimizer: torch.optim.Optimizer, handle: MaskHandle) -> list[Any]:
    """Step hooks that apply weight decay to the masked elements only."""

    def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            wd = group.get("weight_decay", 0.0)
            if not wd:
                continue
            handle._saved_decay.append((group, wd))
            group["weight_decay"] = 0.0
            lr = group["lr"]
            sign = -1.0 if group.get("maximize") else 1.0
            with torch.no_grad():
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    keep = handle.mask_of(p) if id(p) in handle._masks else None
                    # On this rank's shard for FSDP2 parameters: never a DTensor mixed with
                    # a plain tensor, never a gathered parameter.
                    data, grad = _local(p), _local(p.grad)
                    if _is_decoupled(opt, group):
                        new = data.mul(1 - lr * wd)
                        data.copy_(new if keep is None else torch.where(keep, new, data))
                    else:
                        g = grad.add(data, alpha=sign * wd)
                        grad.copy_(g if keep is None else torch.where(keep, g, grad))

    def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, wd in handle._saved_decay:
            group["weight_decay"] = wd
        handle._saved_decay.clear()

    return [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]


# --------------------------------------------------------------------------------------------
# Update tracking


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor as same-width integers, for exact comparison (bool as is)."""
    if t.dtype == torch.bool:
        return t
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(width)


def _changed(new: torch.Tensor, old: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(changed exactly, changed at ``tol``) per design §1, as bool tensors."""
    exact = _bits_view(new) != _bits_view(old)
    wide = torch.float64 if new.dtype == torch.float64 else torch.float32
    close = (new.to(wide) - old.to(wide)).abs() <= tol
    return exact, exact & ~close


@dataclass(frozen=True)
class TrackerReport:
    """What :class:`UpdateTracker` saw.

    Attributes:
        steps: one row per optimizer step: step, changed_since_prev and changed_since_start
            (exact and at ``tol``, counts and fractions of all tracked elements).
        categories: for ``exact`` and ``tol``: never changed, changed then returned to the
            initial value, changed at the end (the three categories of Figure 2), as counts and
            fractions, plus ``outside_final``: the share of ever-changed elements that are not
            in the final subnetwork (Figure 6).
    """

    numel: int
    tol: float
    steps: pl.DataFrame
    categories: pl.DataFrame


class UpdateTracker:
    """Watches which parameter elements move at each optimizer step, without saving
    checkpoints (Appendix D, Figures 2, 6, 7b).

    Call :meth:`step` after every ``optimizer.step()``, or pass ``optimizer`` to have it called
    by a step post-hook. Under FSDP2 every rank tracks its own shards, the counts are
    all-reduced and the masks gathered (collectives: every rank calls :meth:`step`,
    :meth:`report` and the mask methods). Memory: two copies of the tracked parameters (the
    initial values and the previous step's, each in the parameters' own dtype and device) plus
    two packed bits per element (ever changed exactly, and at ``tol``).

    Example:
        >>> tracker = rlmask.torch.UpdateTracker(model, optimizer=opt, tol=1e-5)
        >>> ...train...
        >>> tracker.report().categories; tracker.final_mask().save("final.rlmask")
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        tol: float = 1e-5,
        optimizer: torch.optim.Optimizer | None = None,
        names: Iterable[str] | None = None,
        name_map: NameMap = None,
    ) -> None:
        wanted = set(names) if names is not None else None
        self.tol = tol
        self._params: dict[str, torch.nn.Parameter] = {}
        seen: set[int] = set()
        for name, p in model.named_parameters():
            key = canonical_name(name, name_map)
            if not p.requires_grad or id(p) in seen or (wanted is not None and key not in wanted):
                continue
            seen.add(id(p))
            self._params[key] = p
        if not self._params:
            raise ValueError("no trainable parameter to track")
        # Under FSDP2 each rank keeps copies and bits of its own shards only; counts are
        # all-reduced and masks gathered, so every figure is the model's, never one rank's.
        self._group = next(
            (p.device_mesh.get_group() for p in self._params.values() if _is_dtensor(p)),  # type: ignore[attr-defined]
            None,
        )
        with torch.no_grad():
            self._init = {n: _local(p).detach().clone() for n, p in self._params.items()}
            self._prev = {n: _local(p).detach().clone() for n, p in self._params.items()}
        self._ever = {
            n: torch.zeros(padded_len(t.numel()), dtype=torch.uint8, device=t.device)
            for n, t in self._init.items()
        }
        self._ever_tol = {n: t.clone() for n, t in self._ever.items()}
        self._rows: list[dict[str, Any]] = []
        self._hook = None
        if optimizer is not None:

            def after_step(*_: Any) -> None:
                self.step()

            self._hook = optimizer.register_step_post_hook(after_step)

    @property
    def numel(self) -> int:
        """Elements tracked."""
        return sum(p.numel() for p in self._params.values())

    @torch.no_grad()
    def step(self) -> dict[str, Any]:
        """Records the step just taken; returns its row."""
        counts = dict.fromkeys(("prev_exact", "prev_tol", "start_exact", "start_tol"), 0)
        for n, p in self._params.items():
            cur = _local(p).detach()
            e_prev, t_prev = _changed(cur, self._prev[n], self.tol)
            e_start, t_start = _changed(cur, self._init[n], self.tol)
            self._ever[n] |= pack_bits(e_prev)
            self._ever_tol[n] |= pack_bits(t_start)
            counts["prev_exact"] += int(e_prev.sum())
            counts["prev_tol"] += int(t_prev.sum())
            counts["start_exact"] += int(e_start.sum())
            counts["start_tol"] += int(t_start.sum())
            self._prev[n].copy_(cur)
        if self._group is not None:
            summed = torch.tensor(list(counts.values()), dtype=torch.int64)
            torch.distributed.all_reduce(summed, group=self._group)
            counts = dict(zip(counts, summed.tolist(), strict=True))
        total = self.numel
        row: dict[str, Any] = {"step": len(self._rows) + 1}
        for key, c in counts.items():
            row[f"changed_{key}"] = c
            row[f"fraction_{key}"] = c / total
        self._rows.append(row)
        return row

    def _full_bits(self, n: str, bits: torch.Tensor) -> torch.Tensor:
        """A parameter's packed bits over the whole tensor: this rank's shard's bits gathered
        from every rank for an FSDP2 parameter (a collective: every rank calls it)."""
        p = self._params[n]
        if not _is_dtensor(p):
            return bits
        from torch.distributed.tensor import DTensor

        local = unpack_bits(bits, self._init[n].numel()).reshape(self._init[n].shape)
        shard = DTensor.from_local(
            local.to(torch.uint8),
            p.device_mesh,  # type: ignore[attr-defined]
            p.placements,  # type: ignore[attr-defined]
            shape=p.shape,
            stride=p.stride(),
        )
        return pack_bits(shard.full_tensor().bool())

    def _mask(self, bits: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> Mask:
        packed = {
            n: (
                tuple(p.shape),
                str(p.dtype).removeprefix("torch."),
                self._full_bits(n, bits[n]).cpu().numpy(),
            )
            for n, p in self._params.items()
        }
        meta = {"source": "UpdateTracker", "steps": str(len(self._rows)), **meta}
        return Mask.from_packed(packed, meta)

    @torch.no_grad()
    def final_mask(self, *, exact: bool = False) -> Mask:
        """Elements that differ from their initial values now (at ``tol``, or exactly)."""
        bits = {}
        for n, p in self._params.items():
            e, t = _changed(_local(p).detach(), self._init[n], self.tol)
            bits[n] = pack_bits(e if exact else t)
        return self._mask(
            bits,
            {
                "criterion": "exact" if exact else "absolute",
                "tolerance": "0" if exact else repr(self.tol),
                "what": "final",
            },
        )

    def ever_changed_mask(self, *, exact: bool = False) -> Mask:
        """Elements that differed at some step: from the previous step's value (exact), or from
        the initial value by more than ``tol``."""
        bits = self._ever if exact else self._ever_tol
        return self._mask(
            bits,
            {
                "criterion": "exact" if exact else "absolute",
                "tolerance": "0" if exact else repr(self.tol),
                "what": "ever changed",
            },
        )

    def save_masks(self, directory: PathArg, *, exact: bool = False) -> list[Path]:
        """Writes the categories of Figure 2 as ``.rlmask`` files in ``directory``:
        ``final.rlmask`` (changed at the end), ``ever_changed.rlmask`` and
        ``changed_then_returned.rlmask`` (ever changed, not changed at the end). Returns the
        paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        final, ever = self.final_mask(exact=exact), self.ever_changed_mask(exact=exact)
        paths = []
        for name, mask in (
            ("final", final),
            ("ever_changed", ever),
            ("changed_then_returned", ever - final),
        ):
            paths.append(out / f"{name}.rlmask")
            mask.save(paths[-1])
        return paths

    def report(self) -> TrackerReport:
        """Per-step fractions and the final categories (Figures 2 and 6)."""
        cats = []
        for label, exact in (("exact", True), (f"tol={self.tol:g}", False)):
            ever = self.ever_changed_mask(exact=exact)
            final = self.final_mask(exact=exact)
            n_ever, n_final = ever.count, final.count
            n_both = (ever & final).count
            total = self.numel
            cats.append(
                {
                    "criterion": label,
                    "never_changed": total - n_ever,
                    "changed_then_returned": n_ever - n_both,
                    "changed_at_end": n_final,
                    "never_changed_fraction": (total - n_ever) / total,
                    "changed_then_returned_fraction": (n_ever - n_both) / total,
                    "changed_at_end_fraction": n_final / total,
                    "outside_final": (n_ever - n_both) / n_ever if n_ever else math.nan,
                }
            )
        return TrackerReport(self.numel, self.tol, pl.DataFrame(self._rows), pl.DataFrame(cats))

    def remove(self) -> None:
        """Stops the automatic step hook and frees the copies."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._init.clear()
        self._prev.clear()


# --------------------------------------------------------------------------------------------
# Live patches (design §9): a trainer's step as a patch, applied in place on an inference copy


def _host_bytes(t: torch.Tensor) -> npt.NDArray[np.uint8]:
    """A tensor's raw bytes on the host (one transfer), as a flat uint8 array."""
    flat = t.detach().reshape(-1).contiguous()
    return flat.view(torch.uint8).cpu().numpy()


def _fingerprint(t: torch.Tensor) -> str:
    return _rlmask.fingerprint(_host_bytes(t))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer as it is now, on its own device: the "last synced"
    state that :func:`make_patch` compares the model with."""
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=False).items()}


def tensor_entry(
    key: str, old: torch.Tensor, new: torch.Tensor, stored: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The patch entry of one tensor (design §9) from its ``old`` and ``new`` state, adding
    what the patch stores for it to ``stored`` (host tensors): the elements whose bits differ
    are found on the tensors' device; the dense form where it is no larger."""
    flat_new, flat_old = new.reshape(-1), old.reshape(-1)
    idx = torch.nonzero(_bits_view(flat_new) != _bits_view(flat_old)).reshape(-1)
    n, numel = int(idx.numel()), flat_new.numel()
    wide = numel > 2**31
    form, before = "none", _fingerprint(old)
    if n and n * ((8 if wide else 4) + flat_new.element_size()) >= numel * new.element_size():
        form = "dense"
        stored[f"{key}.dense"] = new.cpu().contiguous()
    elif n:
        form = "sparse"
        stored[f"{key}.indices"] = idx.to(torch.int64 if wide else torch.int32).cpu()
        stored[f"{key}.values"] = flat_new[idx].cpu()
    return {
        "shape": list(new.shape),
        "dtype": _SAFETENSORS_DTYPE[new.dtype],
        "changed": n,
        "form": form,
        "base": before,
        "tuned": _fingerprint(new) if n else before,
    }


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
    from rlmask.patch import write_plain

    state = model.state_dict()
    refuse_sharded(state.items(), "live patches")
    if set(state) != set(synced):
        raise MaskError(
            "the snapshot does not hold the model's tensors: "
            + few(sorted(set(state) ^ set(synced)), 4)
        )
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


def apply_patch(model: torch.nn.Module, path: PathArg, *, name_map: NameMap = None) -> None:
    """Applies a ``.rlpatch`` to ``model``'s parameters and buffers in place, checking each
    tensor's fingerprint before (the model must be in the state the patch was made from) and
    after. The patch is validated by the core first; values go to each tensor's own device.

    Raises:
        PairingError: the model is not in the state the patch starts from (naming the tensor),
            or does not hold the patch's tensors.
        CheckpointFormatError: a corrupt patch.
    """
    from rlmask.patch import changes

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
            if _fingerprint(t) != e.base:
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
            if _fingerprint(t) != e.tuned:
                raise CheckpointFormatError(
                    f"corrupt patch {path}: tensor '{key}' does not have the fingerprint the "
                    "patch promises"
                )


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

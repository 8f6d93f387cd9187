"""Masked training: :func:`attach_mask` and its handle (design §10)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rlmask._mask import Mask, padded_len
from rlmask._report import few
from rlmask.errors import MaskError
from rlmask.torch._common import (
    NameMap,
    Uncovered,
    _is_dtensor,
    _local,
    _local_bits,
    match_parameters,
    pack_bits,
    unpack_bits,
)


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

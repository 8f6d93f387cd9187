"""Subnetwork-only finetuning and update tracking for PyTorch (paper §1 Conjecture 1, §4, §6,
Appendix D; design §1). Importing this package imports torch. One module per area:
``masking`` (:func:`attach_mask`), ``tracking`` (:class:`UpdateTracker`), ``patches`` (live
patches), ``dtypes``, and ``_common`` (bits, names, DTensor helpers).

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

from rlmask.patch import tensor_entry
from rlmask.torch._common import (
    NameMap,
    Uncovered,
    canonical_name,
    match_parameters,
    pack_bits,
    refuse_sharded,
    unpack_bits,
)
from rlmask.torch.dtypes import torch_dtype
from rlmask.torch.masking import MOVES_FROZEN, MaskHandle, attach_mask
from rlmask.torch.patches import apply_patch, live_records, make_patch, snapshot
from rlmask.torch.tracking import TrackerReport, UpdateTracker

__all__ = [
    "MOVES_FROZEN",
    "MaskHandle",
    "NameMap",
    "TrackerReport",
    "Uncovered",
    "UpdateTracker",
    "apply_patch",
    "attach_mask",
    "canonical_name",
    "live_records",
    "make_patch",
    "match_parameters",
    "pack_bits",
    "refuse_sharded",
    "snapshot",
    "tensor_entry",
    "torch_dtype",
    "unpack_bits",
]

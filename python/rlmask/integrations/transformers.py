"""Subnetwork-only finetuning in a Hugging Face ``Trainer`` or any TRL trainer (they subclass
it)::

    from rlmask.integrations.transformers import MaskCallback

    trainer = GRPOTrainer(..., callbacks=[MaskCallback("grpo-run1.rlmask")])
    trainer.train()   # only the subnetwork moves; every other weight stays bit-identical

The callback attaches the mask (:func:`rlmask.torch.attach_mask`) when training begins, once
the trainer has built its optimizer, and detaches it when training ends. Gradient clipping
(``max_grad_norm``) then clips the masked gradient, as the paper describes.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from rlmask._io import PathArg
from rlmask._mask import Mask, load_mask
from rlmask.torch import MaskHandle, NameMap, Uncovered, attach_mask


class MaskCallback(TrainerCallback):
    """Attaches a subnetwork mask at ``on_train_begin`` and removes it at ``on_train_end``.

    Args:
        mask: a :class:`~rlmask.Mask` or the path of an ``.rlmask`` file.
        name_map: translates model parameter names to mask names (see
            :func:`rlmask.torch.canonical_name`; FSDP and DDP wrappers are handled already).
        uncovered: what happens to trainable parameters the mask does not cover (``"error"``,
            ``"freeze"`` or ``"train"``; see :func:`rlmask.torch.attach_mask`).
    """

    def __init__(
        self, mask: Mask | PathArg, *, name_map: NameMap = None, uncovered: Uncovered = "error"
    ) -> None:
        self.mask = mask if isinstance(mask, Mask) else load_mask(mask)
        self.name_map = name_map
        self.uncovered: Uncovered = uncovered
        self.handle: MaskHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None:
            raise RuntimeError("MaskCallback needs the trainer to pass the model")
        # accelerate and DeepSpeed wrap the torch optimizer; hooks go on the inner one.
        inner = getattr(optimizer, "optimizer", optimizer)
        self.handle = attach_mask(
            model, self.mask, inner, name_map=self.name_map, uncovered=self.uncovered
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

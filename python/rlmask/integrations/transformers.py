"""Subnetwork-only finetuning in a Hugging Face ``Trainer`` or any TRL trainer (they subclass
it)::

    from rlmask.integrations.transformers import MaskCallback

    trainer = GRPOTrainer(..., callbacks=[MaskCallback("grpo-run1.rlmask")])
    trainer.train()   # only the subnetwork moves; every other weight stays bit-identical

The callback attaches the mask (:func:`rlmask.torch.attach_mask`) when training begins, once
the trainer has built its optimizer, and detaches it when training ends. Gradient clipping
(``max_grad_norm``) then clips the masked gradient, as the paper describes.

:func:`track_sync` measures what a sparse weight sync would cost during training (design §9)::

    from rlmask.integrations.transformers import track_sync

    track_sync(trainer, every=10)   # rlmask/* keys in the trainer's logs (wandb, tensorboard)
    trainer.train()
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


class SyncCostCallback(TrainerCallback):
    """Every ``every`` optimizer steps, measures on the device what a sparse weight sync
    (design §9) would send, and puts it into the trainer's next log line:

    - ``rlmask/changed_since_last``, ``rlmask/changed_since_start``: shares of the floating
      elements of the trainable parameters whose bits changed since the last measured step and
      since training began (the paper's update sparsity is ``1 -`` the latter);
    - ``rlmask/sync_bytes``: bytes the plain patch of the elements changed since the last
      measured step would hold (indices and values, or the whole tensor where smaller),
      ``rlmask/sync_bytes_compact``: the same in the compact codec (the changed elements'
      indices and values cross to the host once and are encoded as ``rlmask patch create
      --codec compact`` encodes them, each tensor in the smallest form the file would hold),
      and ``rlmask/full_bytes``, the bytes of those parameters (a full sync);
    - ``rlmask/measure_seconds``: what the measurement cost this step.

    With ``dtype`` (for example ``torch.bfloat16`` when the trainer keeps fp32 master weights
    and the inference engine receives bf16), the parameters are measured as cast to it, as a
    sync would send them. Every measurement is also kept in :attr:`history`, one dict per
    measured step (``step`` and the keys above).

    It keeps two copies of the trainable floating parameters on their device (the start and
    the last measured state). Install it with :func:`track_sync`, which puts it before the
    reporting callbacks so that wandb or tensorboard receive the keys.
    """

    def __init__(self, every: int = 10, dtype: Any = None) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, not {every}")
        self.every = every
        self.dtype = dtype
        self.start: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self.pending: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    def _state(self, model: Any) -> dict[str, Any]:
        """The measured parameters as a sync would send them (cast to ``dtype`` if given)."""
        return {
            n: p.detach() if self.dtype is None else p.detach().to(self.dtype)
            for n, p in self._params(model).items()
        }

    @staticmethod
    def _params(model: Any) -> dict[str, Any]:
        from rlmask.torch import refuse_sharded

        refuse_sharded(model.named_parameters(), "track_sync")
        return {
            n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()
        }

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None:
            raise RuntimeError("SyncCostCallback needs the trainer to pass the model")
        state = self._state(model)
        self.start = {n: p.clone() for n, p in state.items()}
        self.last = {n: p.clone() for n, p in state.items()}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if model is None or state.global_step % self.every:
            return
        import time

        import torch

        from rlmask import _rlmask
        from rlmask.torch import _bits_view

        t0 = time.perf_counter()
        numel = since_last = since_start = sync = compact = full = 0
        with torch.no_grad():
            for n, p in self._state(model).items():
                flat = p.reshape(-1)
                now = _bits_view(flat)
                differs = now != _bits_view(self.last[n].reshape(-1))
                changed = int(differs.sum())
                since_start += int((now != _bits_view(self.start[n].reshape(-1))).sum())
                size, count = p.element_size(), p.numel()
                index = 8 if count > 2**31 else 4
                if changed:
                    idx = torch.nonzero(differs).reshape(-1)
                    values = flat[idx].contiguous().view(torch.uint8).cpu().numpy()
                    sync += min(changed * (index + size), count * size)
                    compact += _rlmask.compact_bytes(idx.cpu().numpy(), values, size, count)
                full += count * size
                numel += count
                since_last += changed
                self.last[n].copy_(p)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.pending = {
            "rlmask/changed_since_last": since_last / numel if numel else 0.0,
            "rlmask/changed_since_start": since_start / numel if numel else 0.0,
            "rlmask/sync_bytes": float(sync),
            "rlmask/sync_bytes_compact": float(compact),
            "rlmask/full_bytes": float(full),
            "rlmask/measure_seconds": time.perf_counter() - t0,
        }
        self.history.append({"step": state.global_step, **self.pending})
        control.should_log = True

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not self.pending or logs is None:
            return
        logs.update(self.pending)
        if state.log_history:
            state.log_history[-1].update(self.pending)  # the line this log call recorded
        self.pending = {}


def track_sync(trainer: Any, every: int = 10, dtype: Any = None) -> SyncCostCallback:
    """Installs a :class:`SyncCostCallback` on ``trainer`` ahead of its reporting callbacks
    (so that wandb, tensorboard and the trainer's log history get the ``rlmask/*`` keys) and
    returns it."""
    cb = SyncCostCallback(every, dtype)
    trainer.callback_handler.callbacks.insert(0, cb)
    return cb

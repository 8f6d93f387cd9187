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

import numpy as np
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

    Under FSDP2 (parameters sharded as DTensors over a 1-D mesh) each rank keeps its shards'
    copies only; at a measured step the ranks exchange the changed elements' global indices
    and values (never the parameters) and every rank reports the model's figures, the same on
    each. Replicated (DDP) parameters are measured where they are.
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
        """The measured parameters (this rank's shards of sharded ones) as a sync would send
        them (cast to ``dtype`` if given)."""
        from rlmask.torch._common import _local

        return {
            n: _local(p.detach()) if self.dtype is None else _local(p.detach()).to(self.dtype)
            for n, p in self._params(model).items()
        }

    @staticmethod
    def _params(model: Any) -> dict[str, Any]:
        return {
            n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()
        }

    @staticmethod
    def _placement(name: str, p: Any) -> tuple[Any, tuple[int, ...], tuple[int, ...]] | None:
        """For a parameter sharded over a 1-D mesh, ``(group, local shape, global offset)``;
        None for a plain or replicated one.

        Raises:
            ValueError: a mesh of more than one dimension (HSDP), or a partial placement.
        """
        from rlmask.torch._common import _is_dtensor

        if not _is_dtensor(p):
            return None
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh, placements = p.device_mesh, p.placements
        if mesh.ndim != 1 or not (placements[0].is_shard() or placements[0].is_replicate()):
            raise ValueError(
                f"track_sync measures parameters sharded over a 1-D mesh (FSDP2); '{name}' is "
                f"placed {placements} over a {mesh.ndim}-D mesh, whose figures it would count "
                "more than once"
            )
        if placements[0].is_replicate():
            return None
        shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
        return mesh.get_group(), tuple(shape), tuple(offset)

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
        from rlmask.torch._common import _bits_view

        t0 = time.perf_counter()
        numel = since_last = since_start = sync = compact = full = 0
        params = self._params(model)
        # Sharded parameters: this rank's changes in global indices, merged across ranks below.
        shared: dict[str, tuple[np.ndarray, np.ndarray, int, int]] = {}
        group = None
        with torch.no_grad():
            for n, p in self._state(model).items():
                flat = p.reshape(-1)
                now = _bits_view(flat)
                differs = now != _bits_view(self.last[n].reshape(-1))
                start_moved = int((now != _bits_view(self.start[n].reshape(-1))).sum())
                size, count = p.element_size(), params[n].numel()
                full += count * size
                numel += count
                idx = torch.nonzero(differs).reshape(-1)
                values = flat[idx].contiguous().view(torch.uint8).cpu().numpy()
                placed = self._placement(n, params[n])
                self.last[n].copy_(p)
                if placed is not None:
                    group, shape, offset = placed
                    local = np.unravel_index(idx.cpu().numpy(), shape)
                    where = tuple(i + o for i, o in zip(local, offset, strict=True))
                    glob = np.ravel_multi_index(where, tuple(params[n].shape)).astype(np.int64)
                    shared[n] = (glob, values, start_moved, size)
                    continue
                since_start += start_moved
                changed = int(idx.numel())
                since_last += changed
                if changed:
                    sync += _plain_bytes(changed, count, size)
                    compact += _rlmask.compact_bytes(idx.cpu().numpy(), values, size, count)
            if shared:
                import torch.distributed as dist

                parts: list[Any] = [None] * dist.get_world_size(group)
                dist.all_gather_object(parts, shared, group=group)
                for n, (*_, size) in shared.items():
                    count = params[n].numel()
                    glob = np.concatenate([part[n][0] for part in parts])
                    vals = np.concatenate([part[n][1].reshape(-1, size) for part in parts])
                    since_start += sum(part[n][2] for part in parts)
                    order = np.argsort(glob, kind="stable")
                    changed = int(glob.size)
                    since_last += changed
                    if changed:
                        sync += _plain_bytes(changed, count, size)
                        compact += _rlmask.compact_bytes(
                            glob[order], np.ascontiguousarray(vals[order]).reshape(-1), size, count
                        )
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


def _plain_bytes(changed: int, count: int, size: int) -> int:
    """The plain codec's bytes for one tensor: its changed elements' indices and values, or the
    whole tensor where that is smaller (design §9)."""
    index = 8 if count > 2**31 else 4
    return min(changed * (index + size), count * size)


def track_sync(trainer: Any, every: int = 10, dtype: Any = None) -> SyncCostCallback:
    """Installs a :class:`SyncCostCallback` on ``trainer`` ahead of its reporting callbacks
    (so that wandb, tensorboard and the trainer's log history get the ``rlmask/*`` keys) and
    returns it."""
    cb = SyncCostCallback(every, dtype)
    trainer.callback_handler.callbacks.insert(0, cb)
    return cb

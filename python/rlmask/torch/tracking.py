"""Update tracking over a training run (Appendix D; Figures 2, 6 and 7b)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch

from rlmask._io import PathArg
from rlmask._mask import Mask, padded_len
from rlmask.torch._common import (
    NameMap,
    _bits_view,
    _is_dtensor,
    _local,
    canonical_name,
    pack_bits,
    unpack_bits,
)


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

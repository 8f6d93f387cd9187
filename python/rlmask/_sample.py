"""Sampled diffs (design §14): which share of the elements to read, and the estimates and 95%
intervals that a stratified sample of blocks gives.

Every tensor is a stratum; the core reads a simple random sample of its aligned blocks
(``m`` of its ``N`` blocks; a tensor too small for two blocks is read whole). With ``y_b`` the
changed elements of block ``b``, the tensor's changed total is estimated by ``N * mean(y)``,
with variance ``N^2 (1 - m/N) s^2 / m`` (``s^2`` the sample variance of the block totals): the
estimator of cluster sampling, which holds however the changes cluster within a tensor (by
rows, by heads), because the blocks, not the elements, are the units drawn. Strata are
independent, so totals over a model, a module type or a layer add their estimates and their
variances; the interval is the normal one, ``estimate +- 1.96 sqrt(variance)``, clipped to the
possible counts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Sample:
    """What a sampled diff reads: ``fraction`` of every tensor's elements, or a ``budget`` of
    bytes (of both checkpoints' files, turned into the fraction it allows), in blocks drawn
    with ``seed``; ``block`` elements per block (0: sized from the budget, design §14)."""

    fraction: float | None = None
    budget: int | None = None
    seed: int = 0
    block: int = 0

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> Sample:
        """``1%``, ``0.01`` (fractions) or ``2GB``, ``500MiB`` (byte budgets).

        Raises:
            ValueError: anything else, a fraction outside (0, 1], a budget of nothing.
        """
        t = text.strip()
        size = _SIZE.match(t)
        if size:
            budget = int(float(size.group(1)) * _UNITS[size.group(2).lower()])
            if budget <= 0:
                raise ValueError(f"a sample's byte budget must be positive, not '{text}'")
            return cls(budget=budget, seed=seed)
        try:
            value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            raise ValueError(
                f"a sample is a fraction (1%, 0.01) or a byte budget (2GB), not '{text}'"
            ) from None
        return cls(fraction=value, seed=seed).checked()

    def checked(self) -> Sample:
        """Itself, once its fields are checked.

        Raises:
            ValueError: naming the field.
        """
        if (self.fraction is None) == (self.budget is None):
            raise ValueError("a sample is a fraction or a byte budget (one of them)")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"a sample's fraction is in (0, 1], not {self.fraction}")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"a sample's byte budget must be positive, not {self.budget}")
        if type(self.seed) is not int or not 0 <= self.seed < 2**64:
            raise ValueError(
                f"a sample's seed is a whole number from 0 to 2^64 - 1, not {self.seed}"
            )
        if self.block < 0 or self.block % 64 or self.block > 1 << 18:
            raise ValueError(f"a sample's block is a multiple of 64 up to 2^18, not {self.block}")
        return self

    def fraction_of(self, sizes: Sequence[int]) -> float:
        """The fraction to read: the one given, or the budget's share of the shards' bytes
        (``sizes``: each shard's, both checkpoints), at most 1."""
        if self.fraction is not None:
            return self.fraction
        assert self.budget is not None
        total = sum(sizes)
        return min(1.0, self.budget / total) if total else 1.0


def estimates(
    changed: Sequence[Sequence[int]], samples: Sequence[Any]
) -> tuple[list[list[float]], list[list[float]]]:
    """Per tensor and threshold, the estimated changed count and its variance, from the
    sample's counts (``changed``) and what was read (``samples``: the core's ``(elements,
    bytes, blocks, total_blocks, block, sum of squared block counts per threshold)``)."""
    est: list[list[float]] = []
    var: list[list[float]] = []
    for counts, s in zip(changed, samples, strict=True):
        _, _, m, n, _, sum_sq = s
        if m >= n:  # read whole: exact
            est.append([float(c) for c in counts])
            var.append([0.0] * len(counts))
            continue
        e, v = [], []
        for c, q in zip(counts, sum_sq, strict=True):
            mean = c / m
            s2 = max(0.0, (q - m * mean * mean) / (m - 1))
            e.append(n * mean)
            v.append(n * n * (1 - m / n) * s2 / m)
        est.append(e)
        var.append(v)
    return est, var


def sparsity_interval(changed: float, variance: float, numel: int) -> tuple[float, float]:
    """The 95% interval of ``1 - changed / numel`` given the estimate's variance."""
    if numel <= 0:
        return (1.0, 1.0)
    half = Z95 * math.sqrt(variance)
    low, high = max(0.0, changed - half), min(float(numel), changed + half)
    return (1.0 - high / numel, 1.0 - low / numel)

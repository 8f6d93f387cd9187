"""Intervals for the figures a study reports (design §11): percentile bootstraps, seeded so a
rerun gives the same interval.

- :func:`bootstrap_mean`: the mean of per-item scores (a reward over problems) with a 95%
  interval from resampling the items.
- :func:`paired_bootstrap`: the mean difference of two systems scored on the same items (a
  subnetwork-trained model against the fully trained one, problem by problem), resampling
  items so that each keeps its pair.
- :func:`bootstrap_diff`: the difference of the means of two independent samples (RL seeds
  against SFT seeds), each resampled on its own.
- :func:`wilson`: the Wilson score interval of a share (a binade's changed share).
- :func:`pair_bootstrap`: the mean of a figure over the pairs of N runs (an overlap's excess
  over its baseline across seed pairs), resampling runs, not pairs: pairs that share a run are
  not independent, and a t-interval over the N(N-1)/2 pairs would be too narrow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

#: Resamples drawn by every bootstrap unless told otherwise.
RESAMPLES = 10_000


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    lo, hi = np.quantile(draws, [tail, 1 - tail])
    return float(lo), float(hi)


def wilson(k: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a share ``k / n`` (a binade's changed share): sound at 0,
    at ``n`` and for small ``n``, where the normal approximation is not. ``(0, 1)`` for
    ``n = 0``."""
    if n <= 0:
        return 0.0, 1.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, center - half)), float(min(1.0, center + half))


def bootstrap_diff(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, tuple[float, float] | None]:
    """The difference of the means of two independent samples (RL seeds against SFT seeds)
    and its ``level`` percentile-bootstrap interval, each sample resampled on its own. None
    for the interval when either sample has a single value (no spread to resample).

    Example:
        >>> d, ci = rlmask.stats.bootstrap_diff(rl_sparsities, sft_sparsities)
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or not x.size or not y.size:
        raise ValueError("bootstrap_diff needs two non-empty 1-D samples")
    d = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return d, None
    rng = np.random.default_rng(seed)
    mx = x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)
    my = y[rng.integers(0, y.size, (resamples, y.size))].mean(axis=1)
    return d, _percentiles(mx - my, level)


def bootstrap_mean(
    scores: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """The mean of ``scores`` and its ``level`` percentile-bootstrap interval (items
    resampled with replacement).

    Example:
        >>> mean, (lo, hi) = rlmask.stats.bootstrap_mean([1, 0, 1, 1, 0, 1])
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_mean needs a non-empty 1-D sequence of scores")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, (resamples, x.size))
    return float(x.mean()), _percentiles(x[idx].mean(axis=1), level)


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """The mean of ``a - b`` over paired items and its ``level`` percentile-bootstrap interval
    (items resampled with replacement, each keeping its pair).

    Example:
        >>> diff, (lo, hi) = rlmask.stats.paired_bootstrap(reward_sub, reward_full)
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError("paired_bootstrap needs two non-empty 1-D sequences of the same length")
    return bootstrap_mean(x - y, level=level, resamples=resamples, seed=seed)


def pair_bootstrap(
    n: int,
    value: Callable[[int, int], float],
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float | None, tuple[float, float] | None]:
    """The mean of ``value(i, j)`` over the ordered pairs of ``n`` runs (``i != j``) and its
    ``level`` interval from resampling the runs: each resample draws ``n`` runs with
    replacement and averages ``value`` over its pairs of different runs; pairs whose value is
    NaN (undefined) are left out. None for the interval when ``n < 3`` (two runs give one pair,
    and no spread to resample), and for both when no pair has a value.

    Example:
        >>> m = rlmask.overlap_matrix(seed_masks, base="base/")
        >>> m.excess()  # uses pair_bootstrap over the o1 excess of every pair
    """
    if n < 2:
        raise ValueError("pair_bootstrap needs at least two runs")
    grid = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            if i != j:
                grid[i, j] = value(i, j)
    if not np.isfinite(grid).any():  # no pair has a value (every mask empty): no figure at all
        return None, None
    mean = float(np.nanmean(grid))
    if n < 3:
        return mean, None
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        sub = grid[np.ix_(pick, pick)]
        if np.isfinite(sub).any():
            draws.append(np.nanmean(sub))
    return mean, _percentiles(np.asarray(draws), level)

"""The precision null and the displacement of an update (design §9).

The precision null asks what sparsity bf16 rounding alone would give to an update of the size
the run made. Given the run's fp32 weights behind the tuned checkpoint (``master``), each
tensor's accumulated update ``u = master - base`` is kept as a multiset but placed at random
within the tensor: element ``i`` becomes ``round(base_i + u_j)`` for a ``j`` drawn uniformly,
rounded as the checkpoint stores it (to f32, then to the tuned dtype, each to nearest, ties to
even), and is changed under the diff's criterion or not. The expected number of changed
elements is computed exactly, not sampled: for one base value ``v`` the rounded value is
monotone in ``u``, so the ``u`` that leave ``v`` unchanged form one run of the sorted updates,
found by bisection; a tensor costs a sort and two bisections per distinct base value.

Without the master (``method="fit"``) the updates are estimated from the checkpoints alone,
under a stated assumption: within a tensor, the size of the accumulated update does not depend
on the weight's magnitude, and the quarter of the tensor's elements nearest zero, where the bf16
grid is finest, record their updates nearly exactly. Their observed moves ``tuned - base``
(zeros included) stand in for the tensor's updates. Updates smaller than those weights' own
half-ulp are seen as zero, so the fit leans towards predicting too much sparsity; its error
against the master-based null is measured in the Finding 1 study.

The displacement is the distribution of ``|update|`` over a diff's elements (``master - base``
when the master is given, else ``tuned - base``): exact mean and maximum, quantiles read from
a histogram of bf16 resolution (each a lower bound within 1/128 of the value).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from rlmask.errors import PairingError, TensorMismatchError

if TYPE_CHECKING:
    from rlmask import _rlmask

# Dtypes the null models: the base and tuned sides, and the master's.
_ROUNDED = ("BF16", "F16", "F32")
_MASTERS = ("F32", "F64")
# The share of each tensor's elements, nearest zero, whose moves stand in for its updates when
# the null is fitted from the checkpoints alone.
FIT_SHARE = 0.25
# Quantiles the displacement reports.
QUANTILES = (0.5, 0.9, 0.99)


def _values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Element values widened exactly to float64 (BF16, F16, F32, F64)."""
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    view = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]
    return raw.view(view).astype(np.float64)


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` (float64) rounded to float32, then to ``dtype`` (each to nearest, ties to even),
    as float32 values."""
    with np.errstate(over="ignore"):
        f = x.astype(np.float32)
    if dtype == "F32":
        return f
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return f.astype(np.float16).astype(np.float32)
    bits = f.view(np.uint32)
    rounded: np.ndarray = (bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


def _order_key(v: np.ndarray) -> np.ndarray:
    """float32 values as integers in the same order, -0 just below +0 (for the exact
    criterion, which tells them apart)."""
    bits = v.view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def _first(
    n: int, queries: int, test: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray:
    """For each query ``q``, the first index ``k`` in ``0..n`` at which ``test(k, q)`` holds
    (``n`` when none does), ``test`` being false then true along ``k`` for every query."""
    lo = np.zeros(queries, np.int64)
    hi = np.full(queries, n, np.int64)
    while True:
        active = np.flatnonzero(lo < hi)
        if active.size == 0:
            return lo
        mid = (lo[active] + hi[active]) // 2
        ok = test(mid, active)
        hi[active] = np.where(ok, mid, hi[active])
        lo[active] = np.where(ok, lo[active], mid + 1)


def unchanged_counts(
    base: np.ndarray, updates: np.ndarray, dtype: str, tol: float | None
) -> np.ndarray:
    """For each value ``v`` of ``base`` (float64, exact values of the stored dtype), how many of
    ``updates`` leave it unchanged: ``round(v + u)`` (to f32, then ``dtype``) equal to ``v``
    in bits (``tol`` None) or within ``tol`` in float32 (the absolute criterion)."""
    us = np.sort(updates)
    n, q = us.size, base.size
    v32 = base.astype(np.float32)

    def rounded(k: np.ndarray, i: np.ndarray) -> np.ndarray:
        return _round_to(base[i] + us[k], dtype)

    if tol is None:
        key = _order_key(v32)
        lo = _first(n, q, lambda k, i: _order_key(rounded(k, i)) >= key[i])
        hi = _first(n, q, lambda k, i: _order_key(rounded(k, i)) > key[i])
    else:
        t = np.float32(tol)
        with np.errstate(over="ignore", invalid="ignore"):
            lo = _first(n, q, lambda k, i: (rounded(k, i) - v32[i]) >= -t)
            hi = _first(n, q, lambda k, i: (rounded(k, i) - v32[i]) > t)
    kept: np.ndarray = np.maximum(hi - lo, 0)
    return kept


def fitted_updates(base: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """The updates of the fit (see the module): the observed moves of the ``FIT_SHARE`` of
    elements nearest zero (at least one; ties in magnitude taken in storage order)."""
    k = max(1, int(FIT_SHARE * base.size))
    nearest = np.argsort(np.abs(base), kind="stable")[:k]
    picked: np.ndarray = moved[nearest]
    return picked


def _binade(v: np.ndarray) -> np.ndarray:
    """The f32 binade (biased exponent of ``|v|`` as float32) of each value: the magnitude
    lens's bins (design §8)."""
    return ((v.astype(np.float32).view(np.uint32) >> 23) & 0xFF).astype(np.int64)


def tensor_null(
    base: np.ndarray, updates: np.ndarray, dtype: str, tol: float | None
) -> tuple[float, dict[int, tuple[int, float]]]:
    """The expected changed elements of one tensor under the null, in all and per binade of
    the base value: ``{exponent: (elements, expected changed)}``."""
    values, counts = np.unique(base, return_counts=True)
    n = updates.size
    kept = unchanged_counts(values, updates, dtype, tol)
    expected = counts * (n - kept) / n
    bins: dict[int, tuple[int, float]] = {}
    for e, c, x in zip(_binade(values).tolist(), counts.tolist(), expected.tolist(), strict=True):
        numel, changed = bins.get(e, (0, 0.0))
        bins[e] = (numel + c, changed + x)
    return float(expected.sum()), bins


@dataclass
class Displacement:
    """The distribution of ``|update|`` over a diff's modelled elements (see the module)."""

    #: ``master`` (``|master - base|``) or ``tuned`` (``|tuned - base|``).
    source: str
    numel: int = 0
    total: float = 0.0
    max: float = 0.0
    #: Elements per bf16 bin of ``|update|`` (the top 16 bits of its float32 pattern).
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(1 << 15, np.int64))

    def add(self, d: np.ndarray) -> None:
        a = np.abs(d)
        self.numel += a.size
        self.total += float(a.sum())
        if a.size:
            self.max = max(self.max, float(a.max()))
        top = a.astype(np.float32).view(np.uint32) >> 16
        self.histogram += np.bincount(top, minlength=1 << 15)[: 1 << 15]

    @property
    def mean(self) -> float:
        return self.total / self.numel if self.numel else 0.0

    def quantile(self, q: float) -> float:
        """The ``q`` quantile, rounded down to bf16 precision (within 1/128 below it)."""
        if not self.numel:
            return 0.0
        rank = min(int(np.ceil(q * self.numel)), self.numel)
        k = int(np.searchsorted(np.cumsum(self.histogram), max(rank, 1)))
        return float(np.array([k << 16], np.uint32).view(np.float32)[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "numel": self.numel,
            "mean": self.mean,
            "max": self.max,
            **{f"p{round(100 * q)}": self.quantile(q) for q in QUANTILES},
            "zero_share": (int(self.histogram[0]) / self.numel) if self.numel else 0.0,
        }


@dataclass
class NullModel:
    """The precision null of a diff (see the module): the expected changed elements of every
    modelled tensor, per tensor and per binade of the base value."""

    method: str
    master: str | None
    #: Expected changed elements per modelled tensor (paired name).
    predicted: dict[str, float]
    #: ``(name, exponent, elements, expected changed)`` per tensor and binade.
    bins: list[tuple[str, int, int, float]]
    #: Elements where the master, rounded as the checkpoint stores it, is not the tuned
    #: value: large when MASTER is not TUNED's master copy.
    master_disagree: int
    #: Floating tensors not modelled, with the reason (scaled FP8, F64, ...).
    left_out: list[tuple[str, str]]


def _stored(ckpt: _rlmask.Checkpoint, name_map: dict[str, str] | None) -> dict[str, str]:
    """Paired name -> stored name for one checkpoint."""
    from rlmask import _rlmask

    pairs = list((name_map or {}).items())
    return {_rlmask.canonical_name(n, pairs): n for n in ckpt.names()}


def measure(
    base: _rlmask.Checkpoint,
    tuned: _rlmask.Checkpoint,
    master: _rlmask.Checkpoint | None,
    tensors: Iterable[tuple[str, str, str]],
    *,
    tol: float | None,
    null: bool,
    displacement: bool,
    name_map: dict[str, str] | None = None,
    master_label: str | None = None,
) -> tuple[NullModel | None, Displacement | None]:
    """The null (with ``null``, from ``master``) and the displacement (with ``displacement``)
    over ``tensors``: ``(paired name, base dtype, tuned dtype)`` of a diff's floating tensors.
    ``tol`` is the absolute tolerance, None for the exact criterion."""
    names_a, names_b = _stored(base, name_map), _stored(tuned, name_map)
    names_m = _stored(master, name_map) if master is not None else {}
    disp = Displacement("master" if master is not None else "tuned") if displacement else None
    predicted: dict[str, float] = {}
    bins: list[tuple[str, int, int, float]] = []
    left_out: list[tuple[str, str]] = []
    disagree = 0
    for name, da, db in tensors:
        if da not in _ROUNDED or db not in _ROUNDED:
            left_out.append((name, f"{da} against {db} (the null models BF16, F16 and F32)"))
            continue
        sa, sb = names_a[name], names_b[name]
        ia = base.tensor_info(sa)
        if ia.shape != tuned.tensor_info(sb).shape:
            left_out.append((name, "compared on shared rows only"))
            continue
        a = _values(base.raw(sa), da)
        if master is not None:
            sm = names_m.get(name)
            if sm is None:
                raise PairingError(
                    f"tensor '{name}' is not in the master checkpoint ({master_label}): the "
                    "null needs the fp32 weights behind every tensor of TUNED"
                )
            im = master.tensor_info(sm)
            if im.dtype not in _MASTERS or im.shape != ia.shape:
                raise TensorMismatchError(
                    f"tensor '{name}': {im.dtype} {im.shape} in the master ({im.shard}); the "
                    f"master holds the run's fp32 weights (F32 or F64) of the base's shapes "
                    f"({ia.shape} here)",
                    str(im.shard),
                    name,
                )
            m = _values(master.raw(sm), im.dtype)
            if not np.isfinite(m).all():
                raise TensorMismatchError(
                    f"tensor '{name}': the master holds non-finite values ({im.shard})",
                    str(im.shard),
                    name,
                )
            u = m - a
            b = _values(tuned.raw(sb), db).astype(np.float32)
            disagree += int((_round_to(m, db).view(np.uint32) != b.view(np.uint32)).sum())
            if null:
                if not np.isfinite(a).all():
                    left_out.append((name, "non-finite base values"))
                else:
                    expected, per_bin = tensor_null(a, u, db, tol)
                    predicted[name] = expected
                    bins += [(name, e, c, x) for e, (c, x) in sorted(per_bin.items())]
        else:
            u = _values(tuned.raw(sb), db) - a
            if null:
                if not (np.isfinite(a).all() and np.isfinite(u).all()):
                    left_out.append((name, "non-finite values"))
                else:
                    expected, per_bin = tensor_null(a, fitted_updates(a, u), db, tol)
                    predicted[name] = expected
                    bins += [(name, e, c, x) for e, (c, x) in sorted(per_bin.items())]
        if disp is not None:
            disp.add(u)
    method = "master" if master is not None else "fit"
    model = NullModel(method, master_label, predicted, bins, disagree, left_out) if null else None
    return model, disp

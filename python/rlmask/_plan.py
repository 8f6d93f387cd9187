"""The plan every pass over checkpoints starts from (design §2): which names a selection
keeps, and which tensors pair, as the core pairs them (``_rlmask.pairing``, the same code as
``diff``'s): wrapper segments removed, the name map applied, one-sided, tied, mismatched and
resized tensors listed, a comparison over nothing refused."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from rlmask import _rlmask
from rlmask._names import select_names
from rlmask._options import declared_block
from rlmask._report import few
from rlmask.errors import PairingError


def selection(
    ckpts: Sequence[_rlmask.Checkpoint],
    include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
    name_map: Mapping[str, str] | None,
) -> list[str] | None:
    """The names (as paired: wrapper segments removed, ``name_map`` applied) that ``include``
    and ``exclude`` select among every checkpoint's tensors; None when neither is given.

    Raises:
        PairingError: the patterns select nothing.
    """
    if include is None and exclude is None:
        return None
    pairs = list((name_map or {}).items())
    paired = sorted({_rlmask.canonical_name(n, pairs) for c in ckpts for n in c.names()})
    chosen = select_names(paired, include, exclude)
    if not chosen:
        where = few([str(c.path) for c in ckpts], 3)
        raise PairingError(
            f"no tensor name of {where} matches the include/exclude patterns: nothing to compare"
        )
    return chosen


def pairing(
    a: _rlmask.Checkpoint,
    b: _rlmask.Checkpoint,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    name_map: Mapping[str, str] | None = None,
    skip_mismatched: bool = False,
    shared_rows: bool = False,
    block_size: tuple[int, int] | None = None,
) -> _rlmask.Pairing:
    """The pairs of ``a`` (base) and ``b`` (tuned) as :func:`rlmask.diff` pairs them (FP8
    block sizes as given, else as each side's config.json declares them).

    Raises:
        PairingError: nothing selected or nothing to compare, or mostly unpaired models.
        TensorMismatchError: a shape or dtype mismatch, unless skipped.
    """
    return _rlmask.pairing(
        a,
        b,
        select=selection([a, b], include, exclude, name_map),
        name_map=list((name_map or {}).items()),
        skip_mismatched=skip_mismatched,
        shared_rows=shared_rows,
        block_base=block_size or declared_block(a.path),
        block_tuned=block_size or declared_block(b.path),
    )

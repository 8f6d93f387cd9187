"""The plan every pass over checkpoints starts from (design §2): which names a selection
keeps, and which tensors pair, as the core pairs them (``_rlmask.pairing``, the same code as
``diff``'s): wrapper segments removed, the name map applied, one-sided, tied, mismatched and
resized tensors listed, a comparison over nothing refused."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rlmask import _rlmask
from rlmask._names import select_names
from rlmask._options import check_block, declared_block
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
        where = few([c.location for c in ckpts], 3)
        raise PairingError(
            f"no tensor name of {where} matches the include/exclude patterns: nothing to compare"
        )
    return chosen


@dataclass(frozen=True)
class PairOptions:
    """What pairs with what, as a pass is asked for it (see :func:`rlmask.diff`): the
    include/exclude patterns, the name map, and how mismatches, resized rows and FP8 block
    sizes are taken. Built once per pass (by the API or the CLI), checked when built;
    :meth:`plan` resolves it against the opened checkpoints into the core's plan options."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    name_map: tuple[tuple[str, str], ...] = ()
    skip_mismatched: bool = False
    shared_rows: bool = False
    block_size: tuple[int, int] | None = None

    @classmethod
    def build(
        cls,
        *,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        name_map: Mapping[str, str] | None = None,
        skip_mismatched: bool = False,
        shared_rows: bool = False,
        block_size: tuple[int, int] | None = None,
    ) -> PairOptions:
        """The options, checked: bad patterns and block sizes fail here, before any file is
        opened.

        Raises:
            ValueError: an invalid pattern or block size.
        """

        def patterns(p: str | Iterable[str] | None) -> tuple[str, ...] | None:
            return None if p is None else (p,) if isinstance(p, str) else tuple(p)

        opts = cls(
            include=patterns(include),
            exclude=patterns(exclude),
            name_map=tuple((name_map or {}).items()),
            skip_mismatched=skip_mismatched,
            shared_rows=shared_rows,
            block_size=None if block_size is None else check_block(block_size, "block_size"),
        )
        select_names([], opts.include, opts.exclude)  # compiles every pattern
        return opts

    def with_patterns(
        self, include: tuple[str, ...] | None, exclude: tuple[str, ...] | None
    ) -> PairOptions:
        """These options with other include/exclude patterns (a survey pair's own)."""
        return PairOptions.build(
            include=include,
            exclude=exclude,
            name_map=dict(self.name_map),
            skip_mismatched=self.skip_mismatched,
            shared_rows=self.shared_rows,
            block_size=self.block_size,
        )

    def plan(
        self,
        base: _rlmask.Checkpoint,
        tuned: Sequence[_rlmask.Checkpoint],
        block_of: _rlmask.Checkpoint,
    ) -> _rlmask.PlanOptions:
        """The core's plan options of ``base`` against ``tuned`` (one checkpoint, or a run's):
        the names the patterns select among all of them, and the FP8 block size given, else
        the one declared by ``base``'s config.json for the base and by ``block_of``'s (the
        tuned checkpoint's, or the base's for a run) for the tuned side.

        Raises:
            PairingError: the patterns select nothing.
            CheckpointFormatError: a config.json that declares a bad block size.
        """
        return _rlmask.PlanOptions(
            select=selection([base, *tuned], self.include, self.exclude, dict(self.name_map)),
            name_map=list(self.name_map),
            skip_mismatched=self.skip_mismatched,
            shared_rows=self.shared_rows,
            block_base=self.block_size or declared_block(base),
            block_tuned=self.block_size or declared_block(block_of),
        )


def pairing(a: _rlmask.Checkpoint, b: _rlmask.Checkpoint, options: PairOptions) -> _rlmask.Pairing:
    """The pairs of ``a`` (base) and ``b`` (tuned) as :func:`rlmask.diff` pairs them.

    Raises:
        PairingError: nothing selected or nothing to compare, or mostly unpaired models.
        TensorMismatchError: a shape or dtype mismatch, unless skipped.
    """
    return _rlmask.pairing(a, b, options.plan(a, [b], b))

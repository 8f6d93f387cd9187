"""Options shared by the passes (diff, trajectory, survey): the criterion and its
thresholds (parsed once, by the core), how a threshold is written in column names, and the
block size of block-scaled FP8 weights (given, or declared by config.json)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Literal

from rlmask import _rlmask
from rlmask._io import read_side_file
from rlmask.errors import CheckpointFormatError

Criterion = Literal["absolute", "exact", "relative"]


def threshold_label(criterion: str, t: float) -> str:
    """How a threshold is written in column names: ``1e-05``, ``exact`` or ``eta=0.01``."""
    if criterion == "exact":
        return "exact"
    return f"eta={t:g}" if criterion == "relative" else f"{t:g}"


#: The largest block side accepted (the core counts blocks in 64 bits).
MAX_BLOCK = 1 << 32


def check_block(value: Any, where: str) -> tuple[int, int]:
    """``value`` as an FP8 block size (rows, columns): two whole numbers from 1 to 2^32.

    Raises:
        ValueError: naming ``where`` and the value.
    """
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(type(v) is int and 1 <= v <= MAX_BLOCK for v in value)
    )
    if not ok:
        raise ValueError(
            f"{where}: a block size is two whole numbers from 1 to 2^32 (rows, columns), "
            f"not {str(value)[:60]}"
        )
    return int(value[0]), int(value[1])


def declared_block(checkpoint: _rlmask.Checkpoint) -> tuple[int, int] | None:
    """The FP8 block size that the ``config.json`` beside the checkpoint (in its directory, or
    the folder of its file; for a remote checkpoint, the one its server gave) declares
    (``quantization_config.weight_block_size``), or None (no config, not JSON, no block size).

    Raises:
        CheckpointFormatError: config.json is not a regular file, is too large, or declares a
            block size that is not two whole numbers from 1 to 2^32.
    """
    if checkpoint.remote:
        config = checkpoint.location.rsplit("/", 1)[0] + "/config.json"
        data = checkpoint.config
    else:
        where = os.fspath(checkpoint.path)
        folder = where if os.path.isdir(where) else os.path.dirname(where)
        config = os.path.join(folder, "config.json")
        data = read_side_file(config)
    if data is None:
        return None
    try:
        q = json.loads(data).get("quantization_config") or {}
        declared = q["weight_block_size"]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    try:
        return check_block(declared, f"{config}: quantization_config.weight_block_size")
    except ValueError as e:
        raise CheckpointFormatError(str(e), config) from None


def parse_criterion(
    criterion: str,
    tol: float | None = None,
    tolerances: Sequence[float] | None = None,
    eta: float | None = None,
) -> _rlmask.Criterion:
    """The thresholds of one pass, checked by the core: an argument that the criterion would
    ignore is an error, never silently dropped.

    Raises:
        ValueError: an unknown criterion, an argument it does not take, a bad threshold.
    """
    return _rlmask.Criterion(
        criterion, tol=tol, tolerances=[float(t) for t in tolerances or ()], eta=eta
    )

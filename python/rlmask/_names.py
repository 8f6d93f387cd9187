"""Where a tensor sits in a transformer: its layer index and module type (paper Figure 3)."""

from __future__ import annotations

import re
from collections.abc import Iterable

#: Module types of the per-module breakdown (design §1); anything else is ``other``.
MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "input_layernorm",
    "post_attention_layernorm",
    "embed_tokens",
    "lm_head",
    "norm",
)

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[str | int, ...]:
    """A sort key that orders the numbers inside names as numbers: ``layers.2`` before
    ``layers.10``, ``checkpoint-900`` before ``checkpoint-1000``."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(text)))


def natural_sorted(names: Iterable[str]) -> list[str]:
    """``names`` in natural order (see :func:`natural_key`)."""
    return sorted(names, key=natural_key)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_SUFFIXES = ("weight", "bias")


_MAX_LAYER = 2**63 - 1  # reports hold layer indices as signed 64-bit integers


def layer_of(name: str) -> int | None:
    """The ``N`` of ``...layers.N...``, or None for tensors outside the layer stack (and for an
    ``N`` too large to be a layer index)."""
    m = _LAYER.search(name)
    if m is None or len(m.group(1)) > 19 or int(m.group(1)) > _MAX_LAYER:
        return None
    return int(m.group(1))


def module_of(name: str) -> str:
    """The module type of a tensor name, e.g. ``q_proj`` for
    ``model.layers.3.self_attn.q_proj.weight``; ``other`` when it is none of :data:`MODULES`."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in _SUFFIXES:
        parts = parts[:-1]
    return parts[-1] if parts[-1] in MODULES else "other"


def _compile(patterns: str | Iterable[str] | None, what: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    out = []
    for p in [patterns] if isinstance(patterns, str) else patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"invalid {what} regex '{p}': {e}") from None
    return out


def select_names(
    names: Iterable[str],
    include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
) -> list[str]:
    """The names that match an ``include`` pattern (any; all names when none is given) and no
    ``exclude`` pattern, with ``re.search``. Raises ValueError for an invalid pattern."""
    inc, exc = _compile(include, "include"), _compile(exclude, "exclude")
    return [
        n
        for n in names
        if (not inc or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)
    ]

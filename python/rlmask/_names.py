"""Where a tensor sits in a model: its component, layer, module type and expert (paper Figure 3),
from a small naming table that covers the common model families."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from itertools import pairwise

#: Module types of the per-module breakdown (design §1), in table order; anything else is
#: ``other``. Fused matrices keep their own type; mixture-of-experts matrices are filed per
#: matrix type under ``experts.`` (routed) and ``shared_experts.``, beside the ``router``.
MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
    "router",
    "experts.gate_proj",
    "experts.up_proj",
    "experts.gate_up_proj",
    "experts.down_proj",
    "shared_experts.gate_proj",
    "shared_experts.up_proj",
    "shared_experts.gate_up_proj",
    "shared_experts.down_proj",
    "shared_expert_gate",
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "q_norm",
    "k_norm",
    "q_a_layernorm",
    "kv_a_layernorm",
    "embed_tokens",
    "embed_positions",
    "patch_embed",
    "pooling",
    "projector",
    "eh_proj",
    "enorm",
    "hnorm",
    "lm_head",
    "norm",
)

#: Module types that are normalisation weights (every kind kept apart in :data:`MODULES`).
NORMS = frozenset(
    m for m in MODULES if m.endswith(("layernorm", "_norm", "norm")) or m in ("enorm", "hnorm")
)

#: Components of a model, in table order: vision-language models hold a vision tower and a
#: projector beside the language model.
COMPONENTS = ("language_model", "vision_tower", "projector")

# A tensor's component and module type come from its dotted name, segment by segment (no
# regular expressions: compiling a table of them cost more start-up than the rest of `rlmask
# diff`'s own imports together).

# Segments that open a vision-language model's projector or its vision tower; ``visual.merger``
# (Qwen2-VL) is the projector inside ``visual``.
_PROJECTOR = frozenset(
    ("multi_modal_projector", "mm_projector", "vision_projection", "connector", "aligner")
)
_VISION = frozenset(("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder"))

# Matrices of the MLP as families name them: Mixtral's w1/w2/w3 included.
_MLP = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj", "w1": "gate_proj"}
_MLP |= {"w3": "up_proj", "w2": "down_proj", "gate_up_proj": "gate_up_proj"}

# Families: Llama, Mistral, Mixtral, Qwen2/2.5/3 and their MoE, DeepSeek-V2/V3 (MLA, MTP), Gemma
# 2/3, Phi-3, GPT-2, GPT-NeoX, Falcon, OLMo 2, and the CLIP, SigLIP and Qwen2-VL vision towers.
# A name's last segment (after .weight or .bias is dropped) that alone gives its module type:
# the types spelled as MODULES spells them, the MLP's matrices, and other spellings below.
_LAST = {
    m: m
    for m in (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "qkv_proj",
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "q_a_layernorm",
        "kv_a_layernorm",
        "q_norm",
        "k_norm",
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "eh_proj",
        "enorm",
        "hnorm",
    )
}
# Other spellings of a module type.
_ALIASES = {
    "qkv_proj": ("query_key_value", "c_attn"),
    "o_proj": ("out_proj",),
    "up_proj": ("c_fc", "dense_h_to_4h", "fc1"),
    "down_proj": ("dense_4h_to_h", "fc2"),
    "input_layernorm": ("ln_1", "layer_norm1", "norm1", "ln_attn"),
    "post_attention_layernorm": ("ln_2", "layer_norm2", "norm2"),
    "pre_feedforward_layernorm": ("ln_mlp",),
    "embed_tokens": ("embed_tokens", "wte", "embed_in", "word_embeddings"),
    "embed_positions": ("wpe", "position_embedding", "embed_positions"),
    "patch_embed": ("patch_embedding", "patch_embed", "class_embedding"),
    "lm_head": ("lm_head", "embed_out"),
    "norm": (
        "norm",
        "ln_f",
        "final_layer_norm",
        "final_layernorm",
        "post_layernorm",
        "pre_layrnorm",
        "pre_layernorm",
        "layernorm",
    ),
}
_LAST |= _MLP | {alias: m for m, aliases in _ALIASES.items() for alias in aliases}
# Last segments that name a module type only inside a parent (``x.in_proj_weight``).
_LAST_IN_PARENT = {"in_proj_weight": "qkv_proj", "in_proj_bias": "qkv_proj"}
# The last two segments, where the last alone says too little.
_LAST_TWO = {
    ("attn", "qkv"): "qkv_proj",
    ("attn", "c_proj"): "o_proj",
    ("attn", "proj"): "o_proj",
    ("attention", "dense"): "o_proj",
    ("self_attention", "dense"): "o_proj",
    ("mlp", "c_proj"): "down_proj",
    ("patch_embed", "proj"): "patch_embed",
    ("head", "probe"): "pooling",
    ("shared_head", "head"): "lm_head",
    ("shared_head", "norm"): "norm",
}
# Mixture-of-experts blocks whose ``gate`` or ``router`` (and its own parameters, such as
# DeepSeek-V3's ``e_score_correction_bias``) is the router.
_MOE_BLOCKS = frozenset(("mlp", "block_sparse_moe", "moe", "feed_forward"))
_ROUTERS = frozenset(("gate", "router"))
_SHARED_EXPERTS = frozenset(("shared_expert", "shared_experts"))
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz_")

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[str | int, ...]:
    """A sort key that orders the numbers inside names as numbers: ``layers.2`` before
    ``layers.10``, ``checkpoint-900`` before ``checkpoint-1000``."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(text)))


def natural_sorted(names: Iterable[str]) -> list[str]:
    """``names`` in natural order (see :func:`natural_key`)."""
    return sorted(names, key=natural_key)


# Segments before a layer's number in the stack: model.layers.N (most families),
# transformer.h.N (GPT-2, Falcon), blocks.N and encoder.layer.N (vision towers).
_LAYERS = frozenset(("layers", "h", "blocks", "layer"))
_EXPERTS = frozenset(("experts",))

_MAX_INDEX = 2**63 - 1  # reports hold indices as signed 64-bit integers


def _number_after(segments: list[str], words: frozenset[str], first: int) -> int | None:
    """The number in the first ``WORD.N.`` of ``segments`` (a WORD at ``first`` or later, N
    all decimal digits and not the last segment), or None, also for an N too large to be an
    index."""
    for i in range(first, len(segments) - 2):
        if segments[i] in words and segments[i + 1].isdecimal():
            digits = segments[i + 1]
            if len(digits) > 19 or int(digits) > _MAX_INDEX:
                return None
            return int(digits)
    return None


def _shape(segments: list[str]) -> str:
    """A name (as its ``segments``) with every numeric segment written ``0``. No rule of the
    naming table tells one number from another, so a name's component and module type are its
    shape's: layers and experts that repeat one structure share one lookup (a DeepSeek-V3
    checkpoint's 47,000 expert matrices have a handful of shapes)."""
    return ".".join("0" if s.isdecimal() else s for s in segments)


def place(name: str) -> tuple[str, int | None, str, int | None]:
    """``(component, layer, module type, expert)`` of a tensor name: :func:`component_of`,
    :func:`layer_of`, :func:`module_of` and :func:`expert_of` at once."""
    segments = name.split(".")
    shape = _shape(segments)
    component = _component_of_shape(shape)
    layer = _number_after(segments, _LAYERS, 0) if component == "language_model" else None
    return component, layer, _module_of_shape(shape), _number_after(segments, _EXPERTS, 1)


def component_of(name: str) -> str:
    """``language_model``, ``vision_tower`` or ``projector`` (see :data:`COMPONENTS`)."""
    return _component_of_shape(_shape(name.split(".")))


@lru_cache(maxsize=4096)
def _component_of_shape(name: str) -> str:
    inner = name.split(".")[:-1]  # a component holds tensors: its segment is never the last
    if any(s in _PROJECTOR for s in inner) or ("visual", "merger") in pairwise(inner):
        return "projector"
    if any(s in _VISION for s in inner):
        return "vision_tower"
    return "language_model"


def layer_of(name: str) -> int | None:
    """The ``N`` of the language model's ``...layers.N.`` (``transformer.h.N.`` for GPT-2 and
    Falcon), or None for tensors outside its layer stack, in a vision tower or projector, or
    with an ``N`` too large to be an index. Extra layers past the configured depth (DeepSeek-V3's
    multi-token-prediction layer) keep their numbers."""
    return place(name)[1]


def expert_of(name: str) -> int | None:
    """The ``N`` of ``...experts.N...`` (a routed expert's own tensor), else None (also for
    fused expert tensors, which hold every expert)."""
    return _number_after(name.split("."), _EXPERTS, 1)


def module_of(name: str) -> str:
    """The module type of a tensor name, e.g. ``q_proj`` for
    ``model.layers.3.self_attn.q_proj.weight``, ``experts.up_proj`` for
    ``model.layers.3.mlp.experts.7.up_proj.weight``; ``projector`` for anything in a
    vision-language projector; ``other`` when no rule of the naming table knows it."""
    return _module_of_shape(_shape(name.split(".")))


@lru_cache(maxsize=4096)
def _module_of_shape(name: str) -> str:
    if _component_of_shape(name) == "projector":
        return "projector"
    s = name.split(".")
    if len(s) > 1 and s[-1] in ("weight", "bias"):
        s.pop()
    n, last = len(s), s[-1]
    # Mixture-of-experts matrices first: a routed expert's own (experts.N.w1), fused
    # (experts.gate_up_proj and its _bias), shared, and the router.
    if n >= 3 and s[-2] in _SHARED_EXPERTS and last in _MLP:
        return "shared_experts." + _MLP[last]
    if n >= 2 and last == "shared_expert_gate":
        return last
    if n >= 4 and s[-3] == "experts" and s[-2].isdecimal() and last in _MLP:
        return "experts." + _MLP[last]
    if n >= 3 and s[-2] == "experts":
        fused = last.removesuffix("_bias")
        if fused in _MLP:
            return "experts." + _MLP[fused]
    if n >= 3 and s[-2] in _MOE_BLOCKS and last in _ROUTERS:
        return "router"
    if n >= 4 and s[-3] in _MOE_BLOCKS and s[-2] in _ROUTERS and set(last) <= _LOWER and last:
        return "router"
    if n >= 2:
        if last in _LAST_IN_PARENT:
            return _LAST_IN_PARENT[last]
        if (s[-2], last) in _LAST_TWO:
            return _LAST_TWO[s[-2], last]
    return _LAST.get(last, "other")


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

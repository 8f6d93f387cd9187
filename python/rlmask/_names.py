"""Where a tensor sits in a model: its component, layer, module type and expert (paper Figure 3),
from a small naming table that covers the common model families."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

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

_COMPONENT_RULES = (
    (
        re.compile(
            r"(?:^|\.)(?:multi_modal_projector|mm_projector|visual\.merger|vision_projection|"
            r"connector|aligner)\."
        ),
        "projector",
    ),
    (
        re.compile(r"(?:^|\.)(?:vision_tower|vision_model|visual|vision_encoder|image_encoder)\."),
        "vision_tower",
    ),
)

# Matrices of the MLP as families name them: Mixtral's w1/w2/w3 included.
_MLP = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj", "w1": "gate_proj"}
_MLP |= {"w3": "up_proj", "w2": "down_proj", "gate_up_proj": "gate_up_proj"}
_MLP_NAMES = "|".join(_MLP)

# (pattern on the name without its .weight/.bias suffix, module type or None for the matched
# MLP name), first match wins. Families: Llama, Mistral, Mixtral, Qwen2/2.5/3 and their MoE,
# DeepSeek-V2/V3 (MLA, MTP), Gemma 2/3, Phi-3, GPT-2, GPT-NeoX, Falcon, OLMo 2, and the CLIP,
# SigLIP and Qwen2-VL vision towers.
_MODULE_RULES: tuple[tuple[re.Pattern[str], str | None], ...] = tuple(
    (re.compile(p), m)
    for p, m in (
        (rf"\.shared_experts?\.({_MLP_NAMES})$", "shared_experts."),
        (r"\.shared_expert_gate$", "shared_expert_gate"),
        (rf"\.experts\.\d+\.({_MLP_NAMES})$", "experts."),
        (rf"\.experts\.({_MLP_NAMES})(?:_bias)?$", "experts."),
        (r"\.(?:mlp|block_sparse_moe|moe|feed_forward)\.(?:gate|router)(?:\.[a-z_]+)?$", "router"),
        (r"(?:^|\.)(q_proj|k_proj|v_proj|o_proj|qkv_proj)$", None),
        (r"(?:^|\.)(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)$", None),
        (r"(?:^|\.)(q_a_layernorm|kv_a_layernorm|q_norm|k_norm)$", None),
        (r"(?:^|\.)(?:query_key_value|c_attn|attn\.qkv)$", "qkv_proj"),
        (r"\.in_proj_(?:weight|bias)$", "qkv_proj"),
        (r"(?:^|\.)(?:out_proj|attn\.c_proj|attn\.proj|attention\.dense)$", "o_proj"),
        (r"(?:^|\.)self_attention\.dense$", "o_proj"),
        (rf"(?:^|\.)({_MLP_NAMES})$", ""),
        (r"(?:^|\.)(?:c_fc|dense_h_to_4h|fc1)$", "up_proj"),
        (r"(?:^|\.)(?:mlp\.c_proj|dense_4h_to_h|fc2)$", "down_proj"),
        (r"(?:^|\.)(input_layernorm|post_attention_layernorm)$", None),
        (r"(?:^|\.)(pre_feedforward_layernorm|post_feedforward_layernorm)$", None),
        (r"(?:^|\.)(?:ln_1|layer_norm1|norm1|ln_attn)$", "input_layernorm"),
        (r"(?:^|\.)(?:ln_2|layer_norm2|norm2)$", "post_attention_layernorm"),
        (r"(?:^|\.)ln_mlp$", "pre_feedforward_layernorm"),
        (r"(?:^|\.)(?:embed_tokens|wte|embed_in|word_embeddings)$", "embed_tokens"),
        (r"(?:^|\.)(?:wpe|position_embedding|embed_positions)$", "embed_positions"),
        (r"(?:^|\.)(?:patch_embedding|patch_embed(?:\.proj)?|class_embedding)$", "patch_embed"),
        (r"(?:^|\.)head\.probe$", "pooling"),
        (r"(?:^|\.)(eh_proj|enorm|hnorm)$", None),
        (r"(?:^|\.)(?:lm_head|embed_out|shared_head\.head)$", "lm_head"),
        (
            r"(?:^|\.)(?:norm|ln_f|final_layer_norm|final_layernorm|post_layernorm|"
            r"pre_layrnorm|pre_layernorm|layernorm|shared_head\.norm)$",
            "norm",
        ),
    )
)

_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[str | int, ...]:
    """A sort key that orders the numbers inside names as numbers: ``layers.2`` before
    ``layers.10``, ``checkpoint-900`` before ``checkpoint-1000``."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(text)))


def natural_sorted(names: Iterable[str]) -> list[str]:
    """``names`` in natural order (see :func:`natural_key`)."""
    return sorted(names, key=natural_key)


# A layer of the stack: model.layers.N (most families), transformer.h.N (GPT-2, Falcon),
# blocks.N and encoder.layer.N (vision towers).
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_SUFFIX = re.compile(r"\.(?:weight|bias)$")

_MAX_INDEX = 2**63 - 1  # reports hold indices as signed 64-bit integers


def _index(m: re.Match[str] | None) -> int | None:
    if m is None or len(m.group(1)) > 19 or int(m.group(1)) > _MAX_INDEX:
        return None
    return int(m.group(1))


# A whole numeric component of a dotted name (``.3.``, a leading ``3.``, a trailing ``.3``).
_NUMBER = re.compile(r"(?<![^.])\d+(?![^.])")


def _shape(name: str) -> str:
    """``name`` with every numeric component written ``0``. No rule of the naming table tells
    one number from another (they match numbers as ``\\d+`` or not at all), so a name's
    component and module type are its shape's: layers and experts that repeat one structure
    share one lookup (a DeepSeek-V3 checkpoint's 47,000 expert matrices have a handful of
    shapes, and the rule loop costs about 20 microseconds a name)."""
    return _NUMBER.sub("0", name)


def component_of(name: str) -> str:
    """``language_model``, ``vision_tower`` or ``projector`` (see :data:`COMPONENTS`)."""
    return _component_of_shape(_shape(name))


@lru_cache(maxsize=4096)
def _component_of_shape(name: str) -> str:
    for pattern, component in _COMPONENT_RULES:
        if pattern.search(name):
            return component
    return "language_model"


def layer_of(name: str) -> int | None:
    """The ``N`` of the language model's ``...layers.N.`` (``transformer.h.N.`` for GPT-2 and
    Falcon), or None for tensors outside its layer stack, in a vision tower or projector, or
    with an ``N`` too large to be an index. Extra layers past the configured depth (DeepSeek-V3's
    multi-token-prediction layer) keep their numbers."""
    if component_of(name) != "language_model":
        return None
    return _index(_LAYER.search(name))


def expert_of(name: str) -> int | None:
    """The ``N`` of ``...experts.N...`` (a routed expert's own tensor), else None (also for
    fused expert tensors, which hold every expert)."""
    return _index(_EXPERT.search(name))


def module_of(name: str) -> str:
    """The module type of a tensor name, e.g. ``q_proj`` for
    ``model.layers.3.self_attn.q_proj.weight``, ``experts.up_proj`` for
    ``model.layers.3.mlp.experts.7.up_proj.weight``; ``projector`` for anything in a
    vision-language projector; ``other`` when no rule of the naming table knows it."""
    return _module_of_shape(_shape(name))


@lru_cache(maxsize=4096)
def _module_of_shape(name: str) -> str:
    if _component_of_shape(name) == "projector":
        return "projector"
    path = _SUFFIX.sub("", name)
    for pattern, module in _MODULE_RULES:
        m = pattern.search(path)
        if m is None:
            continue
        if module is None:
            return m.group(1)
        if module in ("", "experts.", "shared_experts."):
            return module + _MLP[m.group(1)]
        return module
    return "other"


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

"""The naming table on checkpoints that transformers writes for each family it can build tiny
(from a config, nothing downloaded): every tensor of a known family gets a module type (none
lands in "other"), the layer table has one row per configured layer, fused matrices, MoE
experts, routers, shared experts, every norm kind and the components of vision-language models
are named as the expectations below (written by hand from each family's modelling code) say."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import rlmask
from rlmask._names import (
    _component_of_shape,
    _module_of_shape,
    component_of,
    expert_of,
    layer_of,
    module_of,
)

T: Any = transformers

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

LLAMA = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
LLAMA |= {"input_layernorm", "post_attention_layernorm", "embed_tokens", "lm_head", "norm"}
EXPERTS = {"router", "experts.gate_proj", "experts.up_proj", "experts.down_proj"}
SHARED = {"shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"}
MLA_MODULES = {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "q_a_layernorm"}
MLA_MODULES |= {"kv_a_layernorm"}
GEMMA_NORMS = {"pre_feedforward_layernorm", "post_feedforward_layernorm"}
VISION = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "input_layernorm"}
VISION |= {"post_attention_layernorm", "patch_embed", "embed_positions", "norm"}

# family -> (builder, expected module types of the language model, other components' modules)
FAMILIES: dict[str, tuple[Callable[[], Any], set[str], dict[str, set[str]]]] = {
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL)), LLAMA, {}),
    "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**SMALL)), LLAMA, {}),
    "mixtral": (
        lambda: T.MixtralForCausalLM(T.MixtralConfig(**SMALL, num_local_experts=3)),
        LLAMA - {"gate_proj", "up_proj", "down_proj"} | EXPERTS,
        {},
    ),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL)), LLAMA, {}),
    "qwen2_moe": (
        lambda: T.Qwen2MoeForCausalLM(
            T.Qwen2MoeConfig(**SMALL, **MOE, num_experts=3, shared_expert_intermediate_size=24)
        ),
        LLAMA - {"gate_proj", "up_proj", "down_proj"} | EXPERTS | SHARED | {"shared_expert_gate"},
        {},
    ),
    "qwen3": (
        lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**SMALL)),
        LLAMA | {"q_norm", "k_norm"},
        {},
    ),
    "qwen3_moe": (
        lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**SMALL, **MOE, num_experts=3)),
        LLAMA - {"gate_proj", "up_proj", "down_proj"} | EXPERTS | {"q_norm", "k_norm"},
        {},
    ),
    "deepseek_v3": (
        lambda: T.DeepseekV3ForCausalLM(
            T.DeepseekV3Config(
                **SMALL,
                **MOE,
                **MLA,
                n_routed_experts=3,
                n_shared_experts=1,
                first_k_dense_replace=1,
                n_group=1,
                topk_group=1,
            )
        ),
        LLAMA - {"q_proj", "k_proj", "v_proj"} | EXPERTS | SHARED | MLA_MODULES,
        {},
    ),
    # Gemma, GPT-2 and Falcon tie lm_head to the embeddings: their checkpoints have no lm_head.
    "gemma2": (
        lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**SMALL)),
        LLAMA - {"lm_head"} | GEMMA_NORMS,
        {},
    ),
    "gemma3": (
        lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**SMALL)),
        LLAMA - {"lm_head"} | GEMMA_NORMS | {"q_norm", "k_norm"},
        {},
    ),
    "phi3": (
        lambda: T.Phi3ForCausalLM(T.Phi3Config(**SMALL, **IDS)),
        LLAMA - {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
        | {"qkv_proj", "gate_up_proj"},
        {},
    ),
    "olmo2": (
        lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**SMALL, **IDS)),
        LLAMA - {"input_layernorm"} | {"post_feedforward_layernorm", "q_norm", "k_norm"},
        {},
    ),
    "gpt2": (
        lambda: T.GPT2LMHeadModel(
            T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, **IDS)
        ),
        {"qkv_proj", "o_proj", "up_proj", "down_proj", "input_layernorm"}
        | {"post_attention_layernorm", "embed_tokens", "embed_positions", "norm"},
        {},
    ),
    "gpt_neox": (
        lambda: T.GPTNeoXForCausalLM(
            T.GPTNeoXConfig(
                vocab_size=64,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                max_position_embeddings=64,
                **IDS,
            )
        ),
        {"qkv_proj", "o_proj", "up_proj", "down_proj", "input_layernorm"}
        | {"post_attention_layernorm", "embed_tokens", "lm_head", "norm"},
        {},
    ),
    "falcon": (
        lambda: T.FalconForCausalLM(
            T.FalconConfig(
                vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
            )
        ),
        {"qkv_proj", "o_proj", "up_proj", "down_proj", "input_layernorm"}
        | {"embed_tokens", "norm"},
        {},
    ),
    "llava": (
        lambda: T.LlavaForConditionalGeneration(
            T.LlavaConfig(
                vision_config=T.CLIPVisionConfig(
                    hidden_size=32,
                    intermediate_size=48,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    image_size=32,
                    patch_size=8,
                ),
                text_config=T.LlamaConfig(**SMALL),
                image_token_index=3,
            )
        ),
        LLAMA,
        {"vision_tower": VISION, "projector": {"projector"}},
    ),
    "qwen2_vl": (
        lambda: T.Qwen2VLForConditionalGeneration(
            T.Qwen2VLConfig(
                vision_config=dict(
                    depth=2,
                    embed_dim=32,
                    hidden_size=32,
                    num_heads=4,
                    mlp_ratio=2,
                    patch_size=4,
                    spatial_merge_size=2,
                    temporal_patch_size=1,
                ),
                text_config=dict(
                    **SMALL, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}
                ),
                vocab_size=64,
                image_token_id=3,
                video_token_id=4,
                vision_start_token_id=5,
            )
        ),
        LLAMA,
        {
            "vision_tower": {"qkv_proj", "o_proj", "up_proj", "down_proj", "patch_embed"}
            | {"input_layernorm", "post_attention_layernorm"},
            "projector": {"projector"},
        },
    ),
}


def _save(model: Any, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_tensor_of_a_known_family_is_named(family: str, tmp_path: Path) -> None:
    build, language, others = FAMILIES[family]
    torch.manual_seed(0)
    folder = _save(build(), tmp_path / family)
    r = rlmask.diff(folder, folder, progress=False)
    t = r.tensors
    other = t.filter(t["module"] == "other")["name"].to_list()
    assert other == [], f"{family}: filed as other: {other}"
    by_component = {c: set(t.filter(t["component"] == c)["module"]) for c in set(t["component"])}
    assert by_component == {"language_model": language, **others}, family
    layers = r.by_layer()["layer"].to_list()
    assert layers == [0, 1], f"{family}: layers {layers}"
    assert r.by_component()["component"].to_list() == [
        c for c in ("language_model", "vision_tower", "projector") if c in by_component
    ]
    # Outside the language model, no tensor claims a language-model layer.
    assert t.filter((t["component"] != "language_model") & t["layer"].is_not_null()).is_empty()
    _same_as_the_rule_loop(t["name"].to_list())


def _same_as_the_rule_loop(names: list[str]) -> None:
    """The table is looked up once per name shape (numbers written 0); each name's component
    and module type must be what the rule loop gives for the name itself."""
    for n in names:
        assert component_of(n) == _component_of_shape.__wrapped__(n), n
        assert module_of(n) == _module_of_shape.__wrapped__(n), n


def test_names_that_differ_only_in_numbers_share_a_lookup() -> None:
    names = [
        f"{prefix}.{i}.{rest}"
        for prefix in ("model.layers", "transformer.h", "model.visual.blocks", "7")
        for i in (0, 3, 61, 10**25)
        for rest in (
            "mlp.experts.12.w1.weight",
            "mlp.experts.0.gate_up_proj",
            "block_sparse_moe.gate.weight",
            "mlp.shared_expert.down_proj.weight",
            "self_attn.kv_a_proj_with_mqa.weight",
            "ln_1.weight",
            "mlp.fc2.bias",
            "12",
            "embed_tokens.weight",
        )
    ]
    names += ["0", "model.multi_modal_projector.linear_1.weight", "lm_head.weight", "x.1e5.norm"]
    _same_as_the_rule_loop(names)
    assert module_of("model.layers.3.mlp.experts.17.w1.weight") == "experts.gate_proj"
    assert module_of("model.layers.3.mlp.experts.w1.weight") == "experts.gate_proj"
    assert module_of("model.layers.3.mlp.experts.x.w1.weight") == "gate_proj"


@pytest.mark.parametrize(
    ("name", "component", "layer", "module", "expert"),
    [
        ("model.layers.3.mlp.gate.e_score_correction_bias", "language_model", 3, "router", None),
        (
            "model.layers.3.mlp.experts.gate_up_proj_bias",
            "language_model",
            3,
            "experts.gate_up_proj",
            None,
        ),
        ("model.layers.3.mlp.experts.7.w2.weight", "language_model", 3, "experts.down_proj", 7),
        (
            "model.layers.3.mlp.shared_expert_gate.weight",
            "language_model",
            3,
            "shared_expert_gate",
            None,
        ),
        ("shared_expert_gate.weight", "language_model", None, "other", None),
        ("blocks.0.attn.in_proj_weight", "language_model", 0, "qkv_proj", None),
        ("in_proj_weight", "language_model", None, "other", None),
        ("transformer.h.11.attn.c_proj.weight", "language_model", 11, "o_proj", None),
        ("transformer.h.11.mlp.c_proj.weight", "language_model", 11, "down_proj", None),
        ("model.layers.3", "language_model", None, "other", None),
        ("model.layers.12345678901234567890.q_proj.weight", "language_model", None, "q_proj", None),
        ("model.layers.\u0663.q_proj.weight", "language_model", 3, "q_proj", None),
        ("model.visual.merger.mlp.0.weight", "projector", None, "projector", None),
        ("model.visual.blocks.2.attn.qkv.weight", "vision_tower", None, "qkv_proj", None),
        ("visual", "language_model", None, "other", None),
        ("x.visual.merger", "vision_tower", None, "other", None),
        ("model.norm.weight", "language_model", None, "norm", None),
        ("mtp.0.shared_head.head.weight", "language_model", None, "lm_head", None),
        ("weight", "language_model", None, "other", None),
    ],
)
def test_names_at_the_edges_of_the_table(
    name: str, component: str, layer: int | None, module: str, expert: int | None
) -> None:
    """Names written by hand where a rule depends on a segment's place: a component's segment
    is never a tensor's own name, a layer's number is followed by more name, a router's own
    parameters, fused experts' biases, rules that need a parent segment, and digits outside
    ASCII (decimal in Python's sense)."""
    assert (component_of(name), layer_of(name), module_of(name), expert_of(name)) == (
        component,
        layer,
        module,
        expert,
    )


def test_moe_experts_router_and_shared_experts(tmp_path: Path) -> None:
    """A DeepSeek-V3-shaped MoE (a dense first layer, then 3 routed experts, one shared expert
    and a router with its correction bias): experts filed per matrix type, the router and the
    shared expert apart, and the per-expert table against the elements actually changed."""
    torch.manual_seed(0)
    build = FAMILIES["deepseek_v3"][0]
    base = _save(build(), tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    rng = np.random.default_rng(5)
    want: dict[tuple[int, int], int] = {}
    for name in sorted(tensors):
        if (
            ".mlp.experts.1." in name
            or ".mlp.shared_experts." in name
            or ".mlp.gate.weight" in name
        ):
            t = tensors[name]
            moved = torch.from_numpy(rng.random(tuple(t.shape)) < 0.25)
            tensors[name] = torch.where(moved, t + 1.0, t)
            if ".experts.1." in name:
                want[(1, 1)] = want.get((1, 1), 0) + int(moved.sum())
    (tmp_path / "tuned").mkdir()
    save_file(tensors, tmp_path / "tuned" / "model.safetensors", metadata={"format": "pt"})
    r = rlmask.diff(base, tmp_path / "tuned", progress=False)
    experts = r.by_expert()
    assert experts.select("layer", "expert").rows() == [(1, 0), (1, 1), (1, 2)]
    changed = {
        (row["layer"], row["expert"]): row["changed"] for row in experts.iter_rows(named=True)
    }
    assert changed == {(1, 0): 0, (1, 1): want[(1, 1)], (1, 2): 0}
    modules = r.by_module()
    per = dict(zip(modules["module"], modules["changed"], strict=True))
    assert per["router"] > 0 and per["shared_experts.up_proj"] > 0
    assert per["gate_proj"] == 0  # the dense first layer, kept apart from the experts
    assert per["experts.gate_proj"] == sum(
        int((tensors[n] != load_file(base / "model.safetensors")[n]).sum())
        for n in tensors
        if n.endswith("mlp.experts.1.gate_proj.weight")
    )
    # The CLI's per-expert table.
    from click.testing import CliRunner

    from rlmask.cli import cli

    out = CliRunner().invoke(cli, ["diff", str(base), str(tmp_path / "tuned"), "--by", "expert"])
    assert out.exit_code == 0, out.stderr
    assert "by expert" in out.stdout and "expert" in out.stdout

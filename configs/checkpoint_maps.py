"""Maps from other checkpoint formats to hybridzoo, as data: how each source config becomes a `HybridConfig`, and
where every one of its weights goes.

A `CheckpointMap` names a transformers class (`config.json`'s `architectures`), a function from that class's config
to `HybridConfig` fields (raising `UnsupportedCheckpoint` for anything hybridzoo cannot express exactly), and one
`WeightRule` per source key pattern. A rule renames a key, splits a fused tensor with a named op (the ops live in
`hybridzoo.convert`, each with its inverse for export), or drops a key with the reason. `{i}` in a pattern is the
layer index. `hybridzoo.convert` applies these maps; a source key no rule matches, or a model weight no rule fills,
stops the conversion with the list.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

_BOTH = ("weight", "bias")


class UnsupportedCheckpoint(ValueError):
    """The source checkpoint uses a feature hybridzoo cannot reproduce exactly; the message names it."""


@dataclass(frozen=True)
class WeightRule:
    source: str  # source key pattern; "{i}" is the layer index
    target: str | tuple[str, ...] | None  # hybridzoo key(s); None drops the source key (see `reason`)
    # "copy"; "rows": the source is the targets stacked along dim 0 (sizes from the targets' shapes);
    # "key_head_groups": the same, but interleaved per GDN key head (Qwen3-Next's fused `in_proj_qkvz` / `in_proj_ba`)
    op: str = "copy"
    reason: str = ""  # why a dropped key can be dropped
    block: str | None = None  # the block type layer {i} must have (several blocks share target names, e.g. q_proj)


@dataclass(frozen=True)
class CheckpointMap:
    architecture: str  # transformers class name, as in config.json's `architectures`
    model_type: str  # config.json's `model_type`
    config: Callable  # source config (a transformers config object) -> HybridConfig keyword arguments
    weights: tuple[WeightRule, ...]
    notes: str  # one line for the README table: what maps, what is rejected and why
    export_config: Callable | None = None  # HybridConfig -> source config keyword arguments (the way back)
    export_class: str | None = None  # transformers config class written by the export


def _rope(source) -> dict:
    """The source's RoPE parameters minus multimodal-only entries (text positions are equal on all MRoPE axes)."""
    rope = dict(source.rope_parameters or {})
    rope.pop("mrope_section", None)
    rope.pop("mrope_interleaved", None)
    return rope


def _shared(source) -> dict:
    """Fields with the same name and meaning in the source config and `HybridConfig`."""
    names = ["vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "initializer_range"]
    names += ["tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id"]
    fields = {name: getattr(source, name) for name in names if hasattr(source, name)}
    dtype = getattr(source, "dtype", None)
    if dtype is not None:
        fields["dtype"] = str(dtype).removeprefix("torch.")
    return fields


def _attention(source) -> dict:
    return dict(
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=source.head_dim if getattr(source, "head_dim", None) else None,
        attention_bias=source.attention_bias,
        attention_dropout=source.attention_dropout,
        rope_parameters=_rope(source),
        rms_norm_eps=source.rms_norm_eps,
        hidden_act=source.hidden_act,
    )


# ---------------------------------------------------------------------------------------------------- Llama
def llama_config(source) -> dict:
    if getattr(source, "pretraining_tp", 1) not in (1, None):
        raise UnsupportedCheckpoint(f"`pretraining_tp` = {source.pretraining_tp}: only 1 is supported.")
    return dict(
        **_shared(source),
        **_attention(source),
        intermediate_size=source.intermediate_size,
        block_pattern="A",
        mlp_bias=source.mlp_bias,
    )


def llama_export_config(config) -> dict:
    """The LlamaConfig of an all-attention hybrid, or UnsupportedCheckpoint naming what does not fit Llama."""
    misfits = [f"block_types={sorted(set(config.block_types))}"] if set(config.block_types) != {"attention"} else []
    for name, llama_value in [
        ("attention_output_gate", False), ("attention_qk_norm", False), ("rms_norm_zero_centered", False),
        ("rms_norm_bias", False), ("embedding_scale", 1.0), ("final_logit_softcapping", None),
    ]:
        if getattr(config, name) != llama_value:
            misfits.append(f"{name}={getattr(config, name)!r} (Llama: {llama_value!r})")
    if config.attention_out_bias not in (None, config.attention_bias):
        misfits.append(f"attention_out_bias={config.attention_out_bias} differs from attention_bias")
    if config.intermediate_size == 0:
        misfits.append("intermediate_size=0 (Llama always has an MLP)")
    if misfits:
        raise UnsupportedCheckpoint("This model does not fit LlamaForCausalLM: " + "; ".join(misfits))
    return dict(
        **{name: getattr(config, name) for name in _LLAMA_FIELDS},
        rope_parameters=dict(config.rope_parameters),
        architectures=["LlamaForCausalLM"],
    )


_LLAMA_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id", "attention_bias", "attention_dropout",
    "mlp_bias",
]

_MLP = (
    WeightRule("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    WeightRule("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    WeightRule("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
_ATTENTION = tuple(
    WeightRule(f"model.layers.{{i}}.self_attn.{name}.{kind}", f"model.layers.{{i}}.mixer.{name}.{kind}",
               block="attention")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj")
    for kind in ("weight", "bias")
)
_DECODER_NORMS_AND_ENDS = (
    WeightRule("model.embed_tokens.weight", "model.embed_tokens.weight"),
    WeightRule("model.norm.weight", "model.norm.weight"),
    WeightRule("lm_head.weight", "lm_head.weight"),
    WeightRule("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
    WeightRule("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.post_mixer_layernorm.weight"),
)

LLAMA = CheckpointMap(
    architecture="LlamaForCausalLM",
    model_type="llama",
    config=llama_config,
    weights=(
        *_DECODER_NORMS_AND_ENDS,
        *_ATTENTION,
        *_MLP,
        *(WeightRule(f"model.layers.{{i}}.mlp.{n}.bias", f"model.layers.{{i}}.mlp.{n}.bias")
          for n in ("gate_proj", "up_proj", "down_proj")),
    ),
    notes="every layer `attention`; GQA, biases, `mlp_bias`, any RoPE type transformers knows; `pretraining_tp` > 1 "
    "rejected",
    export_config=llama_export_config,
    export_class="LlamaConfig",
)


# ---------------------------------------------------------------------------------------------- Qwen3-Next
QWEN_BLOCKS = {"linear_attention": "gated_deltanet", "full_attention": "attention"}


def _qwen_gdn_attention(source) -> dict:
    unknown = sorted(set(source.layer_types) - set(QWEN_BLOCKS))
    if unknown:
        raise UnsupportedCheckpoint(f"`layer_types` has {unknown}; only {sorted(QWEN_BLOCKS)} map.")
    if source.hidden_act != "silu" and "linear_attention" in source.layer_types:
        raise UnsupportedCheckpoint(
            f"`hidden_act` = {source.hidden_act!r}: Qwen3-Next / Qwen3.5 also apply it after the GDN conv, where "
            "hybridzoo's gated DeltaNet uses SiLU (as every released model does)."
        )
    return dict(
        **_shared(source),
        **_attention(source),
        intermediate_size=source.intermediate_size,
        block_types=[QWEN_BLOCKS[t] for t in source.layer_types],
        linear_num_key_heads=source.linear_num_key_heads,
        linear_num_value_heads=source.linear_num_value_heads,
        linear_key_head_dim=source.linear_key_head_dim,
        linear_value_head_dim=source.linear_value_head_dim,
        linear_conv_kernel_dim=source.linear_conv_kernel_dim,
        attention_output_gate=True,
        attention_qk_norm=True,
        rms_norm_zero_centered=True,
    )


def qwen3_next_moe_layers(source) -> list[int]:
    """The layers transformers builds with a sparse MoE MLP (Qwen3NextDecoderLayer's rule)."""
    if source.num_experts <= 0:
        return []
    only_dense = set(source.mlp_only_layers or [])
    return [
        i for i in range(source.num_hidden_layers)
        if i not in only_dense and (i + 1) % source.decoder_sparse_step == 0
    ]


def qwen3_next_config(source) -> dict:
    moe = qwen3_next_moe_layers(source)
    if moe:
        raise UnsupportedCheckpoint(
            f"Qwen3-Next MoE: layers {moe} have a routed mixture of experts ({source.num_experts} experts, top "
            f"{source.num_experts_per_tok}, a sigmoid-gated shared expert). hybridzoo has no MoE MLP yet and will not "
            "convert it to a dense model. Dense Qwen3-Next checkpoints (num_experts=0, or every layer in "
            "`mlp_only_layers`) convert."
        )
    return _qwen_gdn_attention(source)


def qwen3_next_export_config(config) -> dict:
    misfits = []
    if not set(config.block_types) <= set(QWEN_BLOCKS.values()):
        misfits.append(f"block_types={sorted(set(config.block_types))} (Qwen3-Next: gated_deltanet, attention)")
    for name, value in [
        ("attention_output_gate", True), ("attention_qk_norm", True), ("rms_norm_zero_centered", True),
        ("rms_norm_bias", False), ("mlp_bias", False), ("embedding_scale", 1.0), ("final_logit_softcapping", None),
        ("linear_allow_neg_eigval", False), ("hidden_act", "silu"),
    ]:
        if getattr(config, name) != value:
            misfits.append(f"{name}={getattr(config, name)!r} (Qwen3-Next: {value!r})")
    if config.attention_out_bias not in (None, config.attention_bias):
        misfits.append(f"attention_out_bias={config.attention_out_bias} differs from attention_bias")
    if config.intermediate_size == 0:
        misfits.append("intermediate_size=0 (Qwen3-Next always has an MLP)")
    if misfits:
        raise UnsupportedCheckpoint("This model does not fit Qwen3NextForCausalLM: " + "; ".join(misfits))
    to_layer_type = {block: layer_type for layer_type, block in QWEN_BLOCKS.items()}
    names = [n for n in _LLAMA_FIELDS if n != "mlp_bias"] + [
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
        "linear_conv_kernel_dim",
    ]
    return dict(
        **{name: getattr(config, name) for name in names},
        rope_parameters=dict(config.rope_parameters),
        layer_types=[to_layer_type[b] for b in config.block_types],
        num_experts=0,
        architectures=["Qwen3NextForCausalLM"],
    )


_QWEN_ATTENTION_NORMS = tuple(
    WeightRule(f"model.layers.{{i}}.self_attn.{n}.weight", f"model.layers.{{i}}.mixer.{n}.weight", block="attention")
    for n in ("q_norm", "k_norm")
)


def _gdn(name: str, target: str | tuple[str, ...], op: str = "copy") -> WeightRule:
    return WeightRule(f"model.layers.{{i}}.linear_attn.{name}", target, op, block="gated_deltanet")


_QWEN_GDN_COMMON = (
    _gdn("conv1d.weight", "model.layers.{i}.mixer.conv1d.weight"),
    _gdn("A_log", "model.layers.{i}.mixer.A_log"),
    _gdn("dt_bias", "model.layers.{i}.mixer.dt_bias"),
    _gdn("norm.weight", "model.layers.{i}.mixer.norm.weight"),
    _gdn("out_proj.weight", "model.layers.{i}.mixer.o_proj.weight"),
)
_MTP = WeightRule(
    "mtp.{*}", None, reason="multi-token-prediction head, unused by the causal LM (transformers drops it on load)"
)
_GDN_QKVZ = tuple(f"model.layers.{{i}}.mixer.{n}_proj.weight" for n in "qkvz")

QWEN3_NEXT = CheckpointMap(
    architecture="Qwen3NextForCausalLM",
    model_type="qwen3_next",
    config=qwen3_next_config,
    weights=(
        *_DECODER_NORMS_AND_ENDS,
        *_ATTENTION,
        *_QWEN_ATTENTION_NORMS,
        *_MLP,
        *_QWEN_GDN_COMMON,
        _gdn("in_proj_qkvz.weight", _GDN_QKVZ, op="key_head_groups"),
        _gdn("in_proj_ba.weight", ("model.layers.{i}.mixer.b_proj.weight", "model.layers.{i}.mixer.a_proj.weight"),
             op="key_head_groups"),
        _MTP,
    ),
    notes="dense models: GDN (fused `in_proj_qkvz`/`in_proj_ba` split per key head) and gated attention with q/k "
    "norm and partial RoPE, zero-centred norms kept as stored; MoE layers rejected (no MoE MLP yet); `mtp.*` dropped",
    export_config=qwen3_next_export_config,
    export_class="Qwen3NextConfig",
)


# ----------------------------------------------------------------------------------------------- Qwen3.5
def qwen3_5_config(source) -> dict:
    return _qwen_gdn_attention(source)


QWEN3_5 = CheckpointMap(
    architecture="Qwen3_5ForCausalLM",
    model_type="qwen3_5_text",
    config=qwen3_5_config,
    weights=(
        *_DECODER_NORMS_AND_ENDS,
        *_ATTENTION,
        *_QWEN_ATTENTION_NORMS,
        *_MLP,
        *_QWEN_GDN_COMMON,
        _gdn("in_proj_qkv.weight", _GDN_QKVZ[:3], op="rows"),
        *(_gdn(f"in_proj_{n}.weight", f"model.layers.{{i}}.mixer.{n}_proj.weight") for n in "zba"),
        _MTP,
    ),
    notes="the text model (`Qwen3_5ForCausalLM`): GDN (`in_proj_qkv` split into q/k/v) and gated attention as "
    "Qwen3-Next; text positions make its MRoPE plain RoPE; the vision tower is not part of this class",
)


def qwen3_5_vlm_config(source) -> dict:
    """The text half of a Qwen3.5 vision-language checkpoint."""
    return _qwen_gdn_attention(source.text_config)


def _text_only(rule: WeightRule) -> WeightRule:
    """A Qwen3.5 text rule as it appears inside the vision-language checkpoint (`model.language_model.*`)."""
    if not rule.source.startswith("model."):
        return rule
    return WeightRule("model.language_model." + rule.source.removeprefix("model."), rule.target, rule.op,
                      rule.reason, rule.block)


QWEN3_5_VLM = CheckpointMap(
    architecture="Qwen3_5ForConditionalGeneration",
    model_type="qwen3_5",
    config=qwen3_5_vlm_config,
    weights=(
        *(_text_only(rule) for rule in QWEN3_5.weights),
        WeightRule("model.visual.{*}", None, reason="vision tower: a hybridzoo model is a text-only causal LM"),
    ),
    notes="the language model of the released (vision-language) Qwen3.5 checkpoints, mapped as `Qwen3_5ForCausalLM`; "
    "`model.visual.*` dropped (text only)",
)


# ---------------------------------------------------------------------------------------------- RecurrentGemma
RECURRENT_GEMMA_BLOCKS = {"linear_attention": "rglru", "sliding_attention": "sliding_attention"}


def recurrent_gemma_config(source) -> dict:
    if source.hidden_activation != "gelu_pytorch_tanh":
        raise UnsupportedCheckpoint(
            f"`hidden_activation` = {source.hidden_activation!r}: RecurrentGemma also applies it to the RG-LRU gate "
            "branch, where hybridzoo's RG-LRU uses tanh-approximated GeLU (`gelu_pytorch_tanh`, the released value)."
        )
    if source.intermediate_size % 2:
        raise UnsupportedCheckpoint(f"`intermediate_size` {source.intermediate_size} is odd; the MLP uses half of it.")
    # transformers multiplies the embeddings by sqrt(hidden) stored as a bfloat16 constant: keep that rounding
    scale = float(torch.tensor(math.sqrt(source.hidden_size), dtype=torch.bfloat16))
    return dict(
        **_shared(source),
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=source.head_dim,
        attention_bias=source.attention_bias,
        attention_out_bias=True,
        attention_dropout=source.attention_dropout,
        rope_parameters=_rope(source),
        rms_norm_eps=source.rms_norm_eps,
        hidden_act=source.hidden_activation,
        intermediate_size=source.intermediate_size // 2,
        mlp_bias=True,
        block_types=[RECURRENT_GEMMA_BLOCKS[t] for t in source.layers_block_type],
        sliding_window=source.attention_window_size,
        rglru_width=source.lru_width,
        rglru_num_heads=source.num_attention_heads,
        rglru_conv_kernel_dim=source.conv1d_width,
        rms_norm_zero_centered=True,
        embedding_scale=scale,
        final_logit_softcapping=source.logits_soft_cap,
    )


def _rg(name: str, target: str) -> WeightRule:
    return WeightRule(f"model.layers.{{i}}.{name}", f"model.layers.{{i}}.{target}")


RECURRENT_GEMMA = CheckpointMap(
    architecture="RecurrentGemmaForCausalLM",
    model_type="recurrent_gemma",
    config=recurrent_gemma_config,
    weights=(
        WeightRule("model.embed_tokens.weight", "model.embed_tokens.weight"),
        WeightRule("model.final_norm.weight", "model.norm.weight"),
        WeightRule("lm_head.weight", "lm_head.weight"),
        _rg("temporal_pre_norm.weight", "input_layernorm.weight"),
        _rg("channel_pre_norm.weight", "post_mixer_layernorm.weight"),
        *(_rg(f"mlp_block.{n}.{k}", f"mlp.{n}.{k}") for n in ("gate_proj", "up_proj", "down_proj")
          for k in ("weight", "bias")),
        *(_rg(f"temporal_block.{n}.{k}", f"mixer.{n}.{k}") for n in ("q_proj", "k_proj", "v_proj", "o_proj")
          for k in ("weight", "bias")),
        *(_rg(f"temporal_block.{n}.{k}", f"mixer.{n}.{k}") for n in ("linear_x", "linear_y") for k in _BOTH),
        _rg("temporal_block.linear_out.weight", "mixer.out_proj.weight"),
        _rg("temporal_block.linear_out.bias", "mixer.out_proj.bias"),
        _rg("temporal_block.conv_1d.weight", "mixer.conv1d.weight"),
        _rg("temporal_block.conv_1d.bias", "mixer.conv1d.bias"),
        _rg("temporal_block.rg_lru.input_gate_weight", "mixer.x_gate_weight"),
        _rg("temporal_block.rg_lru.input_gate_bias", "mixer.x_gate_bias"),
        _rg("temporal_block.rg_lru.recurrent_gate_weight", "mixer.a_gate_weight"),
        _rg("temporal_block.rg_lru.recurrent_gate_bias", "mixer.a_gate_bias"),
        _rg("temporal_block.rg_lru.recurrent_param", "mixer.a_param"),
    ),
    notes="RG-LRU and local-attention layers, zero-centred norms, sqrt(hidden) embedding scale (bf16-rounded as "
    "stored), logit soft-cap, MLP biases at half `intermediate_size`, `o_proj`-only attention bias, partial RoPE",
)


# ---------------------------------------------------------------------------------------------------- xLSTM
def xlstm_config(source) -> dict:
    if not source.add_out_norm:
        raise UnsupportedCheckpoint("`add_out_norm=False`: hybridzoo always applies the final norm.")
    up = source.ffn_round_up_to_multiple_of
    intermediate = math.ceil(source.hidden_size * source.ffn_proj_factor / up) * up
    fields = _shared(source)
    fields["num_hidden_layers"] = source.num_blocks
    return dict(
        **fields,
        intermediate_size=intermediate,
        hidden_act="silu",
        block_pattern="M",
        num_attention_heads=source.num_heads,
        mlstm_num_heads=source.num_heads,
        mlstm_qk_dim_factor=source.qk_dim_factor,
        mlstm_v_dim_factor=source.v_dim_factor,
        mlstm_input_gate="exp",
        mlstm_gate_soft_cap=source.gate_soft_cap,
        mlstm_eps=source.eps,
        mlstm_use_bias=source.use_bias,
        rms_norm_bias=source.use_bias,
        mlp_bias=source.use_bias,
        rms_norm_eps=source.norm_eps,
        final_logit_softcapping=source.output_logit_soft_cap,
    )


def _xl(name: str, target: str | tuple[str, ...], op: str = "copy") -> WeightRule:
    """A per-block xLSTM rule; target names are relative to `model.layers.{i}.`."""
    targets = (target,) if isinstance(target, str) else target
    full = tuple(f"model.layers.{{i}}.{t}" for t in targets)
    return WeightRule(f"backbone.blocks.{{i}}.{name}", full[0] if isinstance(target, str) else full, op)


_XLSTM_RENAMES = {
    "norm_mlstm": "input_layernorm", "norm_ffn": "post_mixer_layernorm",
    "mlstm_layer.q": "mixer.q_proj", "mlstm_layer.k": "mixer.k_proj", "mlstm_layer.v": "mixer.v_proj",
    "mlstm_layer.ogate_preact": "mixer.ogate_proj", "mlstm_layer.out_proj": "mixer.o_proj",
    "mlstm_layer.igate_preact": "mixer.igate_proj", "mlstm_layer.fgate_preact": "mixer.fgate_proj",
    "mlstm_layer.multihead_norm": "mixer.norm",
    "ffn.proj_up_gate": "mlp.gate_proj", "ffn.proj_up": "mlp.up_proj", "ffn.proj_down": "mlp.down_proj",
}
# weight_mode="fused": one matrix each, the parts stacked along dim 0
_XLSTM_FUSED = {
    "mlstm_layer.qkv_opreact": ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.ogate_proj"),
    "mlstm_layer.ifgate_preact": ("mixer.igate_proj", "mixer.fgate_proj"),
    "ffn.proj_up_gate_z": ("mlp.gate_proj", "mlp.up_proj"),
}

XLSTM = CheckpointMap(
    architecture="xLSTMForCausalLM",
    model_type="xlstm",
    config=xlstm_config,
    weights=(
        WeightRule("backbone.embeddings.weight", "model.embed_tokens.weight"),
        WeightRule("backbone.out_norm.weight", "model.norm.weight"),
        WeightRule("lm_head.weight", "lm_head.weight"),
        *(_xl(f"{a}.{k}", f"{b}.{k}") for a, b in _XLSTM_RENAMES.items() for k in _BOTH),
        *(_xl(f"{a}.{k}", tuple(f"{p}.{k}" for p in parts), "rows")
          for a, parts in _XLSTM_FUSED.items() for k in _BOTH),
    ),
    notes="mLSTM layers (exp input gate, gate soft-cap, `eps`), `use_bias` (projections, norms, FFN), logit soft-cap; "
    "`weight_mode` single and fused",
)

# ---------------------------------------------------------------------------------------------------- Mamba-2
_MAMBA_MIXER_KEYS = (
    *(f"{n}.{k}" for n in ("in_proj", "out_proj", "conv1d") for k in _BOTH),
    "dt_bias", "A_log", "D", "norm.weight",
)


def _mamba_limits(time_step_limit) -> dict:
    low, high = time_step_limit if time_step_limit is not None else (0.0, float("inf"))
    return dict(mamba_dt_min_limit=low, mamba_dt_max_limit=None if high == float("inf") else high)


def _mamba_fields(source, act: str, heads: int, head_dim: int, groups: int, d_state: int, d_conv: int,
                  conv_bias: bool, proj_bias: bool, inner: int) -> dict:
    if act != "silu":
        raise UnsupportedCheckpoint(
            f"`hidden_act` = {act!r}: the Mamba-2 mixer applies it after its conv, where hybridzoo's block uses SiLU "
            "(as every released model does)."
        )
    if heads * head_dim != inner:
        raise UnsupportedCheckpoint(
            f"Mamba-2 heads x head_dim = {heads} x {head_dim} != the mixer's inner width {inner}: transformers' "
            "own mixer could not run this config."
        )
    return dict(
        mamba_num_heads=heads, mamba_head_dim=head_dim, mamba_n_groups=groups, mamba_d_state=d_state,
        mamba_conv_kernel=d_conv, mamba_conv_bias=conv_bias, mamba_proj_bias=proj_bias,
        **_mamba_limits(source.time_step_limit),
    )


def mamba2_config(source) -> dict:
    fields = _shared(source)
    return dict(
        **fields,
        **_mamba_fields(source, source.hidden_act, source.num_heads, source.head_dim, source.n_groups,
                        source.state_size, source.conv_kernel, source.use_conv_bias, source.use_bias,
                        int(source.expand * source.hidden_size)),
        mamba_dt_min=source.time_step_min,
        mamba_dt_max=source.time_step_max,
        mamba_dt_init_floor=source.time_step_floor,
        block_pattern="D",
        intermediate_size=0,  # Mamba-2 layers are norm -> mixer -> residual, no MLP
        rms_norm_eps=source.layer_norm_epsilon,
        # no attention layers: the attention head fields only need to be consistent
        num_attention_heads=source.num_heads,
        num_key_value_heads=source.num_heads,
        head_dim=source.head_dim,
    )


MAMBA2 = CheckpointMap(
    architecture="Mamba2ForCausalLM",
    model_type="mamba2",
    config=mamba2_config,
    weights=(
        WeightRule("backbone.embeddings.weight", "model.embed_tokens.weight"),
        WeightRule("backbone.norm_f.weight", "model.norm.weight"),
        WeightRule("lm_head.weight", "lm_head.weight"),
        WeightRule("backbone.layers.{i}.norm.weight", "model.layers.{i}.input_layernorm.weight"),
        *(WeightRule(f"backbone.layers.{{i}}.mixer.{k}", f"model.layers.{{i}}.mixer.{k}") for k in _MAMBA_MIXER_KEYS),
    ),
    notes="every layer `mamba2` without MLP (same parameter names), grouped B/C, dt limits and init range; "
    "`residual_in_fp32` only matters below fp32 (hybridzoo keeps the residual in the model dtype)",
)


# ---------------------------------------------------------------------------------------------------- Bamba
def bamba_config(source) -> dict:
    indices = set(source.attn_layer_indices or [])
    inner = int(source.mamba_expand * source.hidden_size)
    return dict(
        **_shared(source),
        **_attention(source),
        **_mamba_fields(source, source.hidden_act, source.mamba_n_heads, source.mamba_d_head, source.mamba_n_groups,
                        source.mamba_d_state, source.mamba_d_conv, source.mamba_conv_bias, source.mamba_proj_bias,
                        inner),
        intermediate_size=source.intermediate_size,
        mlp_bias=source.mlp_bias,
        block_types=["attention" if i in indices else "mamba2" for i in range(source.num_hidden_layers)],
    )


BAMBA = CheckpointMap(
    architecture="BambaForCausalLM",
    model_type="bamba",
    config=bamba_config,
    weights=(
        WeightRule("model.embed_tokens.weight", "model.embed_tokens.weight"),
        WeightRule("model.final_layernorm.weight", "model.norm.weight"),
        WeightRule("lm_head.weight", "lm_head.weight"),
        WeightRule("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
        WeightRule("model.layers.{i}.pre_ff_layernorm.weight", "model.layers.{i}.post_mixer_layernorm.weight"),
        *_ATTENTION,
        *(WeightRule(f"model.layers.{{i}}.feed_forward.{n}.{k}", f"model.layers.{{i}}.mlp.{n}.{k}")
          for n in ("gate_proj", "up_proj", "down_proj") for k in _BOTH),
        *(WeightRule(f"model.layers.{{i}}.mamba.{k}", f"model.layers.{{i}}.mixer.{k}", block="mamba2")
          for k in _MAMBA_MIXER_KEYS),
    ),
    notes="Mamba-2 layers and attention at `attn_layer_indices` (half-rotary RoPE), a SwiGLU MLP after every mixer; "
    "the training-only `z_loss_coefficient` is not carried",
)

CHECKPOINT_MAPS: dict[str, CheckpointMap] = {
    m.architecture: m for m in (LLAMA, QWEN3_NEXT, QWEN3_5, QWEN3_5_VLM, RECURRENT_GEMMA, XLSTM, MAMBA2, BAMBA)
}

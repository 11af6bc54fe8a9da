"""Softmax attention block: multi-head attention with grouped KV heads, RoPE and an optional sliding window.

Parameter names and math follow transformers' Llama, so an all-attention hybrid is a Llama. The attention kernel comes
from transformers' attention interface (`sdpa`, `eager`, flash, flex), chosen by `config._attn_implementation`.

Options that other checkpoints need, all off by default:
* `attention_output_gate` (Qwen3-Next, Qwen3.5): `q_proj` emits a query and a gate per head, and the attention output
  is multiplied by `sigmoid(gate)` before `o_proj`;
* `attention_qk_norm`: an RMSNorm over each query and key head before RoPE (zero-centred with `rms_norm_zero_centered`);
* `attention_out_bias`: an `o_proj` bias set apart from q/k/v's `attention_bias` (RecurrentGemma: on `o_proj` only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .block_base import BlockField, HybridBlock, is_bool, require_positive_ints
from .layers import HybridRMSNorm, apply_rotary_pos_emb


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`[B, Hkv, T, D]` -> `[B, Hkv * n_rep, T, D]` (each KV head serves `n_rep` query heads)."""
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, length, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, length, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class HybridAttention(HybridBlock):
    """Causal softmax attention over the whole context (KV cache grows with the context).

    Llama's fields stay on `HybridConfig` itself (`num_attention_heads`, `num_key_value_heads`, `head_dim`,
    `rope_parameters`, `attention_bias`, `attention_dropout`, `sliding_window`): transformers' mask and RoPE utilities
    read them there. The options other checkpoints need are this block's own fields (`config_fields`).
    """

    block_type = "attention"
    layer_type = "full_attention"  # transformers' `layer_types` name: selects the mask and the cache layer
    pattern_letter = "A"
    is_recurrent = False
    config_fields = (
        BlockField("attention_output_gate", False, "`q_proj` emits a query and a gate per head (rows `[query | gate]` "
                   "per head); the attention output is multiplied by `sigmoid(gate)` before `o_proj` (Qwen3-Next, "
                   "Qwen3.5)", is_bool, "must be True or False"),
        BlockField("attention_qk_norm", False, "an RMSNorm over each query and key head before RoPE (Qwen3, "
                   "Qwen3-Next)", is_bool, "must be True or False"),
        BlockField("attention_out_bias", None, "a bias on `o_proj`; None follows `attention_bias` (Llama), True with "
                   "`attention_bias=False` is RecurrentGemma's attention",
                   lambda value: value is None or is_bool(value),
                   "must be True, False or None (follow `attention_bias`)"),
    )
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if self.layer_type == "sliding_attention" else None
        bias = config.attention_bias
        out_bias = bias if config.attention_out_bias is None else config.attention_out_bias
        self.output_gate = config.attention_output_gate
        query_width = config.num_attention_heads * self.head_dim
        # with the output gate, q_proj's rows are laid out per head as [query | gate] (Qwen3-Next's layout)
        self.q_proj = nn.Linear(config.hidden_size, query_width * (2 if self.output_gate else 1), bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(query_width, config.hidden_size, bias=out_bias)
        if config.attention_qk_norm:
            norm_kwargs = dict(eps=config.rms_norm_eps, zero_centered=config.rms_norm_zero_centered)
            self.q_norm = HybridRMSNorm(self.head_dim, **norm_kwargs)
            self.k_norm = HybridRMSNorm(self.head_dim, **norm_kwargs)
        else:
            self.q_norm = self.k_norm = None

    @classmethod
    def validate_config(cls, config) -> None:
        require_positive_ints(config, ["num_attention_heads", "num_key_value_heads", "head_dim"], "attention")
        if config.num_attention_heads % config.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({config.num_attention_heads}) must be a multiple of "
                f"`num_key_value_heads` ({config.num_key_value_heads}): each KV head serves a whole group."
            )
        factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
        if not 0 < factor <= 1 or int(config.head_dim * factor) % 2 != 0 or int(config.head_dim * factor) == 0:
            raise ValueError(
                f"`partial_rotary_factor` ({factor}) must be in (0, 1] and rotate an even, non-zero number of "
                f"the `head_dim` ({config.head_dim}) channels: int(head_dim * factor) = "
                f"{int(config.head_dim * factor)}."
            )

    @classmethod
    def cache_layer(cls, config):
        return DynamicLayer()

    @staticmethod
    def parameter_count(config) -> int:
        """Closed form of this block's parameters (checked against the instantiated module in tests)."""
        query_width, kv_width = (
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        )
        gate_width = query_width if config.attention_output_gate else 0
        count = config.hidden_size * (2 * query_width + 2 * kv_width + gate_width)
        if config.attention_bias:
            count += query_width + gate_width + 2 * kv_width
        out_bias = config.attention_bias if config.attention_out_bias is None else config.attention_out_bias
        if out_bias:
            count += config.hidden_size
        if config.attention_qk_norm:
            count += 2 * config.head_dim
        return count

    kv_formula = "2·Hkv·Dh·b per token"

    @staticmethod
    def kv_bytes_per_token(config, dtype_bytes: int) -> int:
        """Bytes of keys + values cached per token of context."""
        return 2 * config.num_key_value_heads * config.head_dim * dtype_bytes

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        gate = None
        if self.output_gate:
            query, gate = self.q_proj(hidden_states).view(*input_shape, -1, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(*input_shape, -1)
        else:
            query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        if gate is not None:
            attn_output = attn_output * torch.sigmoid(gate)
        return self.o_proj(attn_output), attn_weights


class HybridSlidingWindowAttention(HybridAttention):
    """The same attention restricted to the last `config.sliding_window` tokens (constant-size KV cache)."""

    block_type = "sliding_attention"
    layer_type = "sliding_attention"
    pattern_letter = "S"
    kv_formula = "2·Hkv·Dh·b per token, at most sliding_window tokens"

    @classmethod
    def validate_config(cls, config) -> None:
        super().validate_config(config)
        if not isinstance(config.sliding_window, int) or config.sliding_window <= 0:
            raise ValueError(
                f"`sliding_window` must be a positive integer when `block_types` has sliding_attention blocks, "
                f"got {config.sliding_window!r}."
            )

    @classmethod
    def cache_layer(cls, config):
        return DynamicSlidingWindowLayer(sliding_window=config.sliding_window)

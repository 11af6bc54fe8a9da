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
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .block_base import BlockField, HybridBlock, is_bool, require_positive_ints
from .layers import (
    FUSED_MAX_WEIGHTS,
    HybridRMSNorm,
    apply_rotary_pos_emb,
    derived_from_weights,
    plain_linears,
    rotate,
)
from .ops_norm import scaled_unit_rows


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
        if (
            hidden_states.shape[1] == 1
            and attention_mask is None
            and cache is not None
            and not kwargs
            and not torch.is_grad_enabled()
            and (not self.training or self.attention_dropout == 0.0)
            and self.config._attn_implementation == "sdpa"
        ):
            kept = self._kept_tensors()
            if kept is not None:
                return self._decode_step(hidden_states, position_embeddings, cache, kept), None
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

    @torch.no_grad()
    def _decode_step(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache,
        kept: _KeptProjections,
    ) -> torch.Tensor:
        """One token `[B, 1, hidden]` without autograd or mask: `forward`'s function in fewer small ops (decoding a
        small model is bound by per-op overhead). q, k, v (and the gate) come from one GEMM on a kept, transposed
        weight whose rows put the queries and keys side by side, so both heads' norms and RoPE run as one tensor,
        and SDPA is called directly with `enable_gqa`."""
        batch = hidden_states.shape[0]
        heads, dim = self.config.num_attention_heads, self.head_dim
        kv_heads = heads // self.num_key_value_groups
        inputs = hidden_states.view(batch, -1)
        if kept.bias is None:
            projected = torch.matmul(inputs, kept.projection)
        else:
            projected = torch.addmm(kept.bias, inputs, kept.projection)
        query_key = projected[:, : (heads + kv_heads) * dim].view(batch, heads + kv_heads, dim)
        value = projected[:, (heads + kv_heads) * dim : (heads + 2 * kv_heads) * dim].view(batch, kv_heads, 1, dim)
        if kept.qk_scale is not None:  # q_norm and k_norm as one pass, their weights side by side
            query_key = scaled_unit_rows(query_key, kept.qk_scale, kept.qk_eps_root)
        cos, sin = position_embeddings  # [B, 1, R]: broadcast over the heads of `query_key` [B, Hq + Hkv, D]
        query_key = rotate(query_key, cos, sin)
        query, key = query_key[:, :heads, None], query_key[:, heads:, None]  # [B, H, 1, D]
        key, value = cache.update(key, value, self.layer_idx)
        output = F.scaled_dot_product_attention(
            query, key, value, scale=self.scaling, enable_gqa=self.num_key_value_groups > 1
        ).view(batch, heads * dim)
        if self.output_gate:
            output = output * torch.sigmoid(projected[:, (heads + 2 * kv_heads) * dim :])
        if kept.output_bias is None:
            output = torch.matmul(output, kept.output_projection)
        else:
            output = torch.addmm(kept.output_bias, output, kept.output_projection)
        return output.view(batch, 1, -1)

    def _kept_tensors(self) -> _KeptProjections | None:
        """The weights `_decode_step` runs on (`derived_from_weights`: kept between calls, rebuilt when one changes),
        or None where it must not run: wrapped or hooked projections or norms (PEFT, accelerate), or weights over
        `FUSED_MAX_WEIGHTS` (decoding a large block is bound by reading its weights, a copy would only double them)."""
        modules = self._modules
        projections = (modules["q_proj"], modules["k_proj"], modules["v_proj"], modules["o_proj"])
        weights = [p._parameters["weight"] for p in projections]
        if not plain_linears(projections) or max(sum(w.numel() for w in weights[:3]), weights[3].numel()) > (
            FUSED_MAX_WEIGHTS
        ):
            return None
        norms = (modules["q_norm"], modules["k_norm"]) if modules.get("q_norm") is not None else ()
        if any(
            type(n) is not HybridRMSNorm
            or n._forward_hooks
            or n._forward_pre_hooks
            or n._parameters["bias"] is not None
            or n._parameters["weight"].dtype != torch.float32  # the norms' float32 inference form
            for n in norms
        ):
            return None
        tensors = weights + [p._parameters["bias"] for p in projections if p._parameters["bias"] is not None]
        tensors += [n._parameters["weight"] for n in norms]
        settings = tuple((n.zero_centered, n.variance_epsilon) for n in norms)
        return derived_from_weights(self, tensors, lambda detached: self._derive(projections, norms), settings)

    def _derive(self, projections: tuple[nn.Linear, ...], norms: tuple[HybridRMSNorm, ...]) -> _KeptProjections:
        heads, dim = self.config.num_attention_heads, self.head_dim
        q_proj, k_proj, v_proj, o_proj = (p.weight.detach() for p in projections)
        q_bias, k_bias, v_bias, o_bias = (None if p.bias is None else p.bias.detach() for p in projections)

        def rows(query_rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
            """q_proj's rows (or bias) as (queries, gates): per head `[query | gate]` with the output gate."""
            if not self.output_gate:
                return (query_rows,)
            per_head = query_rows.reshape(heads, 2, dim, *query_rows.shape[1:])
            return per_head[:, 0].flatten(0, 1), per_head[:, 1].flatten(0, 1)

        # columns [queries | keys | values | gates]: queries and keys adjacent for one norm and one RoPE pass
        query_rows = rows(q_proj)
        projection = torch.cat([query_rows[0], k_proj, v_proj, *query_rows[1:]]).t().contiguous()
        bias = None
        if q_bias is not None:
            query_bias = rows(q_bias)
            bias = torch.cat([query_bias[0], k_bias, v_bias, *query_bias[1:]])
        qk_scale = qk_eps_root = None
        if norms:
            (q_scale, qk_eps_root), (k_scale, _) = (n._inference_scale((n.weight.detach(),)) for n in norms)
            kv_heads = heads // self.num_key_value_groups
            qk_scale = torch.cat([q_scale.expand(heads, dim), k_scale.expand(kv_heads, dim)])
        return _KeptProjections(projection, bias, o_proj.t().contiguous(), o_bias, qk_scale, qk_eps_root)


class _KeptProjections(NamedTuple):
    projection: torch.Tensor  # [hidden, (Hq + 2 Hkv) D (+ Hq D gates)]: q_proj's queries, k_proj, v_proj, the gates
    bias: torch.Tensor | None  # the same columns' biases (attention_bias)
    output_projection: torch.Tensor  # [Hq D, hidden]: o_proj's weight transposed
    output_bias: torch.Tensor | None
    qk_scale: torch.Tensor | None  # [Hq + Hkv, D]: q_norm's and k_norm's `scaled_unit_rows` scales (qk_norm)
    qk_eps_root: torch.Tensor | None


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

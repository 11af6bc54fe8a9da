"""Gated DeltaNet block (Yang, Kautz & Hatamizadeh, ICLR 2025) laid out as in Qwen3-Next / Qwen3.5.

x -> q, k, v projections -> causal depthwise conv(K) + SiLU -> L2-normalised q, k -> gated delta rule with
beta = sigmoid(b) and decay g = -exp(A_log) * softplus(a + dt_bias) -> per-head RMSNorm gated by silu(z) -> o_proj.

State per sequence: the conv window `[K - 1, 2 Hk Dk + Hv Dv]` and the delta-rule matrix `[Hv, Dk, Dv]` (float32).
More value heads than key heads (GVA, as in Qwen3-Next) share each q/k head among `Hv / Hk` value heads.
"""

from __future__ import annotations

import math

import torch
import transformers.initialization as init
from torch import nn
from torch.nn import functional as F

from .block_base import (
    BlockField,
    HybridBlock,
    is_bool,
    is_int_or_none,
    is_positive_int,
    is_positive_int_or_none,
    require_positive_ints,
)
from .layers import HybridRMSNormGated, init_short_conv_
from .ops_conv import causal_conv1d
from .ops_gated_delta import gated_delta_rule


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Unit-normalise the last dim; keeps beta * |k|^2 < 2 so the delta rule cannot explode."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class HybridGatedDeltaNet(HybridBlock):
    block_type = "gated_deltanet"
    pattern_letter = "G"
    # field names and defaults as in transformers' `Qwen3NextConfig`
    config_fields = (
        BlockField("linear_num_key_heads", None, "q/k heads (default: `num_attention_heads`)",
                   is_int_or_none, "must be an integer or None", default_from="num_attention_heads"),
        BlockField("linear_num_value_heads", None, "value heads, a multiple of the q/k heads (GVA; default: equal)",
                   is_int_or_none, "must be an integer or None", default_from="linear_num_key_heads"),
        BlockField("linear_key_head_dim", None, "q/k head width (default: `head_dim`)", is_int_or_none,
                   "must be an integer or None", default_from="head_dim"),
        BlockField("linear_value_head_dim", None, "value head width (default: `linear_key_head_dim`)",
                   is_int_or_none, "must be an integer or None", default_from="linear_key_head_dim"),
        BlockField("linear_conv_kernel_dim", 4, "width of the causal depthwise conv", is_positive_int,
                   "must be a positive integer"),
        BlockField("linear_chunk_size", None,
                   "chunk length of the parallel form (None: 64 on GPU; on CPU 16 for heads up to 32 wide, else 32)",
                   is_positive_int_or_none, "must be a positive integer or None"),
        BlockField("linear_allow_neg_eigval", False, "beta in (0, 2) instead of (0, 1): negative eigenvalues",
                   is_bool, "must be True or False"),
    )
    lora_targets = ("q_proj", "k_proj", "v_proj", "z_proj", "b_proj", "a_proj", "o_proj")

    @classmethod
    def validate_config(cls, config) -> None:
        names = ["linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim"]
        require_positive_ints(config, names, "gated_deltanet")
        if config.linear_num_value_heads % config.linear_num_key_heads != 0:
            raise ValueError(
                f"`linear_num_value_heads` ({config.linear_num_value_heads}) must be a multiple of "
                f"`linear_num_key_heads` ({config.linear_num_key_heads}): value heads share q/k heads in groups."
            )

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_kernel_size = config.linear_conv_kernel_dim
        self.chunk_size = config.linear_chunk_size
        self.allow_neg_eigval = config.linear_allow_neg_eigval

        self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.z_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)  # output gate
        self.b_proj = nn.Linear(self.hidden_size, self.num_v_heads, bias=False)  # write strength beta
        self.a_proj = nn.Linear(self.hidden_size, self.num_v_heads, bias=False)  # decay
        conv_dim = 2 * self.key_dim + self.value_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.conv_kernel_size, groups=conv_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_v_heads))
        self.norm = HybridRMSNormGated(self.head_v_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)
        self.init_custom_parameters()  # usable on its own like nn.LSTM; from_pretrained overwrites these anyway

    @torch.no_grad()
    def init_custom_parameters(self) -> None:
        """Mamba-2 / fla initialisation of the decay: A in [1, 16], dt in [1e-3, 1e-1] log-uniform; the short conv as
        PyTorch initialises it (see `init_short_conv_`)."""
        init_short_conv_(self.conv1d)
        init.copy_(self.A_log, torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp(min=1e-4)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    state_formula = "4·Hv·Dk·Dv (fp32 matrix) + b·(K−1)·(2·Hk·Dk + Hv·Dv) (conv window)"

    @staticmethod
    def state_bytes(config, dtype_bytes: int) -> int:
        """Bytes of recurrent state per sequence: the float32 delta-rule matrix plus the conv window."""
        key_dim = config.linear_num_key_heads * config.linear_key_head_dim
        value_dim = config.linear_num_value_heads * config.linear_value_head_dim
        matrix = 4 * config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
        return matrix + dtype_bytes * (config.linear_conv_kernel_dim - 1) * (2 * key_dim + value_dim)

    @staticmethod
    def parameter_count(config) -> int:
        """Closed form of this block's parameters (checked against the instantiated module in tests)."""
        hidden, heads = config.hidden_size, config.linear_num_value_heads
        key_dim = config.linear_num_key_heads * config.linear_key_head_dim
        value_dim = heads * config.linear_value_head_dim
        projections = hidden * (2 * key_dim + 2 * value_dim + 2 * heads) + value_dim * hidden
        return (
            projections
            + (2 * key_dim + value_dim) * config.linear_conv_kernel_dim
            + 2 * heads
            + config.linear_value_head_dim
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the block over `[B, T, hidden]`, continuing from `state` (None = fresh). Returns `(y, new_state)`.

        `mask` `[B, T]` (False at padding) makes padded steps identity transitions; `reset` `[B, T]` clears the state
        where a new document starts.
        """
        batch, length, _ = hidden_states.shape
        decoding = state is not None and state[0] is not None and state[1] is not None
        if length == 1 and decoding and mask is None and reset is None and not torch.is_grad_enabled():
            return self._decode_step(hidden_states, state)
        conv_state, recurrent_state = state if state is not None else (None, None)

        qkv, z, b, a = self._project(hidden_states)
        qkv, conv_state = causal_conv1d(qkv, self.conv1d.weight[:, 0], conv_state, mask=mask, reset=reset)
        qkv = F.silu(qkv)
        # q and k normalised as one tensor (half the small ops); grouped value heads are served by the kernel, which
        # repeats q/k heads inside its copy into chunk layout
        # `split`, not two slices: a slice's backward zero-fills a full-width gradient, split's joins the pieces
        query_key, value = qkv.split([2 * self.key_dim, self.value_dim], dim=-1)
        query, key = l2_normalize(query_key.reshape(batch, length, 2, self.num_k_heads, -1)).unbind(2)
        value = value.reshape(batch, length, self.num_v_heads, self.head_v_dim)

        gate_dtype = torch.promote_types(b.dtype, torch.float32)  # float32 at least; float64 stays float64
        beta = torch.sigmoid(b.to(gate_dtype))
        if self.allow_neg_eigval:
            beta = beta * 2.0
        decay = -self.A_log.to(gate_dtype).exp() * F.softplus(a.to(gate_dtype) + self.dt_bias.to(gate_dtype))
        if mask is not None:
            # beta = 0 and no decay: a padded step leaves the state exactly as it was
            beta = beta * mask.unsqueeze(-1)
            decay = decay * mask.unsqueeze(-1)

        output, recurrent_state = gated_delta_rule(
            query, key, value, decay, beta, initial_state=recurrent_state, reset=reset, chunk_size=self.chunk_size
        )
        gate = z.reshape(batch, length, self.num_v_heads, self.head_v_dim)
        output = self.norm(output, gate).reshape(batch, length, self.value_dim)
        return self.o_proj(output), (conv_state, recurrent_state)

    @torch.no_grad()
    def _decode_step(
        self, hidden_states: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One token `[B, 1, hidden]` from a cached state, without autograd: the same function as `forward` in about
        a third of its small ops (decoding a small model is bound by per-op overhead, not arithmetic). q and k are
        normalised together, the GVA head sharing is a broadcast instead of a copy, and the delta-rule step works on
        `[B, Hk, Hv / Hk, Dk, Dv]` views of the state."""
        conv_state, recurrent_state = state
        batch = hidden_states.shape[0]
        groups, share = self.num_k_heads, self.num_v_heads // self.num_k_heads
        dk, dv = self.head_k_dim, self.head_v_dim
        qkv, z, b, a = self._project(hidden_states)
        # short conv over the window (state, token), then SiLU
        window = torch.cat([conv_state, qkv.to(conv_state.dtype)], dim=1)  # [B, K, conv_dim]
        conv = torch.linalg.vecdot(window.mT, self.conv1d.weight[:, 0].to(window.dtype))  # [B, conv_dim]
        conv = F.silu(conv)
        qk = conv[:, : 2 * self.key_dim].reshape(batch, 2, groups, 1, dk).float()
        qk = qk * torch.rsqrt(qk.pow(2).sum(-1, keepdim=True) + 1e-6)  # l2_normalize of q and k at once
        query, key = qk.unbind(1)  # [B, Hk, 1, Dk]
        value = conv[:, 2 * self.key_dim :].reshape(batch, groups, share, dv).float()
        beta = torch.sigmoid(b.float()).reshape(batch, groups, share, 1)
        if self.allow_neg_eigval:
            beta = beta * 2.0
        alpha = torch.exp(-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float()))
        # S <- alpha S;  S <- S + k (beta (v - S^T k))^T;  o = S^T (q / sqrt(Dk)), per value head
        matrix = recurrent_state.view(batch, groups, share, dk, dv) * alpha.reshape(batch, groups, share, 1, 1)
        read = torch.matmul(key.unsqueeze(2), matrix).squeeze(-2)  # [B, Hk, share, Dv]
        update = (value - read).mul_(beta)
        matrix.add_(key.mT.unsqueeze(2) * update.unsqueeze(-2))
        output = torch.matmul((query * dk**-0.5).unsqueeze(2), matrix)  # [B, Hk, share, 1, Dv]
        output = output.reshape(batch, 1, self.num_v_heads, dv).to(hidden_states.dtype)
        gate = z.reshape(batch, 1, self.num_v_heads, dv)
        output = self.norm(output, gate).reshape(batch, 1, self.value_dim)
        new_state = (window[:, 1:], matrix.view(batch, self.num_v_heads, dk, dv))
        return self.o_proj(output), new_state

    def _project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The input projections: `qkv` (q, k, v side by side, the conv's input), `z`, `b`, `a`.

        The six weights are concatenated and applied as one GEMM (~10% faster forward + backward on CPU than six
        calls, and `qkv` is then a slice instead of a concatenated copy). Without autograd the concatenated weight is
        kept between calls (rebuilt when any weight changes), which matters for decoding, where concatenating per
        token would cost more than it saves; a single token with autograd keeps six calls for that reason. Wrapped
        projections (PEFT LoRA, accelerate hooks) also keep six calls, so that whatever the wrapper adds is not
        bypassed.
        """
        projections = (self.q_proj, self.k_proj, self.v_proj, self.z_proj, self.b_proj, self.a_proj)
        fusable = all(type(p) is nn.Linear and not (p._forward_hooks or p._forward_pre_hooks) for p in projections)
        grad = torch.is_grad_enabled()
        if not fusable or (grad and hidden_states.shape[1] == 1):
            q, k, v, z, b, a = (p(hidden_states) for p in projections)
            return torch.cat([q, k, v], dim=-1), z, b, a
        if grad:
            weight = torch.cat([p.weight for p in projections])
        else:
            # keyed by each weight's storage (held by the cache, so no other tensor can take its address; `.data`
            # swaps by `module.to()` change it) and in-place version counter (optimizer steps, load_state_dict)
            weights = tuple(p.weight.detach() for p in projections)
            versions = tuple(w._version for w in weights)
            cached = getattr(self, "_inference_weight", None)
            stale = cached is None or cached[1] != versions
            if stale or any(a.data_ptr() != b.data_ptr() for a, b in zip(cached[0], weights, strict=True)):
                self._inference_weight = cached = (weights, versions, torch.cat(weights))
            weight = cached[2]
        conv_dim = 2 * self.key_dim + self.value_dim
        return F.linear(hidden_states, weight).split([conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads], -1)

"""Gated DeltaNet block (Yang, Kautz & Hatamizadeh, ICLR 2025) laid out as in Qwen3-Next / Qwen3.5.

x -> q, k, v projections -> causal depthwise conv(K) + SiLU -> L2-normalised q, k -> gated delta rule with
beta = sigmoid(b) and decay g = -exp(A_log) * softplus(a + dt_bias) -> per-head RMSNorm gated by silu(z) -> o_proj.

State per sequence: the conv window `[K - 1, 2 Hk Dk + Hv Dv]` and the delta-rule matrix `[Hv, Dk, Dv]` (float32).
More value heads than key heads (GVA, as in Qwen3-Next) share each q/k head among `Hv / Hk` value heads.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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
from .layers import FUSED_MAX_WEIGHTS, HybridRMSNormGated, derived_from_weights, init_short_conv_, plain_linears
from .ops_conv import causal_conv1d
from .ops_gated_delta import gated_delta_rule
from .ops_norm import l2_normalize, scaled_unit_rows


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
        if self.is_decode_step(hidden_states, state, mask, reset, float32=False):  # the step keeps other dtypes too
            return self._decode_step(hidden_states, state)
        conv_state, recurrent_state = state if state is not None else (None, None)

        qkv, z, b, a = self._project(hidden_states)
        qkv, conv_state = causal_conv1d(
            qkv, self.conv1d.weight[:, 0], conv_state, mask=mask, reset=reset, activation="silu"
        )
        # q and k normalised as one tensor (half the small ops), taken with `split` rather than slices (a slice's
        # backward zero-fills a full-width gradient); grouped value heads are served inside the kernel's chunk copy
        query_key, value = qkv.split([2 * self.key_dim, self.value_dim], dim=-1)
        # unit q and k keep beta |k|^2 < 2: the delta rule cannot explode
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
        """One token `[B, 1, hidden]` from a cached state, without autograd: the same function as `forward` in as few
        small ops as we could (about 40 dispatched ops), since decoding a small model is bound by per-op overhead, not
        arithmetic. The tensors derived from the weights (the fused projections, conv taps laid out `[K, C]`,
        `-exp(A_log)`, the norm's weight folded into o_proj's) are kept between calls, q and k are normalised in one
        pass with q's `1 / sqrt(Dk)` folded into its scale, GVA's head sharing is one gather, and the delta-rule
        step is two batched mat-vecs and one rank-1 update on the `[B Hv, Dk, Dv]` state."""
        conv_state, recurrent_state = state
        batch = hidden_states.shape[0]
        heads, dk, dv = self.num_v_heads, self.head_k_dim, self.head_v_dim
        kept = self._kept_tensors()
        qkv, z, b, a = self._project(hidden_states, kept)
        # short conv over the window (state, token), then SiLU
        window = torch.cat([conv_state, qkv.to(conv_state.dtype)], dim=1)  # [B, K, conv_dim]
        taps = kept.conv_taps if kept.conv_taps.dtype == window.dtype else kept.conv_taps.to(window.dtype)
        conv = F.silu((window * taps).sum(1))  # [B, conv_dim]
        math_dtype = recurrent_state.dtype  # float32 (float64 for a float64 model), as `forward`'s state
        if conv.dtype != math_dtype:
            conv = conv.to(math_dtype)
        if b.dtype != math_dtype:
            b, a = b.to(math_dtype), a.to(math_dtype)
        # q / sqrt(Dk (|q|^2 + eps)) and k / sqrt(|k|^2 + eps): l2_normalize with q's attention scale, in one pass
        qk = conv[:, : 2 * self.key_dim].reshape(batch, 2, self.num_k_heads, dk)
        qk = scaled_unit_rows(qk, kept.qk_scale, kept.qk_eps_root)
        # one gather lays out (k, q) per value head, GVA's sharing included: [B, 2 Hk, Dk] -> [B Hv, 2, Dk]
        kq = qk.reshape(batch, 2 * self.num_k_heads, dk).index_select(1, kept.kq_heads).view(batch * heads, 2, dk)
        key, query = kq[:, :1], kq[:, 1:]  # [B Hv, 1, Dk]
        value = conv[:, 2 * self.key_dim :].reshape(batch * heads, 1, dv)
        beta = torch.sigmoid(b).reshape(batch * heads, 1, 1)
        if self.allow_neg_eigval:
            beta = beta * 2.0
        alpha = torch.exp(kept.neg_decay_rate * F.softplus(a + kept.dt_bias)).reshape(batch * heads, 1, 1)
        # S <- alpha S;  S <- S + k (beta (v - S^T k))^T;  o = S^T q, per value head, on [B Hv, Dk, Dv]
        matrix = recurrent_state.reshape(batch * heads, dk, dv) * alpha  # a new tensor: the cached one is not written
        update = (value - torch.bmm(key, matrix)).mul_(beta)  # [B Hv, 1, Dv]
        matrix.addcmul_(key.mT, update)  # the rank-1 update; ~3x faster than baddbmm_ at decode sizes
        output = torch.bmm(query, matrix).reshape(batch, 1, heads, dv)
        new_state = (window[:, 1:], matrix.view(batch, heads, dk, dv))
        if kept.output_projection is not None and output.dtype == hidden_states.dtype == torch.float32:
            # o_proj(w * rmsnorm(o) * silu(z)) with the norm's weight * sqrt(Dv) folded into the kept projection
            output = scaled_unit_rows(output, F.silu(z.view(batch, 1, heads, dv)), kept.output_eps_root)
            return torch.matmul(output.view(batch, 1, self.value_dim), kept.output_projection), new_state
        if output.dtype != hidden_states.dtype:
            output = output.to(hidden_states.dtype)
        output = self.norm(output, z.reshape(batch, 1, heads, dv)).reshape(batch, 1, self.value_dim)
        return self.o_proj(output), new_state

    def _project(
        self, hidden_states: torch.Tensor, kept: _KeptTensors | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The input projections: `qkv` (q, k, v side by side, the conv's input), `z`, `b`, `a`.

        The six weights are concatenated and applied as one GEMM (~10% faster forward + backward on CPU than six
        calls, and `qkv` is then a slice instead of a concatenated copy). Without autograd the concatenated weight is
        kept between calls (`_kept_tensors`), which matters for decoding, where concatenating per token would cost
        more than it saves; a single token with autograd keeps six calls for that reason. Wrapped projections (PEFT
        LoRA, accelerate hooks) also keep six calls, so that whatever the wrapper adds is not bypassed.
        """
        if kept is None and not torch.is_grad_enabled():
            kept = self._kept_tensors()
        if kept is not None and kept.projection is not None:
            fused = torch.matmul(hidden_states, kept.projection)
        else:
            projections = (self.q_proj, self.k_proj, self.v_proj, self.z_proj, self.b_proj, self.a_proj)
            if kept is not None or hidden_states.shape[1] == 1 or not plain_linears(projections):
                q, k, v, z, b, a = (p(hidden_states) for p in projections)
                return torch.cat([q, k, v], dim=-1), z, b, a
            fused = F.linear(hidden_states, torch.cat([p.weight for p in projections]))
        conv_dim = 2 * self.key_dim + self.value_dim
        return fused.split([conv_dim, self.value_dim, self.num_v_heads, self.num_v_heads], -1)

    def _kept_tensors(self) -> _KeptTensors:
        """What inference derives from the weights (`derived_from_weights`: kept between calls, rebuilt when a weight
        changes). The fused projections are kept transposed, `[in, out]`: for one token (a mat-vec) MKL reads that
        layout 1.5-2x faster than `[out, in]` (measured on a 2-core AMD EPYC, 1 thread); for many tokens both run
        alike. The output norm's weight folds into o_proj's when both are plain float32 modules. Only blocks up to
        `FUSED_MAX_WEIGHTS` keep these copies (a large block's decoding is bound by reading its weights)."""
        modules = self._modules
        projections = tuple(modules[name] for name in _PROJECTIONS)
        fusable = plain_linears(projections) and self.hidden_size * self._projected_width() <= FUSED_MAX_WEIGHTS
        norm, o_proj = modules["norm"], modules["o_proj"]
        output_fusable = (
            self.value_dim * self.hidden_size <= FUSED_MAX_WEIGHTS
            and plain_linears((o_proj,))
            and o_proj._parameters["bias"] is None
            and type(norm) is HybridRMSNormGated
            and not (norm._forward_hooks or norm._forward_pre_hooks)
            and norm._parameters["weight"].dtype == o_proj._parameters["weight"].dtype == torch.float32
        )
        weights = [p._parameters["weight"] for p in projections] if fusable else []
        if output_fusable:
            weights += (o_proj._parameters["weight"], norm._parameters["weight"])
        weights += (modules["conv1d"]._parameters["weight"], self._parameters["A_log"], self._parameters["dt_bias"])
        output_eps = norm.variance_epsilon
        return derived_from_weights(
            self, weights, lambda detached: self._derive(detached, fusable, output_fusable, output_eps), (output_eps,)
        )

    def _projected_width(self) -> int:
        """Outputs of the six input projections together: q, k, v, z, b, a."""
        return 2 * self.key_dim + 2 * self.value_dim + 2 * self.num_v_heads

    def _derive(
        self, weights: tuple[torch.Tensor, ...], fusable: bool, output_fusable: bool, output_eps: float
    ) -> _KeptTensors:
        conv_weight, a_log, dt_bias = weights[-3:]
        dk, eps = self.head_k_dim, 1e-6  # eps of `l2_normalize`
        gate_dtype = torch.promote_types(a_log.dtype, torch.float32)  # as `forward`: float32 at least
        output_projection = None
        if output_fusable:
            o_weight, norm_weight = weights[-5:-3]  # [hidden, Hv Dv], [Dv]
            scale = norm_weight.repeat(self.num_v_heads) * math.sqrt(self.head_v_dim)  # RMSNorm's sqrt(D), see below
            output_projection = (o_weight * scale).t().contiguous()
        # value head h reads q/k head h // (Hv / Hk): its k is row Hk + that of the [q heads | k heads] rows
        shared = torch.arange(self.num_v_heads) // (self.num_v_heads // self.num_k_heads)
        kq_heads = torch.stack([shared + self.num_k_heads, shared], dim=1).flatten()
        return _KeptTensors(
            projection=torch.cat(weights[: len(_PROJECTIONS)]).t().contiguous() if fusable else None,
            output_projection=output_projection,
            conv_taps=conv_weight[:, 0].t().contiguous(),
            neg_decay_rate=-a_log.to(gate_dtype).exp(),
            dt_bias=dt_bias.to(gate_dtype),
            qk_scale=torch.tensor([dk**-0.5, 1.0], dtype=gate_dtype, device=a_log.device).view(2, 1, 1),
            qk_eps_root=torch.tensor(math.sqrt(eps), dtype=gate_dtype, device=a_log.device),
            output_eps_root=torch.tensor(math.sqrt(self.head_v_dim * output_eps), device=a_log.device),
            kq_heads=kq_heads.to(a_log.device),
        )


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "z_proj", "b_proj", "a_proj")


class _KeptTensors(NamedTuple):
    projection: torch.Tensor | None  # [hidden, 2 key_dim + 2 value_dim + 2 Hv]; None: wrapped projections
    output_projection: torch.Tensor | None  # [value_dim, hidden]: o_proj's weight times the norm's; None: not plain
    conv_taps: torch.Tensor  # [K, 2 key_dim + value_dim]
    neg_decay_rate: torch.Tensor  # -exp(A_log), float32 at least
    dt_bias: torch.Tensor  # float32 at least
    qk_scale: torch.Tensor  # [2, 1, 1]: (1 / sqrt(Dk), 1) for the unit (q, k)
    qk_eps_root: torch.Tensor  # sqrt(eps) of l2_normalize, for `scaled_unit_rows`
    output_eps_root: torch.Tensor  # sqrt(Dv eps) of the output RMSNorm, for `scaled_unit_rows`
    kq_heads: torch.Tensor  # [2 Hv]: rows of `[q heads | k heads]` giving (k, q) for each value head in turn

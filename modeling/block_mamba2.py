"""Mamba-2 block (Dao & Gu, ICML 2024, "Transformers are SSMs"), laid out as transformers' `Mamba2Mixer`.

    z | xBC | dt = in_proj(x)
    xBC          = silu(causal depthwise conv(xBC))        -> x [H, P], B [G, N], C [G, N]
    dt           = clamp(softplus(dt + dt_bias), limits);   A = -exp(A_log)   (one scalar per head)
    y            = SSD scan(x, dt, A, B, C) + D x           (heads h read group h // (H / G) of B and C)
    out          = out_proj(group-wise RMSNorm(y * silu(z)))

State per sequence: the conv window `[K - 1, H P + 2 G N]` and the SSM state `[H, P, N]` (float32). Padding is an
identity step (the conv skips it, dt = 0 in the scan); a document start (`reset`) clears both. The scan itself lives
in `ops_mamba2` (chunked SSD on CPU, the token loop for decoding, mamba_ssm's kernel for CUDA tensors).
Parameter names follow transformers' `Mamba2Mixer` so its checkpoints map one to one.
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
    is_positive_number,
)
from .layers import FUSED_MAX_WEIGHTS, derived_from_weights, init_short_conv_, plain_linears
from .ops_conv import causal_conv1d
from .ops_mamba2 import ssd
from .ops_norm import scaled_unit_rows


def is_non_negative_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def mamba_num_heads(config) -> int:
    """`mamba_num_heads`, or Mamba-2's default: inner width `2 * hidden_size` (expand 2) in `mamba_head_dim` heads."""
    if config.mamba_num_heads is not None:
        return config.mamba_num_heads
    return max(1, 2 * config.hidden_size // config.mamba_head_dim)


class HybridRMSNormGroupGated(nn.Module):
    """Mamba-2's output norm: gate first, `y * silu(z)`, then RMSNorm within each of `groups` equal slices."""

    def __init__(self, hidden_size: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.groups = groups
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        dtype = torch.promote_types(input_dtype, torch.float32)  # at least float32
        hidden_states = hidden_states.to(dtype) * F.silu(gate.to(dtype))
        grouped = hidden_states.unflatten(-1, (self.groups, -1))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * grouped.flatten(-2).to(input_dtype)


class HybridMamba2(HybridBlock):
    block_type = "mamba2"
    pattern_letter = "D"  # state-space Duality; NemotronH's "M" is taken by the mLSTM here
    # names and defaults as transformers' `Mamba2Config` (num_heads, head_dim, n_groups, state_size, conv_kernel, ...)
    config_fields = (
        BlockField("mamba_num_heads", None, "heads (None: `2 * hidden_size // mamba_head_dim`, Mamba-2's expand 2); "
                   "the inner width is `mamba_num_heads * mamba_head_dim`", is_int_or_none,
                   "must be an integer or None"),
        BlockField("mamba_head_dim", 64, "head dim P (Mamba-2: 64)", is_positive_int, "must be a positive integer"),
        BlockField("mamba_n_groups", 1, "groups of heads sharing B and C (head h reads group h // (heads / groups))",
                   is_positive_int, "must be a positive integer"),
        BlockField("mamba_d_state", 128, "state size N per head (Mamba-2: 128)", is_positive_int,
                   "must be a positive integer"),
        BlockField("mamba_conv_kernel", 4, "width of the causal depthwise conv over x, B, C", is_positive_int,
                   "must be a positive integer"),
        BlockField("mamba_conv_bias", True, "bias of the conv (Mamba-2: yes)", is_bool, "must be True or False"),
        BlockField("mamba_proj_bias", False, "biases of in_proj / out_proj (Mamba-2: no)", is_bool,
                   "must be True or False"),
        BlockField("mamba_chunk_size", None, "chunk length of the chunked SSD scan (None: 64 on CPU, 256 on GPU)",
                   is_positive_int_or_none, "must be a positive integer or None (automatic)"),
        BlockField("mamba_dt_min", 0.001, "lower end of the initial step dt (log-uniform; `time_step_min`)",
                   is_positive_number, "must be > 0"),
        BlockField("mamba_dt_max", 0.1, "upper end of the initial step dt (`time_step_max`)", is_positive_number,
                   "must be > 0"),
        BlockField("mamba_dt_init_floor", 1e-4, "floor of the initial dt (`time_step_floor`)",
                   is_non_negative_number, "must be >= 0"),
        BlockField("mamba_dt_min_limit", 0.0, "dt is clamped to at least this after the softplus "
                   "(`time_step_limit[0]`)", is_non_negative_number, "must be >= 0"),
        BlockField("mamba_dt_max_limit", None, "dt is clamped to at most this (None: no upper limit; "
                   "`time_step_limit[1]`)", lambda v: v is None or is_positive_number(v), "must be > 0 or None"),
    )  # fmt: skip
    lora_targets = ("in_proj", "out_proj")

    @classmethod
    def validate_config(cls, config) -> None:
        heads = mamba_num_heads(config)
        if not is_positive_int(heads):
            raise ValueError(f"`mamba_num_heads` must be a positive integer for mamba2 blocks, got {heads!r}.")
        if heads % config.mamba_n_groups != 0:
            raise ValueError(
                f"`mamba_num_heads` ({heads}) must be a multiple of `mamba_n_groups` ({config.mamba_n_groups}): "
                "each group of B and C serves a whole number of heads."
            )
        if config.mamba_dt_min > config.mamba_dt_max:
            raise ValueError(
                f"`mamba_dt_min` ({config.mamba_dt_min}) must be <= `mamba_dt_max` ({config.mamba_dt_max}): they are "
                "the initial range of the step dt."
            )
        upper = config.mamba_dt_max_limit
        if upper is not None and upper <= config.mamba_dt_min_limit:
            raise ValueError(
                f"`mamba_dt_max_limit` ({upper}) must be > `mamba_dt_min_limit` ({config.mamba_dt_min_limit}), or "
                "None (no upper limit)."
            )

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = mamba_num_heads(config)
        self.head_dim = config.mamba_head_dim
        self.n_groups = config.mamba_n_groups
        self.d_state = config.mamba_d_state
        self.conv_kernel_size = config.mamba_conv_kernel
        self.chunk_size = config.mamba_chunk_size
        self.dt_limit = (config.mamba_dt_min_limit, config.mamba_dt_max_limit)
        self.dt_init_range = (config.mamba_dt_min, config.mamba_dt_max, config.mamba_dt_init_floor)
        self.intermediate_size = self.num_heads * self.head_dim
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.d_state

        projection_size = self.intermediate_size + self.conv_dim + self.num_heads  # [z | xBC | dt]
        self.in_proj = nn.Linear(self.hidden_size, projection_size, bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel_size, groups=self.conv_dim, bias=config.mamba_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = HybridRMSNormGroupGated(self.intermediate_size, self.n_groups, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.mamba_proj_bias)
        self.init_custom_parameters()  # usable on its own; from_pretrained overwrites these anyway

    @torch.no_grad()
    def init_custom_parameters(self) -> None:
        """Mamba-2's initialisation: A = 1..H, D = 1, dt log-uniform in [dt_min, dt_max] (floored) through an inverse
        softplus into `dt_bias`; the short conv as PyTorch initialises it (see `init_short_conv_`)."""
        init_short_conv_(self.conv1d)
        init.copy_(self.A_log, torch.arange(1, self.num_heads + 1, dtype=torch.float32).log())
        init.ones_(self.D)
        dt_min, dt_max, floor = self.dt_init_range
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    state_formula = "4·H·P·N (fp32 SSM state) + b·(K−1)·(H·P + 2·G·N) (conv window)"

    @staticmethod
    def state_bytes(config, dtype_bytes: int) -> int:
        """Bytes of recurrent state per sequence: the float32 SSM state plus the conv window."""
        heads, head_dim, d_state = mamba_num_heads(config), config.mamba_head_dim, config.mamba_d_state
        conv_dim = heads * head_dim + 2 * config.mamba_n_groups * d_state
        return 4 * heads * head_dim * d_state + dtype_bytes * (config.mamba_conv_kernel - 1) * conv_dim

    @staticmethod
    def parameter_count(config) -> int:
        """Closed form of this block's parameters (checked against the instantiated module in tests)."""
        hidden, heads = config.hidden_size, mamba_num_heads(config)
        inner = heads * config.mamba_head_dim
        conv_dim = inner + 2 * config.mamba_n_groups * config.mamba_d_state
        projection = inner + conv_dim + heads
        count = hidden * projection + inner * hidden  # in_proj, out_proj
        count += conv_dim * config.mamba_conv_kernel + 3 * heads + inner  # conv, dt_bias / A_log / D, norm
        if config.mamba_conv_bias:
            count += conv_dim
        if config.mamba_proj_bias:
            count += projection + hidden
        return count

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the block over `[B, T, hidden]`, continuing from `state` (None = fresh). Returns `(y, new_state)`.

        `mask` `[B, T]` (False at padding) makes padded steps identity transitions; `reset` `[B, T]` clears the state
        and the conv window where a new document starts.
        """
        batch, length, _ = hidden_states.shape
        conv_state, ssm_state = state if state is not None else (None, None)
        if self.is_decode_step(hidden_states, state, mask, reset):
            kept = self._kept_tensors()
            if kept is not None:
                return self._decode_step(hidden_states, conv_state, ssm_state, kept)
        heads, head_dim, groups, d_state = self.num_heads, self.head_dim, self.n_groups, self.d_state

        z, xBC, dt = self.in_proj(hidden_states).split([self.intermediate_size, self.conv_dim, heads], dim=-1)
        xBC, conv_state = causal_conv1d(
            xBC, self.conv1d.weight[:, 0], conv_state, mask=mask, reset=reset, bias=self.conv1d.bias, activation="silu"
        )
        x, B, C = xBC.split([self.intermediate_size, groups * d_state, groups * d_state], dim=-1)
        x = x.reshape(batch, length, heads, head_dim)

        dtype = torch.promote_types(dt.dtype, torch.float32)  # the decay in at least float32
        dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype)).clamp(*self.dt_limit)
        if mask is not None:
            dt = dt * mask.unsqueeze(-1)  # dt = 0: no decay and nothing written, the state passes through
        A = -torch.exp(self.A_log.to(dtype))
        y, ssm_state = ssd(
            x,
            dt,
            A,
            B.reshape(batch, length, groups, d_state),
            C.reshape(batch, length, groups, d_state),
            initial_state=ssm_state,
            reset=reset,
            chunk_size=self.chunk_size,
        )
        y = y + x * self.D.to(x.dtype)[:, None]
        y = self.norm(y.reshape(batch, length, self.intermediate_size), z)
        return self.out_proj(y), (conv_state, ssm_state)

    @torch.no_grad()
    def _decode_step(
        self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, kept: _KeptTensors
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One float32 token `[B, 1, hidden]` from a cached state, without autograd: `forward`'s function in about
        half the small ops (decoding a small model is bound by per-op overhead, not arithmetic). What it derives from
        the weights is kept between calls (`_kept_tensors`); the output norm's weight is folded into out_proj's."""
        batch = hidden_states.shape[0]
        heads, head_dim, groups, d_state = self.num_heads, self.head_dim, self.n_groups, self.d_state
        inputs = hidden_states.view(batch, -1)
        if kept.projection_bias is None:
            projected = torch.matmul(inputs, kept.projection)
        else:
            projected = torch.addmm(kept.projection_bias, inputs, kept.projection)
        z, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, heads], dim=-1)
        # short conv over the window (state, token), bias, SiLU
        window = torch.cat([conv_state, xBC.unsqueeze(1)], dim=1)  # [B, K, conv_dim]
        preactivation = (window * kept.conv_taps).sum(1)
        if kept.conv_bias is not None:
            preactivation += kept.conv_bias
        x, B, C = F.silu(preactivation).split([self.intermediate_size, groups * d_state, groups * d_state], dim=-1)
        # state <- exp(dt A) state + (dt x) B^T per head;  y = state C + D x;  heads grouped [G, H / G] under B, C
        dt = F.softplus(dt + kept.dt_bias).clamp(*self.dt_limit)  # [B, H]
        per_group = (batch, groups, heads // groups, 1, 1)
        state = ssm_state.reshape(batch, groups, heads // groups, head_dim, d_state) * torch.exp(dt * kept.A).view(
            per_group
        )
        x_heads = x.view(batch, groups, heads // groups, head_dim, 1)
        state.addcmul_(x_heads * dt.view(per_group), B.view(batch, groups, 1, 1, d_state))
        y = torch.matmul(state, C.view(batch, groups, 1, d_state, 1)).addcmul_(x_heads, kept.D)
        # group-wise RMSNorm of y * silu(z), its weight times sqrt(group width) folded into the kept out_proj
        gated = y.view(batch, groups, -1).mul_(F.silu(z).view(batch, groups, -1))
        gated = scaled_unit_rows(gated, None, kept.norm_eps_root)
        if kept.output_bias is None:
            output = torch.matmul(gated.view(batch, -1), kept.output_projection)
        else:
            output = torch.addmm(kept.output_bias, gated.view(batch, -1), kept.output_projection)
        new_state = (window[:, 1:], state.view(batch, heads, head_dim, d_state))
        return output.view(batch, 1, -1), new_state

    def _kept_tensors(self) -> _KeptTensors | None:
        """What `_decode_step` derives from the weights (`derived_from_weights`: kept between calls, rebuilt when a
        weight changes), or None where it must not run: wrapped or hooked projections or norm (PEFT, accelerate),
        weights other than float32, or projections over `FUSED_MAX_WEIGHTS` (decoding a large block is bound by
        reading its weights, and a copy would double them)."""
        modules = self._modules
        in_proj, out_proj, norm, conv = modules["in_proj"], modules["out_proj"], modules["norm"], modules["conv1d"]
        if (
            not plain_linears((in_proj, out_proj))
            or type(norm) is not HybridRMSNormGroupGated
            or norm._forward_hooks
            or norm._forward_pre_hooks
            or max(in_proj.weight.numel(), out_proj.weight.numel()) > FUSED_MAX_WEIGHTS
        ):
            return None
        tensors = [in_proj.weight, out_proj.weight, norm.weight, conv.weight, self.A_log, self.dt_bias, self.D]
        tensors += [t for t in (in_proj.bias, out_proj.bias, conv.bias) if t is not None]
        if any(t.dtype != torch.float32 for t in tensors):
            return None
        eps = norm.variance_epsilon
        return derived_from_weights(self, tensors, lambda detached: self._derive(eps), (eps,))

    def _derive(self, eps: float) -> _KeptTensors:
        in_proj, out_proj, norm, conv = self.in_proj, self.out_proj, self.norm, self.conv1d
        group_width = self.intermediate_size // self.n_groups
        # RMSNorm as x / hypot(|x|, sqrt(D eps)) times sqrt(D) * weight (`ops_norm.scaled_unit_rows`)
        output_projection = (out_proj.weight * (norm.weight * math.sqrt(group_width))).t().contiguous()
        return _KeptTensors(
            projection=in_proj.weight.t().contiguous(),
            projection_bias=None if in_proj.bias is None else in_proj.bias.clone(),
            conv_taps=conv.weight[:, 0].t().contiguous(),
            conv_bias=None if conv.bias is None else conv.bias.clone(),
            A=-torch.exp(self.A_log),
            dt_bias=self.dt_bias.clone(),
            D=self.D.view(self.n_groups, -1, 1, 1).clone(),
            norm_eps_root=torch.tensor(math.sqrt(group_width * eps), device=self.D.device),
            output_projection=output_projection,
            output_bias=None if out_proj.bias is None else out_proj.bias.clone(),
        )


class _KeptTensors(NamedTuple):
    projection: torch.Tensor  # [hidden, z | xBC | dt]: in_proj's weight transposed
    projection_bias: torch.Tensor | None
    conv_taps: torch.Tensor  # [K, conv_dim]
    conv_bias: torch.Tensor | None
    A: torch.Tensor  # [H]: -exp(A_log)
    dt_bias: torch.Tensor  # [H]
    D: torch.Tensor  # [G, H / G, 1, 1]
    norm_eps_root: torch.Tensor  # sqrt(group width * eps) of the output norm
    output_projection: torch.Tensor  # [H P, hidden]: out_proj's weight times the norm's (and sqrt(group width))
    output_bias: torch.Tensor | None

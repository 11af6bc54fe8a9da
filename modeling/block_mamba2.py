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
from .layers import init_short_conv_
from .ops_conv import causal_conv1d
from .ops_mamba2 import ssd


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

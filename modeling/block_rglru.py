"""Griffin's recurrent block with the Real-Gated Linear Recurrent Unit (De et al., 2024; RecurrentGemma).

Two branches from x:

    gate = GeLU(linear_y(x))
    u    = causal_conv1d(linear_x(x))                         (depthwise, width 4)
    r_t  = sigmoid(W_a u_t + b_a),  i_t = sigmoid(W_x u_t + b_x)   (block-diagonal: one d x d matrix per head)
    log a_t = -c * r_t * softplus(Lambda),  c = 8
    h_t  = a_t * h_{t-1} + m_t * (i_t * u_t),  m_t = sqrt(1 - a_t^2), and m_t = 1 where a sequence starts
    y    = out_proj(h * gate)

The input multiplier follows RecurrentGemma (transformers and google-deepmind/recurrentgemma): 1 at the first token
of a sequence or document (a fresh state or a `reset`), sqrt(1 - a^2) elsewhere, with that square root's gradient
bounded by 1000.
The recurrence is diagonal and linear in h, so it runs through `ops_rglru.linear_recurrence` (a time loop on CPU;
see there for the measurements). Decoding a token is the same call with T = 1.
State per sequence: the conv window `[K - 1, width]` and `h` `[width]` (float32).
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
    is_int_or_none,
    is_positive_int,
    is_positive_int_or_none,
    require_divisible,
    require_positive_ints,
)
from .layers import FUSED_MAX_WEIGHTS, derived_from_weights, init_short_conv_, plain_linears
from .ops_conv import causal_conv1d
from .ops_rglru import linear_recurrence

GATE_SCALE = 8.0  # the constant c of the paper


MAX_SQRT_GRADIENT = 1000.0  # RecurrentGemma's bound on d sqrt(x) / dx (finite as a_t -> 1, e.g. in bf16)


class _SqrtBoundedGrad(torch.autograd.Function):
    """`sqrt(x)` whose derivative `1 / (2 sqrt(x))` is capped at `MAX_SQRT_GRADIENT`, as in RecurrentGemma."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clamp(4.0 * x, min=1.0 / MAX_SQRT_GRADIENT**2))


def rglru_coefficients(
    log_a: torch.Tensor, gated_x: torch.Tensor, starts: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`a_t` and `b_t = m_t * gated_x` of the RG-LRU, `m_t = sqrt(1 - a_t^2)` (`1 - a^2 = -expm1(2 log a)`, exact
    near a = 1), and `m_t = 1` where `starts` `[B, T]` is True: the first input of a sequence or document enters
    unscaled (RecurrentGemma, transformers and google-deepmind/recurrentgemma)."""
    multiplier = _SqrtBoundedGrad.apply(-torch.expm1(2.0 * log_a))
    if starts is not None:
        multiplier = torch.where(starts.unsqueeze(-1), torch.ones_like(multiplier), multiplier)
    return torch.exp(log_a), multiplier * gated_x


def sequence_starts(
    state: object | None, mask: torch.Tensor | None, reset: torch.Tensor | None, batch: int, length: int,
    device: torch.device,
) -> torch.Tensor | None:
    """`[B, T]` True where a sequence starts: every `reset`, and each row's first real token when there is no state
    yet (a fresh sequence; with a state the call continues one). None when there is none."""
    starts = reset
    if state is None:
        real = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        first = real & (real.long().cumsum(dim=1) == 1)
        starts = first if starts is None else starts | first
    return starts


class HybridRGLRU(HybridBlock):
    block_type = "rglru"
    pattern_letter = "R"
    config_fields = (
        BlockField("rglru_width", None, "width of the recurrence (default: `hidden_size`)", is_int_or_none,
                   "must be an integer or None", default_from="hidden_size"),
        BlockField("rglru_num_heads", None, "heads of the block-diagonal gates, dividing `rglru_width` (default: "
                   "`num_attention_heads`)", is_int_or_none, "must be an integer or None",
                   default_from="num_attention_heads"),
        BlockField("rglru_conv_kernel_dim", 4, "width of the causal conv (Griffin: 4)", is_positive_int,
                   "must be an integer >= 1"),
        BlockField("rglru_chunk_size", None, "None: the recurrence as a time loop (fastest on CPU); an int: the "
                   "chunked form with that chunk length (for accelerators)", is_positive_int_or_none,
                   "must be None (time loop) or a positive integer"),
    )
    lora_targets = ("linear_x", "linear_y", "out_proj")

    @classmethod
    def validate_config(cls, config) -> None:
        require_positive_ints(config, ["rglru_width", "rglru_num_heads"], "rglru")
        require_divisible(config, "rglru_width", "rglru_num_heads")

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.width = config.rglru_width
        self.num_heads = config.rglru_num_heads
        self.head_dim = self.width // self.num_heads
        self.conv_kernel_size = config.rglru_conv_kernel_dim
        self.chunk_size = config.rglru_chunk_size  # None: the time loop (fastest on CPU); int: the chunked form

        self.linear_y = nn.Linear(self.hidden_size, self.width)  # gate branch
        self.linear_x = nn.Linear(self.hidden_size, self.width)  # recurrence branch
        self.conv1d = nn.Conv1d(self.width, self.width, self.conv_kernel_size, groups=self.width)
        # block-diagonal gate weights, [heads, d_in, d_out]: W_a for the recurrence gate r, W_x for the input gate i
        self.a_gate_weight = nn.Parameter(torch.empty(self.num_heads, self.head_dim, self.head_dim))
        self.a_gate_bias = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.x_gate_weight = nn.Parameter(torch.empty(self.num_heads, self.head_dim, self.head_dim))
        self.x_gate_bias = nn.Parameter(torch.empty(self.num_heads, self.head_dim))
        self.a_param = nn.Parameter(torch.empty(self.width))  # Lambda
        self.out_proj = nn.Linear(self.width, self.hidden_size)
        self.init_custom_parameters()  # usable on its own; from_pretrained overwrites these anyway

    state_formula = "b·(K−1)·W (conv window) + 4·W (fp32 h)"

    @staticmethod
    def state_bytes(config, dtype_bytes: int) -> int:
        """Bytes of recurrent state per sequence: the conv window and the diagonal recurrence h."""
        return dtype_bytes * config.rglru_width * (config.rglru_conv_kernel_dim - 1) + 4 * config.rglru_width

    @staticmethod
    def parameter_count(config) -> int:
        """Closed form of this block's parameters (checked against the instantiated module in tests)."""
        hidden, width, heads = config.hidden_size, config.rglru_width, config.rglru_num_heads
        head_dim = width // heads
        branches = 2 * (hidden * width + width)  # linear_y, linear_x
        conv = width * config.rglru_conv_kernel_dim + width
        gates = 2 * (heads * head_dim * head_dim + heads * head_dim)
        return branches + conv + gates + width + width * hidden + hidden

    @torch.no_grad()
    def init_custom_parameters(self) -> None:
        """Gates: LeCun normal per head, zero bias. Lambda: `a^c = exp(-c softplus(Lambda))` uniform in [0.9, 0.999].

        (This follows the paper's wording. RecurrentGemma's code draws `a^2` uniform in [0.81, 0.998] for the base
        `a = exp(-softplus(Lambda))`, before the `c` — a faster-decaying start.)
        """
        init_short_conv_(self.conv1d)
        std = 1.0 / math.sqrt(self.head_dim)
        for weight in (self.a_gate_weight, self.x_gate_weight):
            init.normal_(weight, mean=0.0, std=std)
        for bias in (self.a_gate_bias, self.x_gate_bias):
            init.zeros_(bias)
        a_pow_c = torch.empty_like(self.a_param).uniform_(0.9, 0.999)
        softplus_value = -torch.log(a_pow_c) / GATE_SCALE
        init.copy_(self.a_param, softplus_value + torch.log(-torch.expm1(-softplus_value)))  # inverse softplus

    def _block_diagonal(self, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`[B, T, width]` through one `[d, d]` matrix per head."""
        heads = u.unflatten(-1, (self.num_heads, self.head_dim))
        return (torch.einsum("bthi,hij->bthj", heads, weight) + bias).flatten(-2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the block over `[B, T, hidden]` from `state` = (conv `[B, K-1, width]`, h `[B, width]`) or None.

        `mask` `[B, T]` (False at padding) makes padded steps identity transitions; `reset` `[B, T]` clears the state
        where a new document starts. A call without `state` starts a sequence (its first real token enters with
        multiplier 1); a call with one continues it. Returns `(y [B, T, hidden], new_state)`.
        """
        conv_state, h = state if state is not None else (None, None)
        if self.is_decode_step(hidden_states, state, mask, reset):
            kept = self._kept_tensors()
            if kept is not None:
                return self._decode_step(hidden_states, conv_state, h, kept)
        gate = F.gelu(self.linear_y(hidden_states), approximate="tanh")
        u = self.linear_x(hidden_states)
        u, conv_state = causal_conv1d(
            u, self.conv1d.weight[:, 0], conv_state, mask=mask, reset=reset, bias=self.conv1d.bias
        )

        # the gates and the recurrence in (at least) float32: a^t over thousands of steps needs the precision
        dtype = torch.promote_types(u.dtype, torch.float32)
        u = u.to(dtype)
        r = torch.sigmoid(self._block_diagonal(u, self.a_gate_weight.to(dtype), self.a_gate_bias.to(dtype)))
        i = torch.sigmoid(self._block_diagonal(u, self.x_gate_weight.to(dtype), self.x_gate_bias.to(dtype)))
        log_a = -GATE_SCALE * r * F.softplus(self.a_param.to(dtype))
        starts = sequence_starts(state, mask, reset, *hidden_states.shape[:2], hidden_states.device)
        a, b = rglru_coefficients(log_a, i * u, starts)
        states, h = linear_recurrence(a, b, h, mask=mask, reset=reset, chunk_size=self.chunk_size)

        y = self.out_proj(states.to(hidden_states.dtype) * gate)
        return y, (conv_state, h)

    @torch.no_grad()
    def _decode_step(
        self, hidden_states: torch.Tensor, conv_state: torch.Tensor, h: torch.Tensor, kept: _KeptTensors
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One float32 token `[B, 1, hidden]` continuing a sequence, without autograd: `forward`'s function with both
        branches as one GEMM and both block-diagonal gates as one batched product per head, on weights kept between
        calls (decoding a small model is bound by per-op overhead, not arithmetic)."""
        batch = hidden_states.shape[0]
        heads, head_dim = self.num_heads, self.head_dim
        projected = torch.addmm(kept.bias, hidden_states.view(batch, -1), kept.projection)  # [B, y | x]
        gate_branch, u = projected.split([self.width, self.width], dim=-1)
        window = torch.cat([conv_state, u.unsqueeze(1)], dim=1)  # [B, K, W]: the conv over (state, token)
        u = (window * kept.conv_taps).sum(1)
        if kept.conv_bias is not None:
            u += kept.conv_bias
        # r | i for every head at once: [H, B, d] x [H, d, 2d] + bias
        gates = torch.sigmoid(torch.baddbmm(kept.gate_bias, u.view(batch, heads, head_dim).transpose(0, 1), kept.gates))
        gates = gates.transpose(0, 1).contiguous()  # [B, H, 2d]
        log_a = gates[..., :head_dim] * kept.neg_scaled_softplus  # -c r softplus(Lambda)
        # a continuing sequence: h <- a h + sqrt(1 - a^2) (i x), with 1 - a^2 = -expm1(2 log a)
        gated_x = torch.expm1(2.0 * log_a).neg_().sqrt_().mul_(gates[..., head_dim:]).view(batch, -1).mul_(u)
        h = torch.addcmul(gated_x, torch.exp(log_a).view(batch, -1), h)
        output = h * F.gelu(gate_branch, approximate="tanh")
        if kept.output_bias is None:
            output = torch.matmul(output, kept.output_projection)
        else:
            output = torch.addmm(kept.output_bias, output, kept.output_projection)
        return output.view(batch, 1, -1), (window[:, 1:], h)

    def _kept_tensors(self) -> _KeptTensors | None:
        """What `_decode_step` derives from the weights (`derived_from_weights`: kept between calls, rebuilt when a
        weight changes), or None where it must not run: wrapped or hooked projections (PEFT, accelerate), weights
        other than float32, or projections over `FUSED_MAX_WEIGHTS`."""
        modules = self._modules
        linears = (modules["linear_y"], modules["linear_x"], modules["out_proj"])
        if not plain_linears(linears) or 2 * linears[0].weight.numel() > FUSED_MAX_WEIGHTS:
            return None
        tensors = [t for module in (*linears, modules["conv1d"]) for t in (module.weight, module.bias) if t is not None]
        tensors += [self.a_gate_weight, self.a_gate_bias, self.x_gate_weight, self.x_gate_bias, self.a_param]
        if any(t.dtype != torch.float32 for t in tensors):
            return None
        return derived_from_weights(self, tensors, lambda detached: self._derive())

    def _derive(self) -> _KeptTensors:
        linear_y, linear_x, out_proj, conv = self.linear_y, self.linear_x, self.out_proj, self.conv1d

        def bias(linear: nn.Linear) -> torch.Tensor:
            return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)

        heads, head_dim = self.num_heads, self.head_dim
        return _KeptTensors(
            projection=torch.cat([linear_y.weight, linear_x.weight]).t().contiguous(),
            bias=torch.cat([bias(linear_y), bias(linear_x)]),
            conv_taps=conv.weight[:, 0].t().contiguous(),
            conv_bias=None if conv.bias is None else conv.bias.clone(),
            gates=torch.cat([self.a_gate_weight, self.x_gate_weight], dim=-1),  # [H, d, 2d]
            gate_bias=torch.cat([self.a_gate_bias, self.x_gate_bias], dim=-1).unsqueeze(1),  # [H, 1, 2d]
            neg_scaled_softplus=(-GATE_SCALE * F.softplus(self.a_param)).view(heads, head_dim),
            output_projection=out_proj.weight.t().contiguous(),
            output_bias=None if out_proj.bias is None else out_proj.bias.clone(),
        )

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sequence shapes of the carried state (without the batch dim); `h` is float32."""
        return {"conv": (self.conv_kernel_size - 1, self.width), "recurrent": (self.width,)}


class _KeptTensors(NamedTuple):
    projection: torch.Tensor  # [hidden, 2 W]: linear_y | linear_x, transposed
    bias: torch.Tensor  # [2 W]
    conv_taps: torch.Tensor  # [K, W]
    conv_bias: torch.Tensor | None
    gates: torch.Tensor  # [H, d, 2 d]: the recurrence and input gates' block-diagonal weights side by side
    gate_bias: torch.Tensor  # [H, 1, 2 d]
    neg_scaled_softplus: torch.Tensor  # [H, d]: -c softplus(Lambda)
    output_projection: torch.Tensor  # [W, hidden]
    output_bias: torch.Tensor | None

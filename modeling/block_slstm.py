"""sLSTM block (Beck et al., xLSTM, NeurIPS 2024): a scalar-memory LSTM with exponential gating and memory mixing.

x -> causal conv1d(4) + SiLU -> input and forget gate inputs;  x -> cell input and output gate inputs;
sLSTM recurrence (block-diagonal recurrent matrix R per head, see `ops_slstm`) -> group norm per head -> out_proj.
The gated MLP that follows in the xLSTM sLSTM block is the decoder layer's MLP here.

The recurrence is non-linear in its state, so it is a time loop in training as in decoding.
State per sequence: `c, n, m, h` `[heads, head_dim]` each (float32), then the conv window `[K - 1, hidden]` if the
conv is on (`slstm_conv_kernel_dim > 0`).
"""

from __future__ import annotations

import torch
import transformers.initialization as init
from torch import nn
from torch.nn import functional as F

from .block_base import (
    BlockField,
    HybridBlock,
    is_int,
    is_int_or_none,
    one_of,
    require_divisible,
    require_positive_ints,
)
from .layers import init_short_conv_
from .ops_conv import causal_conv1d
from .ops_slstm import slstm_recurrence


class HybridSLSTM(HybridBlock):
    block_type = "slstm"
    pattern_letter = "X"
    config_fields = (
        BlockField("slstm_num_heads", None, "heads of the block-diagonal recurrent matrix, dividing `hidden_size` "
                   "(default: `num_attention_heads`)", is_int_or_none, "must be an integer or None",
                   default_from="num_attention_heads"),
        BlockField("slstm_conv_kernel_dim", 4, "width of the causal conv feeding the input and forget gates (xLSTM: "
                   "4); 0 turns it off", lambda value: is_int(value) and value >= 0,
                   "must be an integer >= 0 (0: no conv)"),
        BlockField("slstm_forget_gate", "sigmoid", "forget gate activation, 'sigmoid' or 'exp'",
                   one_of("sigmoid", "exp"), "must be 'sigmoid' or 'exp'"),
    )
    lora_targets = ("if_proj", "zo_proj", "out_proj")

    @classmethod
    def validate_config(cls, config) -> None:
        require_positive_ints(config, ["hidden_size", "slstm_num_heads"], "slstm")
        require_divisible(config, "hidden_size", "slstm_num_heads")

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.slstm_num_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.conv_kernel_size = config.slstm_conv_kernel_dim
        self.forget_gate = config.slstm_forget_gate
        self.initializer_range = config.initializer_range

        if self.conv_kernel_size > 0:
            self.conv1d = nn.Conv1d(self.hidden_size, self.hidden_size, self.conv_kernel_size, groups=self.hidden_size)
        else:
            self.conv1d = None
        self.if_proj = nn.Linear(self.hidden_size, 2 * self.hidden_size, bias=False)  # input, forget gates (conv'd x)
        self.zo_proj = nn.Linear(self.hidden_size, 2 * self.hidden_size, bias=False)  # cell input, output gate (x)
        self.gate_bias = nn.Parameter(torch.empty(4, self.num_heads, self.head_dim))  # i, f, z, o
        self.recurrent_weight = nn.Parameter(torch.empty(self.num_heads, self.head_dim, 4 * self.head_dim))
        self.norm = nn.GroupNorm(self.num_heads, self.hidden_size, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.init_custom_parameters()  # usable on its own; from_pretrained overwrites these anyway

    state_formula = "4·b·D (c, n, m, h) + b·(K−1)·D (conv window, when K > 0)"

    @staticmethod
    def state_bytes(config, dtype_bytes: int) -> int:
        """Bytes of recurrent state per sequence: c, n, m and h, plus the conv window when there is a conv."""
        kernel = config.slstm_conv_kernel_dim
        return dtype_bytes * config.hidden_size * (4 + max(kernel - 1, 0))

    @staticmethod
    def parameter_count(config) -> int:
        """Closed form of this block's parameters (checked against the instantiated module in tests)."""
        hidden, kernel = config.hidden_size, config.slstm_conv_kernel_dim
        head_dim = hidden // config.slstm_num_heads
        conv = hidden * kernel + hidden if kernel > 0 else 0
        recurrent = config.slstm_num_heads * head_dim * 4 * head_dim
        return conv + 4 * hidden * hidden + 4 * hidden + recurrent + 2 * hidden + hidden * hidden

    @torch.no_grad()
    def init_custom_parameters(self) -> None:
        """R like the other weights; biases zero except the forget gate: linspace(3, 6) over each head's units, so
        the cell starts out remembering over a spread of time scales (as xLSTM does)."""
        init.normal_(self.recurrent_weight, mean=0.0, std=self.initializer_range)
        if self.conv1d is not None:
            init_short_conv_(self.conv1d)
        bias = torch.zeros_like(self.gate_bias)
        bias[1] = torch.linspace(3.0, 6.0, self.head_dim, dtype=bias.dtype)
        init.copy_(self.gate_bias, bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: tuple[torch.Tensor, ...] | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run the block over `[B, T, hidden]` from `state` = (c, n, m, h[, conv]) or None (fresh).

        `mask` `[B, T]` (False at padding) makes padded steps identity transitions; `reset` `[B, T]` clears the state
        where a new document starts. Returns `(y [B, T, hidden], new_state)`.
        """
        batch, length, _ = hidden_states.shape
        cell_state, conv_state = (
            (state[:4], state[4] if len(state) > 4 else None) if state is not None else (None, None)
        )

        gate_source = hidden_states
        if self.conv1d is not None:
            gate_source, conv_state = causal_conv1d(
                hidden_states,
                self.conv1d.weight[:, 0],
                conv_state,
                mask=mask,
                reset=reset,
                bias=self.conv1d.bias,
                activation="silu",
            )
        # the input half of every gate for all steps at once, in (at least) float32: the gates are exponentials
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        gate_inputs = torch.cat([self.if_proj(gate_source), self.zo_proj(hidden_states)], dim=-1).to(dtype)
        gate_inputs = gate_inputs.view(batch, length, 4, self.num_heads, self.head_dim) + self.gate_bias.to(dtype)

        hidden, cell_state = slstm_recurrence(
            gate_inputs,
            self.recurrent_weight.to(dtype),
            cell_state,
            mask=mask,
            reset=reset,
            forget_gate=self.forget_gate,
        )
        # normalise each head on its own in the recurrence's dtype, then back to the model dtype
        norm = self.norm
        hidden = F.group_norm(
            hidden.reshape(batch * length, self.hidden_size),
            self.num_heads,
            norm.weight.to(dtype),
            norm.bias.to(dtype),
            norm.eps,
        )
        y = self.out_proj(hidden.view(batch, length, self.hidden_size).to(hidden_states.dtype))
        new_state = tuple(cell_state) + ((conv_state,) if self.conv1d is not None else ())
        return y, new_state

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sequence shapes of the carried state (without the batch dim); c, n, m, h are float32."""
        shapes = {name: (self.num_heads, self.head_dim) for name in ("c", "n", "m", "h")}
        if self.conv1d is not None:
            shapes["conv"] = (self.conv_kernel_size - 1, self.hidden_size)
        return shapes

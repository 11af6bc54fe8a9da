"""ParaRNN blocks (Danieli et al., arXiv 2510.21450): non-linear GRU / LSTM cells trained in parallel by Newton.

The block around the cell follows the paper's Fig. 9 (RNN block = projection, short conv, RNN cell, gated RMSNorm,
output projection):

    x, z = in_proj(hidden).chunk(2)
    u    = SiLU(causal_conv1d(x))                               (depthwise, width 4; 0 turns it off)
    g    = block_diagonal(u) + b                                (one [d, 3d] matrix per head: the cell's B x + b)
    h    = ParaGRU or ParaLSTM cell over g                      (`ops_pararnn`; Newton or a time loop, below)
    y    = out_proj(RMSNorm(h) * SiLU(z))

`config.rnn_solver` picks how a multi-token input runs the cell: `"newton"` (`ops_newton.newton_recurrence`: a few
vectorised Newton iterations over all steps, adjoint backward) or `"sequential"` (a time loop under autograd). Both
compute the same states (to the Newton tolerance). Decoding one token is one cell step either way. Each block keeps the
statistics of its last Newton solve (`last_newton_stats`) and running totals (`newton_totals`) for training logs.

Initialisation as ParaRNN: diagonal recurrent weights and peepholes normal(0, 2 / sqrt(5 W)) (xLSTM-style), input
weights uniform(+-sqrt(6 / (d + W))), biases zero except the first gate (update / forget) at -linspace(0, 1).
State per sequence: the conv window `[K - 1, W]` and the cell state (ParaGRU `h` `[W]`, ParaLSTM `[c, h]` `[2, W]`,
float32).
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
    is_int,
    is_int_or_none,
    is_positive_number,
    one_of,
    require_divisible,
    require_positive_ints,
)
from .layers import HybridRMSNormGated, init_short_conv_
from .ops_conv import causal_conv1d
from .ops_newton import NewtonStats, newton_recurrence, sequential_recurrence
from .ops_pararnn import PARAGRU, PARALSTM

RNN_SOLVERS = ("newton", "sequential")


# shared by both blocks (the same objects, so the registry sees one field each)
PARARNN_FIELDS = (
    BlockField(
        "pararnn_width",
        None,
        "cell width of the `paragru` / `paralstm` blocks (default: `hidden_size`)",
        is_int_or_none,
        "must be an integer or None",
        default_from="hidden_size",
    ),
    BlockField(
        "pararnn_num_heads",
        None,
        "heads of their block-diagonal input weights, dividing `pararnn_width` (default: `num_attention_heads`)",
        is_int_or_none,
        "must be an integer or None",
        default_from="num_attention_heads",
    ),
    BlockField(
        "pararnn_conv_kernel_dim",
        4,
        "width of their causal conv (ParaRNN: 4); 0 turns it off",
        lambda value: is_int(value) and value >= 0,
        "must be an integer >= 0 (0: no conv)",
    ),
    BlockField(
        "rnn_solver",
        "newton",
        "how they run a multi-token input: 'newton' (Newton's method over all steps, "
        "`ops_newton`) or 'sequential' (a time loop); both give the same states",
        one_of(*RNN_SOLVERS),
        "must be 'newton' or 'sequential'",
    ),
    BlockField(
        "newton_max_iter",
        8,
        "Newton iterations before the remaining steps are finished sequentially "
        "(counted in each block's `newton_totals['fallbacks']`, with a warning)",
        lambda value: is_int(value) and value >= 0,
        "must be an integer >= 0",
    ),
    BlockField(
        "newton_tol",
        None,
        "largest accepted defect |h_t - f(h_{t-1}, x_t)| (None: 32 float32 ulps)",
        lambda value: value is None or is_positive_number(value),
        "must be > 0 or None (32 float32 ulps)",
    ),
)


class _ParaRNNBlock(HybridBlock):
    cell = None  # set by the subclasses
    num_peepholes = 0
    config_fields = PARARNN_FIELDS
    lora_targets = ("in_proj", "out_proj")

    @classmethod
    def validate_config(cls, config) -> None:
        require_positive_ints(config, ["pararnn_width", "pararnn_num_heads"], cls.block_type)
        require_divisible(
            config, "pararnn_width", "pararnn_num_heads", "the block-diagonal input weights split it into equal heads"
        )

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.width = config.pararnn_width
        self.num_heads = config.pararnn_num_heads
        self.head_dim = self.width // self.num_heads
        self.conv_kernel_size = config.pararnn_conv_kernel_dim
        self.rnn_solver = config.rnn_solver
        self.newton_max_iter = config.newton_max_iter
        self.newton_tol = config.newton_tol

        self.in_proj = nn.Linear(self.hidden_size, 2 * self.width, bias=False)  # cell input x and output gate z
        if self.conv_kernel_size > 0:
            self.conv1d = nn.Conv1d(self.width, self.width, self.conv_kernel_size, groups=self.width)
        else:
            self.conv1d = None
        # the cell's input weights B, block-diagonal: per head a [d, 3 d] matrix (gates in the cell's order)
        self.gate_weight = nn.Parameter(torch.empty(self.num_heads, self.head_dim, 3 * self.head_dim))
        self.gate_bias = nn.Parameter(torch.empty(3, self.width))
        self.recurrent_weight = nn.Parameter(torch.empty(3, self.width))  # diagonal recurrence a
        if self.num_peepholes:
            self.peephole = nn.Parameter(torch.empty(self.num_peepholes, self.width))
        self.norm = HybridRMSNormGated(self.width, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.width, self.hidden_size, bias=False)
        self.last_newton_stats: NewtonStats | None = None
        self.newton_totals = {"solves": 0, "iterations": 0, "max_iterations": 0, "fallbacks": 0}
        self.init_custom_parameters()  # usable on its own; from_pretrained overwrites these anyway

    state_formula = "b·(K−1)·W (conv window) + 4·n·W (fp32 cell state, n = 1 ParaGRU, 2 ParaLSTM)"

    @classmethod
    def state_bytes(cls, config, dtype_bytes: int) -> int:
        """Bytes of recurrent state per sequence: the conv window and the float32 cell state."""
        width, kernel = config.pararnn_width, config.pararnn_conv_kernel_dim
        return dtype_bytes * width * max(kernel - 1, 0) + 4 * cls.cell.block * width

    @classmethod
    def parameter_count(cls, config) -> int:
        """Closed form of this block's parameters (checked against the instantiated module in tests)."""
        hidden, width, heads, kernel = (
            config.hidden_size,
            config.pararnn_width,
            config.pararnn_num_heads,
            config.pararnn_conv_kernel_dim,
        )
        conv = width * kernel + width if kernel > 0 else 0
        gates = heads * (width // heads) * 3 * (width // heads) + 3 * width
        return hidden * 2 * width + conv + gates + (3 + cls.num_peepholes) * width + width + width * hidden

    @torch.no_grad()
    def init_custom_parameters(self) -> None:
        """ParaRNN's initialisation (see the module docstring)."""
        std = 2.0 / math.sqrt(5 * self.width)
        init.normal_(self.recurrent_weight, mean=0.0, std=std)
        if self.num_peepholes:
            init.normal_(self.peephole, mean=0.0, std=std)
        bound = math.sqrt(6.0 / (self.head_dim + self.head_dim))
        init.uniform_(self.gate_weight, -bound, bound)
        bias = torch.zeros_like(self.gate_bias)
        bias[0] = -torch.linspace(0.0, 1.0, self.width, dtype=bias.dtype)
        init.copy_(self.gate_bias, bias)
        if self.conv1d is not None:
            init_short_conv_(self.conv1d)

    def _params(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        params = (self.recurrent_weight.to(dtype),)
        return params + ((self.peephole.to(dtype),) if self.num_peepholes else ())

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: tuple[torch.Tensor, ...] | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run the block over `[B, T, hidden]` from `state` = (cell state, conv window) or None (fresh).

        `mask` `[B, T]` (False at padding) makes padded steps identity transitions; `reset` `[B, T]` clears the state
        where a new document starts. Returns `(y [B, T, hidden], new_state)`.
        """
        batch, length, _ = hidden_states.shape
        cell_state, conv_state = state if state is not None else (None, None)
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        if self.conv1d is not None:
            u, conv_state = causal_conv1d(
                x, self.conv1d.weight[:, 0], conv_state, mask=mask, reset=reset, bias=self.conv1d.bias,
                activation="silu",
            )
        else:
            u = F.silu(x)

        # the cell in (at least) float32: Newton's tolerance and thousands of steps need the precision
        dtype = torch.promote_types(u.dtype, torch.float32)
        heads = u.to(dtype).unflatten(-1, (self.num_heads, self.head_dim))
        gates = torch.einsum("bthi,hij->bthj", heads, self.gate_weight.to(dtype))  # [B, T, heads, 3 d]
        gates = gates.unflatten(-1, (3, self.head_dim)).transpose(2, 3).reshape(batch, length, 3, self.width)
        gates = gates + self.gate_bias.to(dtype)
        if cell_state is not None:
            cell_state = cell_state.to(dtype)

        params = self._params(dtype)
        if self.rnn_solver == "newton" and length > 1:
            stats = NewtonStats()
            states, _ = newton_recurrence(
                self.cell,
                gates,
                params,
                cell_state,
                mask=mask,
                reset=reset,
                tol=self.newton_tol,
                max_iter=self.newton_max_iter,
                stats=stats,
            )
            self._record(stats)
        else:
            states = sequential_recurrence(self.cell, gates, params, cell_state, mask=mask, reset=reset)
        hidden = states if self.cell.block == 1 else states[:, :, 1]
        y = self.out_proj(self.norm(hidden, z.to(dtype)).to(hidden_states.dtype))
        new_state = (states[:, -1].clone(), conv_state) if self.conv1d is not None else (states[:, -1].clone(),)
        return y, new_state

    def _record(self, stats: NewtonStats) -> None:
        self.last_newton_stats = stats
        totals = self.newton_totals
        totals["solves"] += 1
        totals["iterations"] += stats.iterations
        totals["max_iterations"] = max(totals["max_iterations"], stats.iterations)
        totals["fallbacks"] += int(not stats.converged)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sequence shapes of the carried state (without the batch dim); the cell state is float32."""
        shapes = {"cell": (self.width,) if self.cell.block == 1 else (2, self.width)}
        if self.conv1d is not None:
            shapes["conv"] = (self.conv_kernel_size - 1, self.width)
        return shapes


class HybridParaGRU(_ParaRNNBlock):
    """ParaGRU block: GRU with diagonal recurrent weights (diagonal Jacobian)."""

    block_type = "paragru"
    pattern_letter = "U"
    cell = PARAGRU


class HybridParaLSTM(_ParaRNNBlock):
    """ParaLSTM block: CIFG LSTM with diagonal recurrence and peepholes (2x2 block-diagonal Jacobian over [c, h])."""

    block_type = "paralstm"
    pattern_letter = "P"
    cell = PARALSTM
    num_peepholes = 2

"""Classic LSTM block (Hochreiter & Schmidhuber, 1997) used as a sequence mixer.

x -> `torch.nn.LSTM` (fused, whole sequences) -> out_proj. Padding and document resets inside a row take the step loop
of `ops_lstm` over the same weights. State per sequence: `h` and `c`, `[lstm_hidden_size]` each.
"""

from __future__ import annotations

import torch
import transformers.initialization as init
from torch import nn

from .block_base import BlockField, HybridBlock, is_positive_int
from .ops_lstm import lstm_loop


class HybridLSTM(HybridBlock):
    block_type = "lstm"
    pattern_letter = "L"
    config_fields = (
        BlockField("lstm_hidden_size", None, "width of the cell (default: `hidden_size`)", is_positive_int,
                   "must be a positive integer", default_from="hidden_size"),
    )
    lora_targets = ("o_proj",)
    lora_custom_targets = ("lstm",)  # nn.LSTM: `recipes.peft_utils.LoraLSTM` adapts it

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.lstm_hidden_size = config.lstm_hidden_size
        self.lstm = nn.LSTM(self.hidden_size, self.lstm_hidden_size, batch_first=True)
        self.o_proj = nn.Linear(self.lstm_hidden_size, self.hidden_size, bias=False)

    @torch.no_grad()
    def init_custom_parameters(self) -> None:
        """Forget-gate bias 1 (Gers et al., 2000): start by remembering; gate order in nn.LSTM is i, f, g, o."""
        size = self.lstm_hidden_size
        bias = torch.zeros_like(self.lstm.bias_ih_l0)
        bias[size : 2 * size] = 1.0
        init.copy_(self.lstm.bias_ih_l0, bias)

    state_formula = "2·b·H_lstm (h and c)"

    @staticmethod
    def state_bytes(config, dtype_bytes: int) -> int:
        """Bytes of recurrent state per sequence: h and c."""
        return 2 * dtype_bytes * config.lstm_hidden_size

    @staticmethod
    def parameter_count(config) -> int:
        """Closed form of this block's parameters (checked against the instantiated module in tests)."""
        cell = config.lstm_hidden_size
        return 4 * cell * (config.hidden_size + cell) + 8 * cell + cell * config.hidden_size

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run over `[B, T, hidden]` from `state` = (h, c), `[B, H]` each (None = zeros); returns `(y, state)`."""
        batch = hidden_states.shape[0]
        if state is None:
            zeros = hidden_states.new_zeros(batch, self.lstm_hidden_size)
            state = (zeros, zeros)
        h, c = state
        if reset is not None and not reset[:, 1:].any():
            # a reset on the first step only is just a zero initial state: keep the fused path
            keep = (~reset[:, :1]).to(h.dtype)
            h, c, reset = h * keep, c * keep, None
        if mask is None and reset is None:
            output, h, c = self._fused(hidden_states, h, c)
        else:
            lstm = self.lstm
            bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
            output, h, c = lstm_loop(hidden_states, lstm.weight_ih_l0, lstm.weight_hh_l0, bias, h, c, mask, reset)
        return self.o_proj(output), (h, c)

    def _fused(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`nn.LSTM` over whole sequences: (output, h, c). Under CPU autocast the cell runs in float32, as the other
        blocks' recurrences do: autocast would hand oneDNN's LSTM bfloat16 inputs beside float32 weights, which it
        rejects on CPUs without native bfloat16 ("could not create a primitive descriptor", seen on AVX2 only)."""
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self._fused(x.float(), h.float(), c.float())
        output, (h, c) = self.lstm(x, (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
        return output, h.squeeze(0), c.squeeze(0)

"""A toy recurrent block registered from outside hybridzoo: x -> update, decay and output-gate projections -> gated
leaky average (`ops_toy`) -> times silu(gate) -> out_proj. State per sequence: `h` `[toy_width]` (float32)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hybridzoo.modeling.block_base import BlockField, HybridBlock, require_positive_ints

from .ops_toy import toy_recurrence


def is_decay(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1


class HybridToy(HybridBlock):
    block_type = "toy"
    pattern_letter = "T"
    config_fields = (
        BlockField("toy_width", None, "width of the recurrence (default: `hidden_size`)", default_from="hidden_size"),
        BlockField("toy_max_decay", 0.99, "largest per-step decay", is_decay, "must be a number in (0, 1)"),
    )
    lora_targets = ("in_proj", "out_proj")
    state_formula = "4·W (fp32 h)"

    @classmethod
    def validate_config(cls, config) -> None:
        require_positive_ints(config, ["toy_width"], "toy")

    @classmethod
    def state_bytes(cls, config, dtype_bytes: int) -> int:
        return 4 * config.toy_width

    def __init__(self, config, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.max_decay = config.toy_max_decay
        self.in_proj = nn.Linear(config.hidden_size, 3 * config.toy_width, bias=False)  # update, decay, gate
        self.out_proj = nn.Linear(config.toy_width, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        state: tuple[torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        reset: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        update, decay_logits, gate = self.in_proj(hidden_states).float().chunk(3, dim=-1)
        decay = self.max_decay * torch.sigmoid(decay_logits)
        states, h = toy_recurrence(decay, update, None if state is None else state[0], mask=mask, reset=reset)
        return self.out_proj((states * F.silu(gate)).to(hidden_states.dtype)), (h,)

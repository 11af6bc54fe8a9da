"""What a block is: the base class every block derives from, and the config fields a block declares.

A block class states every fact about itself as class attributes and classmethods, so that the config, the zoo table,
the LoRA defaults, the cache and the model loop over the registry (`blocks.py`) and never name a block:

    block_type       registry name, used in `config.block_types`             "gated_deltanet"
    pattern_letter   one capital letter for `config.block_pattern`           "G"
    layer_type       transformers' `layer_types` name: mask and cache layer  "linear_attention" (recurrent state)
    is_recurrent     True: `forward(x, state, mask=, reset=) -> (y, state)`; False: attention (KV cache)
    config_fields    its `HybridConfig` fields (`BlockField`: name, default, check, doc)
    validate_config  cross-field checks, run only when the model has this block
    lora_targets     sub-module names (relative to the block) that LoRA adapts by default
    state_formula    the state layout in words, for tables and model cards
    state_bytes      bytes of recurrent state per sequence (recurrent blocks)
    parameter_count  parameters of one block (default: counted on the meta device)
    cache_layer      the transformers cache layer that holds its state
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .cache_hybrid import RecurrentStateLayer


@dataclass(frozen=True)
class BlockField:
    """One `HybridConfig` field owned by a block.

    `check(value)` is True for allowed values and runs for every config (so a bad value is refused even when no layer
    uses the block); `requirement` completes the error message "`name` must ...". `default_from` names another config
    field whose value replaces a `None` default (e.g. a head count that defaults to `num_attention_heads`).
    """

    name: str
    default: Any
    doc: str
    check: Callable[[Any], bool] | None = None
    requirement: str = ""
    default_from: str | None = None

    def validate(self, value: Any) -> None:
        if self.check is not None and not self.check(value):
            raise ValueError(f"`{self.name}` {self.requirement}, got {value!r}.")


# value checks for `BlockField.check`
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def is_int_or_none(value: Any) -> bool:
    return value is None or is_int(value)


def is_positive_int_or_none(value: Any) -> bool:
    return value is None or is_positive_int(value)


def is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda value: value in choices


def require_positive_ints(config, names: list[str], block_type: str) -> None:
    """Cross-field helper: each named config field must be a positive integer when the model has `block_type`."""
    for name in names:
        value = getattr(config, name)
        if not is_positive_int(value):
            raise ValueError(f"`{name}` must be a positive integer for {block_type} blocks, got {value!r}.")


def require_divisible(
    config, width_name: str, heads_name: str, why: str = "the block-diagonal weights split it into equal heads"
) -> None:
    width, heads = getattr(config, width_name), getattr(config, heads_name)
    if width % heads != 0:
        raise ValueError(f"`{width_name}` ({width}) must be divisible by `{heads_name}` ({heads}): {why}.")


class HybridBlock(nn.Module):
    """Base class of every block (sequence mixer). See the module docstring for what a subclass declares."""

    block_type: ClassVar[str]
    pattern_letter: ClassVar[str]
    layer_type: ClassVar[str] = "linear_attention"  # transformers' name for "fixed-size recurrent state" layers
    is_recurrent: ClassVar[bool] = True
    config_fields: ClassVar[tuple[BlockField, ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]] = ()
    # modules PEFT cannot adapt by itself: hybridzoo's `recipes.peft_utils` brings its own LoRA layer for them
    lora_custom_targets: ClassVar[tuple[str, ...]] = ()
    state_formula: ClassVar[str] = ""

    @classmethod
    def validate_config(cls, config) -> None:
        """Checks across fields (head splits, ...), run only when `config.block_types` has this block."""

    @classmethod
    def state_bytes(cls, config, dtype_bytes: int) -> int:
        """Bytes of recurrent state per sequence (`dtype_bytes`: bytes per element of the model dtype)."""
        raise NotImplementedError(f"{cls.__name__} must define `state_bytes(config, dtype_bytes)`.")

    @classmethod
    def parameter_count(cls, config) -> int:
        """Parameters of one block, counted on the meta device (blocks may override with a closed form)."""
        with torch.device("meta"):
            block = cls(config, 0)
        return sum(p.numel() for p in block.parameters())

    @classmethod
    def cache_layer(cls, config):
        """The generation-cache layer holding this block's state (recurrent: the whole state tuple)."""
        return RecurrentStateLayer()

    @staticmethod
    def is_decode_step(
        hidden_states: torch.Tensor,
        state: tuple[torch.Tensor | None, ...] | None,
        mask: torch.Tensor | None,
        reset: torch.Tensor | None,
        float32: bool = True,
    ) -> bool:
        """True for the call a recurrent block's single-token fast path serves: one token continuing a cached state,
        no padding, no document start, autograd off, and (with `float32`) the input and every state tensor in
        float32, the dtype the fast paths' folded weights are derived for."""
        return (
            hidden_states.shape[1] == 1
            and state is not None
            and all(t is not None for t in state)
            and mask is None
            and reset is None
            and not torch.is_grad_enabled()
            and (not float32 or all(t.dtype == torch.float32 for t in (hidden_states, *state)))
        )


__all__ = [
    "BlockField",
    "HybridBlock",
    "is_bool",
    "is_int",
    "is_int_or_none",
    "is_positive_int",
    "is_positive_int_or_none",
    "is_positive_number",
    "one_of",
    "require_divisible",
    "require_positive_ints",
]

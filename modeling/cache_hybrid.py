"""The generation cache of a hybrid model: KV for attention layers, fixed-size state for recurrent ones.

Built on transformers' `Cache`, so `generate()`, beam search (`reorder_cache`) and the mask utilities work unchanged:
each block names its cache layer (`cache_layer`): attention gets transformers' own `DynamicLayer` /
`DynamicSlidingWindowLayer`, a recurrent block a `RecurrentStateLayer` holding whatever tuple of tensors the block
returns as its state (batch first).
The cache also counts the tokens it has seen, so models with no attention layer at all know their position.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

# transformers 5.24 renamed the cache, as a `forward` argument, a mask-function argument and a model-output field, from
# `past_key_values` to `cache` (the old name goes in 5.40). `CACHE_NAME` is the installed version's name; our models
# take the cache as `cache` on every version and accept `past_key_values` too (`accepts_past_key_values`).
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"


def accepts_past_key_values(forward: Callable) -> Callable:
    """Let a `forward(..., cache=...)` also be called with `past_key_values=` (what `generate()` passes before 5.24).

    Where transformers has the new name, the old one gets transformers' own deprecation notice, as its models give.
    """
    if CACHE_NAME == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def forward_with_old_name(*args, **kwargs):
        old = kwargs.pop("past_key_values", None)
        if old is not None:
            if kwargs.get("cache") not in (None, old):
                raise ValueError("Pass the cache once: as `cache` or as `past_key_values`, not both.")
            kwargs["cache"] = old
        return forward(*args, **kwargs)

    return forward_with_old_name


class RecurrentStateLayer(LinearAttentionCacheLayerMixin):
    """One recurrent block's state: a tuple of batch-first tensors, replaced whole at every forward."""

    is_compileable = False

    def __init__(self) -> None:
        super().__init__(number_of_states=0)

    def lazy_initialization(self, *args, **kwargs) -> None:  # state tensors arrive whole; nothing to pre-allocate
        return None

    def update_conv_state(self, conv_states: torch.Tensor, state_idx: int = 0) -> torch.Tensor:
        raise NotImplementedError("hybridzoo blocks store their whole state with `set_state`")

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0) -> torch.Tensor:
        raise NotImplementedError("hybridzoo blocks store their whole state with `set_state`")

    def get_state(self) -> tuple[torch.Tensor, ...] | None:
        if not self.number_of_states:
            return None
        return tuple(self.recurrent_states.values())  # keys 0 .. n-1, in order

    def set_state(self, state: tuple[torch.Tensor, ...]) -> None:
        if self.number_of_states != len(state):
            super().__init__(number_of_states=len(state))
        states = self.recurrent_states
        for i, tensor in enumerate(state):
            states[i] = tensor
        if not self.has_previous_state[0] or self.device != state[0].device:  # first state, or after reset / a move
            for i in range(len(state)):
                self.is_recurrent_states_initialized[i] = True
                self.has_previous_state[i] = True
            self.device = state[0].device
        self.dtype = state[0].dtype

    def _map_states(self, fn) -> None:
        for i in range(self.number_of_states):
            self.recurrent_states[i] = fn(self.recurrent_states[i])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_states(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_states(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_states(lambda s: s[indices, ...])

    def reset(self) -> None:
        self._map_states(torch.zeros_like)

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(
            "A recurrent state cannot be rolled back: hybridzoo caches do not support `crop` "
            "(assisted/speculative decoding)."
        )

    @property
    def batch_size(self) -> int:
        return self.recurrent_states[0].shape[0]


class HybridCache(Cache):
    """Cache for `HybridModel`: one layer per model layer, the one its block asks for (`block.cache_layer`).

    Not `DynamicCache(config=...)`: its linear-attention layers hold one conv + one recurrent tensor per slot with the
    same slot count in every layer, while our blocks keep 1 to 5 state tensors of their own shapes, and it counts
    tokens through attention layers only (an attention-free model has none). The layers themselves are transformers'.
    """

    def __init__(self, config) -> None:
        super().__init__(layers=[block.cache_layer(config) for block in config.block_classes])
        self.seen_tokens = 0

    def get_block_state(self, layer_idx: int) -> tuple[torch.Tensor, ...] | None:
        return self.layers[layer_idx].get_state()

    def set_block_state(self, layer_idx: int, state: tuple[torch.Tensor, ...]) -> None:
        self.layers[layer_idx].set_state(state)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # every layer has seen the same tokens; counting them also works without any attention layer
        return self.seen_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(
            "A recurrent state cannot be rolled back: hybridzoo caches do not support `crop` "
            "(assisted/speculative decoding)."
        )

    @property
    def is_compileable(self) -> bool:
        return False

    def state_bytes(self) -> dict[str, int]:
        """Bytes held right now: `{"recurrent": fixed-size states, "kv": attention keys and values}`."""
        recurrent = kv = 0
        for layer in self.layers:
            if isinstance(layer, RecurrentStateLayer):
                recurrent += sum(s.numel() * s.element_size() for s in (layer.get_state() or ()))
            elif getattr(layer, "keys", None) is not None:
                kv += (
                    layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                )
        return {"recurrent": recurrent, "kv": kv}

"""Causal depthwise short convolution with a carried state (pure functions over tensors).

Gated DeltaNet, Mamba and Griffin put a width-K causal depthwise convolution in front of their recurrence. It is written
as K shifted multiply-adds rather than `F.conv1d`: K is tiny (2-4), it keeps the `[B, T, C]` layout (no transposes), and
it makes document resets exact — a tap that would reach back across a document start is simply dropped.
"""

from __future__ import annotations

import torch


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution over time, continuing from `state`.

    Args:
        x: `[B, T, C]` inputs.
        weight: `[C, K]` taps; `weight[:, -1]` multiplies the current token, `weight[:, -1 - s]` the one `s` back.
        state: `[B, K - 1, C]` the last K - 1 real inputs seen so far, or None for a fresh sequence (zeros).
        mask: `[B, T]` bool, False at padding. A padded step is an identity transition: real tokens see the real
            tokens before them as if the padding were not there, and the state skips it. Outputs at pads are undefined.
        reset: `[B, T]` bool, True where a new document starts: taps reaching back before that token see zeros.

    Returns:
        `y` `[B, T, C]` (no activation applied) and the new state `[B, K - 1, C]`.
    """
    batch, length, channels = x.shape
    width = weight.shape[-1]
    if state is None:
        state = x.new_zeros(batch, width - 1, channels)
    history = torch.cat([state.to(x.dtype), x], dim=1)  # [B, K-1+T, C]
    starts = None
    if reset is not None:
        starts = torch.cat([reset.new_zeros(batch, width - 1), reset], dim=1)
    inverse = None
    if mask is not None:
        # Stable-sort the padding in front of the carried state: every real token then directly follows the real
        # tokens before it, which is exactly "padding is not there". Undo the permutation on the way out.
        is_real = torch.cat([mask.new_ones(batch, width - 1), mask], dim=1).to(torch.int8)
        order = torch.argsort(is_real, dim=1, stable=True)
        inverse = torch.argsort(order, dim=1)
        history = history.gather(1, order.unsqueeze(-1).expand(-1, -1, channels))
        if starts is not None:
            starts = starts.gather(1, order)
        # the first K - 1 outputs of the sorted sequence may be real tokens now: give them a zero history
        history = torch.cat([history.new_zeros(batch, width - 1, channels), history], dim=1)
        if starts is not None:
            starts = torch.cat([starts.new_zeros(batch, width - 1), starts], dim=1)
    out_length = history.shape[1] - (width - 1)

    y = history[:, width - 1 :] * weight[:, -1]
    if starts is not None:
        segment = starts.long().cumsum(dim=1)
        current_segment = segment[:, width - 1 :]
    for shift in range(1, width):
        tap = history[:, width - 1 - shift : width - 1 - shift + out_length]
        if starts is not None:
            same_document = segment[:, width - 1 - shift : width - 1 - shift + out_length] == current_segment
            tap = tap * same_document.unsqueeze(-1).to(tap.dtype)
        y = y + tap * weight[:, -1 - shift]

    # a copy: a view would keep the whole `history` (the prompt) alive in the cache
    new_state = history[:, history.shape[1] - (width - 1) :].clone()
    if starts is not None and width > 1:
        # a document that started within the last K - 1 positions must not see older inputs at the next call
        keep = segment[:, segment.shape[1] - (width - 1) :] == segment[:, -1:]
        new_state = new_state * keep.unsqueeze(-1).to(new_state.dtype)
    if inverse is not None:
        # y covers the sorted sequence of state + tokens; pick each original token's output back
        y = y.gather(1, inverse[:, width - 1 :].unsqueeze(-1).expand(-1, -1, channels))
    return y, new_state

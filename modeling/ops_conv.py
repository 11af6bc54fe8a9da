"""Causal depthwise short convolution with a carried state (pure functions over tensors).

Gated DeltaNet, Mamba and Griffin put a width-K causal depthwise convolution in front of their recurrence. It is written
as K shifted multiply-adds rather than `F.conv1d`: K is tiny (2-4), it keeps the `[B, T, C]` layout (no transposes), and
it makes document resets exact — a tap that would reach back across a document start is simply dropped. The backward
is written by hand (`_ShortConv`): autograd through K shifted slices would zero-fill a full-length gradient per tap.
"""

from __future__ import annotations

import torch


def _shifted(history: torch.Tensor, shift: int, width: int, length: int) -> torch.Tensor:
    """The inputs `shift` tokens before each of the `length` outputs: a view into `history` `[B, K-1+T, C]`."""
    return history[:, width - 1 - shift : width - 1 - shift + length]


def _conv(history: torch.Tensor, weight: torch.Tensor, keeps: list[torch.Tensor] | None) -> torch.Tensor:
    """y_t = sum_s weight[:, K-1-s] * history_{t+K-1-s} * keep_s[t]  over a `[B, K-1+T, C]` history (state, then the
    tokens); `keeps[s - 1]` `[B, T, 1]` zeroes a tap that reaches back into an earlier document (None: keep all)."""
    width = weight.shape[-1]
    length = history.shape[1] - (width - 1)
    y = _shifted(history, 0, width, length) * weight[:, -1]
    for shift in range(1, width):
        tap = _shifted(history, shift, width, length)
        if keeps is not None:
            tap = tap * keeps[shift - 1]
        y.addcmul_(tap, weight[:, -1 - shift])
    return y


def _weight_grad(
    history: torch.Tensor, grad_y: torch.Tensor, keeps: list[torch.Tensor] | None, width: int, rows: int = 256
) -> torch.Tensor:
    """`[C, K]`: grad_weight[:, K-1-s] = sum over rows and time of grad_y * (tap s back). Reduced over blocks of
    `rows` tokens: the products then stay in cache instead of one fresh full-size temporary per tap (~2x faster)."""
    batch, length, channels = grad_y.shape
    grad_weight = torch.zeros(width, channels, dtype=grad_y.dtype, device=grad_y.device)
    step = max(1, rows // batch)
    for start in range(0, length, step):
        block = grad_y[:, start : start + step]
        end = start + block.shape[1]
        for shift in range(width):
            tap = history[:, width - 1 - shift + start : width - 1 - shift + end]
            if keeps is not None and shift > 0:
                tap = tap * keeps[shift - 1][:, start:end]
            grad_weight[width - 1 - shift] += (block * tap).sum((0, 1)) if batch > 1 else torch.linalg.vecdot(
                block[0].mT, tap[0].mT
            )
    return grad_weight.mT


class _ShortConv(torch.autograd.Function):
    """`_conv` with its backward written out: each tap's gradient is added into one preallocated history gradient."""

    @staticmethod
    def forward(ctx, history, weight, keeps):
        y = _conv(history, weight, keeps)
        ctx.save_for_backward(history, weight)
        ctx.keeps = keeps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        history, weight = ctx.saved_tensors
        keeps = ctx.keeps
        width = weight.shape[-1]
        length = grad_y.shape[1]
        grad_history = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_history = history.new_empty(history.shape, dtype=grad_y.dtype)
            # copy then scale in place (no full-size temporary; `out=` into a strided view would stop torch.compile)
            grad_history[:, width - 1 :].copy_(grad_y).mul_(weight[:, -1])
            grad_history[:, : width - 1].zero_()  # only the K - 1 state rows; the rest is written by the first tap
            for shift in range(1, width):
                grad_tap = grad_y if keeps is None else grad_y * keeps[shift - 1]
                _shifted(grad_history, shift, width, length).addcmul_(grad_tap, weight[:, -1 - shift])
            grad_history = grad_history.to(history.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(history, grad_y, keeps, width).to(weight.dtype)
        return grad_history, grad_weight, None


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

    keeps = None
    if starts is not None:
        segment = starts.long().cumsum(dim=1)
        current_segment = segment[:, width - 1 :]
        keeps = [
            (_shifted(segment[..., None], shift, width, out_length) == current_segment[..., None]).to(x.dtype)
            for shift in range(1, width)
        ]
    if torch.is_grad_enabled() and (history.requires_grad or weight.requires_grad):
        y = _ShortConv.apply(history, weight, keeps)
    else:
        y = _conv(history, weight, keeps)

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

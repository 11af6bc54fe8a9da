"""Causal depthwise short convolution with a carried state (pure functions over tensors).

Gated DeltaNet, Mamba-2, Griffin, sLSTM and ParaRNN put a width-K causal depthwise convolution (often followed by a bias
and SiLU) in front of their recurrence. It is written as K shifted multiply-adds rather than `F.conv1d`: K is tiny
(2-4), it keeps the `[B, T, C]` layout (no transposes), and it makes document resets exact — a tap that would reach back
across a document start is simply dropped.

Forward and backward (`_ShortConv`, written by hand) walk over blocks of rows small enough to stay in cache, doing every
tap, the bias and the activation on a block before moving on: whole-tensor passes, one per tap, re-read the input from
memory each time (conv + SiLU forward and backward at T=2048, C=1024: ~19 -> ~7 ms on one CPU thread). The backward
recomputes the pre-activation per block instead of keeping it, so the activation costs no saved tensor.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .ops_blocks import cache_blocks

# batch x rows x channels of one block: 1 MiB of float32 (L2-sized; measured fastest among 64k-512k elements)
BLOCK_ELEMENTS = 1 << 18
ACTIVATIONS = (None, "silu")


def _blocks(shape: torch.Size) -> list[tuple[int, int]]:
    """Row ranges `[start, end)` covering `shape` `[B, T, C]`, about `BLOCK_ELEMENTS` elements each."""
    batch, length, channels = shape
    return cache_blocks(length, batch * channels, BLOCK_ELEMENTS)


def _tap(
    history: torch.Tensor, lead: int, keeps: list[torch.Tensor] | None, shift: int, start: int, end: int
) -> tuple[int, torch.Tensor | None]:
    """What tap `shift` (tokens back) reads for output rows `[start, end)`: `(skip, rows)`, the first `skip` outputs
    reaching before the history (they read zeros) and the history rows of the others, zeroed by `keeps[shift - 1]`
    where they cross into an earlier document; rows is None when every output reaches before the history."""
    skip = max(0, shift - lead - start)
    if skip >= end - start:
        return skip, None
    rows = history[:, lead + start + skip - shift : lead + end - shift]
    if keeps is not None and shift > 0:
        rows = rows * keeps[shift - 1][:, start + skip : end]
    return skip, rows


def _preactivation(
    history: torch.Tensor,
    lead: int,
    taps: torch.Tensor,
    bias: torch.Tensor | None,
    keeps: list[torch.Tensor] | None,
    start: int,
    end: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conv (+ bias) of output rows `[start, end)`, written into `out` when given, else a new tensor.

    y[t] = sum_s taps[K-1-s] * history[lead + t - s] (+ bias), with `taps` `[K, C]` (the weight transposed):
    `history` `[B, lead + T, C]` holds `lead` carried rows, then the tokens; taps reaching before its first row read
    zeros; `keeps[s - 1]` `[B, T, 1]` zeroes tap s where it crosses into an earlier document (None: keep all).
    """
    width = taps.shape[0]
    current = _tap(history, lead, keeps, 0, start, end)[1]
    out = current * taps[-1] if out is None else out.copy_(current).mul_(taps[-1])
    for shift in range(1, width):
        skip, tap = _tap(history, lead, keeps, shift, start, end)
        if tap is not None:
            (out[:, skip:] if skip else out).addcmul_(tap, taps[-1 - shift])
    if bias is not None:
        out.add_(bias)
    return out


def _short_conv(
    history: torch.Tensor,
    lead: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keeps: list[torch.Tensor] | None,
    activation: str | None,
) -> torch.Tensor:
    """y = act(conv(history) + bias) for the `T` rows after the `lead` carried ones, block by block."""
    batch, rows, channels = history.shape
    dtype = torch.promote_types(history.dtype, weight.dtype)  # as `history * weight` would give
    taps = (weight if weight.dtype == dtype else weight.to(dtype)).t()  # [K, C]
    if rows - lead > 16:
        taps = taps.contiguous()  # a contiguous row per tap: broadcasting it is ~3x faster than a strided column
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if batch * (rows - lead) * channels <= BLOCK_ELEMENTS:
        # one block (short inputs, decoding): no preallocated output to copy into, the fewest small ops per token
        y = _preactivation(history, lead, taps, bias, keeps, 0, rows - lead)
        return F.silu(y, inplace=True) if activation == "silu" else y
    y = history.new_empty(batch, rows - lead, channels, dtype=dtype)
    for start, end in _blocks(y.shape):
        block = _preactivation(history, lead, taps, bias, keeps, start, end, out=y[:, start:end])
        if activation == "silu":
            F.silu(block, inplace=True)
    return y


class _ShortConv(torch.autograd.Function):
    """`_short_conv` with the backward written out the same way, block by block."""

    @staticmethod
    def forward(ctx, history, lead, weight, bias, keeps, activation):
        y = _short_conv(history, lead, weight, bias, keeps, activation)
        ctx.save_for_backward(history, weight, bias)
        ctx.lead, ctx.keeps, ctx.activation = lead, keeps, activation
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        history, weight, bias = ctx.saved_tensors
        lead, keeps = ctx.lead, ctx.keeps
        width, length = weight.shape[-1], grad_y.shape[1]
        taps = weight.to(grad_y.dtype).t().contiguous()
        bias_ = None if bias is None else bias.to(grad_y.dtype)
        blocks = _blocks(grad_y.shape)
        # the gradient w.r.t. the pre-activation, the weight and the bias, one block at a time
        grad_pre = grad_y if ctx.activation is None else torch.empty_like(grad_y, memory_format=torch.contiguous_format)
        rows = blocks[0][1]
        products = None
        if ctx.needs_input_grad[2]:  # per-tap sums of grad * input, over blocks in float32 at least (not bf16)
            sum_dtype = torch.promote_types(grad_y.dtype, torch.float32)
            products = grad_y.new_zeros(width, grad_y.shape[0], rows, grad_y.shape[2], dtype=sum_dtype)
        scratch = grad_y.new_empty(grad_y.shape[0], rows, grad_y.shape[2]) if ctx.activation is not None else None
        for start, end in blocks:
            n = end - start
            if ctx.activation == "silu":
                pre = _preactivation(history, lead, taps, bias_, keeps, start, end, out=scratch[:, :n])
                torch.ops.aten.silu_backward.grad_input(grad_y[:, start:end], pre, grad_input=grad_pre[:, start:end])
            block = grad_pre[:, start:end]
            for shift in range(width if products is not None else 0):
                skip, tap = _tap(history, lead, keeps, shift, start, end)
                if tap is not None:
                    products[width - 1 - shift, :, skip:n].addcmul_(block[:, skip:], tap)
        grad_weight = None if products is None else products.sum((1, 2)).t().to(weight.dtype)
        grad_bias = grad_pre.sum((0, 1)).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None

        grad_history = None
        if ctx.needs_input_grad[0]:
            # history row lead + u receives grad_pre[u + s] * taps[K-1-s] for every tap s with 0 <= u + s < T
            grad_history = grad_y.new_empty(history.shape)
            ranges = ([(-lead, 0)] if lead else []) + blocks  # the carried rows first, when there are any
            for start, end in ranges:
                out = grad_history[:, lead + start : lead + end]
                if start >= 0:
                    out.copy_(grad_pre[:, start:end]).mul_(taps[-1])
                else:
                    out.zero_()
                for shift in range(1, width):
                    first, last = max(start + shift, 0), min(end + shift, length)  # grad_pre rows that reach back here
                    if first >= last:
                        continue
                    grad = grad_pre[:, first:last]
                    if keeps is not None:
                        grad = grad * keeps[shift - 1][:, first:last]
                    out[:, first - shift - start : last - shift - start].addcmul_(grad, taps[-1 - shift])
            grad_history = grad_history.to(history.dtype)
        return grad_history, None, grad_weight, grad_bias, None, None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution over time, continuing from `state`, optionally followed by a bias and SiLU.

    Args:
        x: `[B, T, C]` inputs.
        weight: `[C, K]` taps; `weight[:, -1]` multiplies the current token, `weight[:, -1 - s]` the one `s` back.
        state: `[B, K - 1, C]` the last K - 1 real inputs seen so far, or None for a fresh sequence (zeros).
        mask: `[B, T]` bool, False at padding. A padded step is an identity transition: real tokens see the real
            tokens before them as if the padding were not there, and the state skips it. Outputs at pads are undefined.
        reset: `[B, T]` bool, True where a new document starts: taps reaching back before that token see zeros
            (a reset at a padded position is ignored: pass `reset & mask`).
        bias: `[C]` added after the convolution, or None.
        activation: None, or "silu" applied after the bias (fused: no separate pass, nothing extra saved).

    Returns:
        `y` `[B, T, C]` and the new state `[B, K - 1, C]` (the raw inputs, before the convolution).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {ACTIVATIONS}")
    batch, length, channels = x.shape
    width = weight.shape[-1]
    if length == 0:  # nothing to convolve; the state passes through
        new_state = x.new_zeros(batch, width - 1, channels) if state is None else state.to(x.dtype)
        return x.new_empty(batch, 0, channels), new_state
    # the tokens, after the carried state when there is one (a fresh sequence reads zeros before its start)
    history = x if state is None else torch.cat([state.to(x.dtype), x], dim=1)
    lead = 0 if state is None else width - 1
    starts = None
    if reset is not None:
        starts = torch.cat([reset.new_zeros(batch, width - 1), reset], dim=1)  # over [state, tokens]
    inverse = None
    if mask is not None:
        # Stable-sort the padding in front of the carried state: every real token then directly follows the real
        # tokens before it, which is exactly "padding is not there". Undo the permutation on the way out. The sorted
        # sequence of state + tokens is convolved from its first row (pads sorted there still get an output to gather
        # back), reading zeros before it.
        if state is None:
            history = torch.cat([x.new_zeros(batch, width - 1, channels), x], dim=1)
        is_real = torch.cat([mask.new_ones(batch, width - 1), mask], dim=1).to(torch.int8)
        order = torch.argsort(is_real, dim=1, stable=True)
        inverse = torch.argsort(order, dim=1)
        history, lead = history.gather(1, order.unsqueeze(-1).expand(-1, -1, channels)), 0
        if starts is not None:
            starts = torch.cat([starts.new_zeros(batch, width - 1), starts.gather(1, order)], dim=1)
    out_length = history.shape[1] - lead

    keeps = segment = None
    if starts is not None:
        segment = starts.long().cumsum(dim=1)  # covers K - 1 rows before the first output row
        current_segment = segment[:, width - 1 :]
        keeps = [
            (segment[:, width - 1 - shift : width - 1 - shift + out_length, None] == current_segment[..., None]).to(
                x.dtype
            )
            for shift in range(1, width)
        ]
    if torch.is_grad_enabled() and (
        history.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        y = _ShortConv.apply(history, lead, weight, bias, keeps, activation)
    else:
        y = _short_conv(history, lead, weight, bias, keeps, activation)

    # the last K - 1 inputs, zeros first if there were fewer; a copy: a view would keep the prompt alive in the cache
    if history.shape[1] >= width - 1:
        new_state = history[:, history.shape[1] - (width - 1) :].clone()
    else:
        new_state = torch.cat([history.new_zeros(batch, width - 1 - history.shape[1], channels), history], dim=1)
    if starts is not None and width > 1:
        # a document that started within the last K - 1 positions must not see older inputs at the next call
        keep = segment[:, segment.shape[1] - (width - 1) :] == segment[:, -1:]
        new_state = new_state * keep.unsqueeze(-1).to(new_state.dtype)
    if inverse is not None:
        # y covers the sorted sequence of state + tokens; pick each original token's output back
        y = y.gather(1, inverse[:, width - 1 :].unsqueeze(-1).expand(-1, -1, channels))
    return y, new_state

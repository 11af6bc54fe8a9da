"""The LM head and its cross-entropy fused, chunk by chunk over tokens: the full `[T, V]` logits never exist.

A causal LM's training loss is `cross_entropy(h W^T, labels)`. At 8k tokens and a 32k vocabulary the fp32 logits are
1 GB, written by the head, read and written again by log-softmax, its backward and the head's backward. Here the
tokens are processed in chunks of a few hundred: a chunk's logits are turned into their log-softmax, its loss is
summed, and because the loss is a scalar the gradient of the chunk's logits (`softmax - onehot`) is known at once, so
the two backward GEMMs (`dh = dlogits W`, `dW += dlogits^T h`) also run during the forward, with the loss's
`1 / denominator` as their `alpha`. The backward then only scales the stored `dh`, `dW` by the incoming scalar
gradient, and hands them on untouched when it is 1 (`loss.backward()`): `dW` is `[V, H]`, a whole-tensor pass and
fresh memory per step otherwise. Same three GEMMs as the plain path, a chunk of logits in memory instead of all of
them. Ignored tokens (`ignore_index`) are dropped before the head and cost nothing.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["chunked_linear_cross_entropy", "shift_labels_for_causal_lm"]

# tokens per chunk: 256 x 32k fp32 logits are 32 MiB; measured fastest of 128-2048 on CPU (hidden 256, vocab 32000)
DEFAULT_CHUNK_TOKENS = 256


def shift_labels_for_causal_lm(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """`labels[..., 1:]` padded with `ignore_index` at the end: the output at t predicts label t + 1 (transformers'
    `ForCausalLMLoss` convention)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


def _loss_sum_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int,
    need_grads: bool,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Summed cross-entropy of `hidden @ weight^T (+ bias)` against `targets` (none ignored), and if `need_grads` the
    gradients of `grad_scale` times that sum w.r.t. hidden (its dtype), weight and bias (float32). One dtype for all
    inputs."""
    # float32 softmax and accumulators (float64 for float64 inputs), whatever the GEMMs' dtype
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    grad_hidden = grad_weight = grad_bias = None
    if need_grads:
        grad_hidden = torch.empty_like(hidden)
        # in full precision the first chunk's GEMM writes it (beta = 0) and the others accumulate into it
        written = hidden.dtype == acc and hidden.shape[0] > 0
        grad_weight = (torch.empty if written else torch.zeros)(weight.shape, dtype=acc, device=weight.device)
        if bias is not None:
            grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device)
    # one logits and one log-prob buffer for every chunk: a fresh [chunk, V] tensor per chunk is fresh memory from the
    # system each time (tens of MB, page-faulted in while the GEMM writes it), and those faults do not parallelise
    buffers = None
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk]
        t = targets[start : start + chunk, None]
        if hidden.dtype == acc:
            if buffers is None:
                rows = min(chunk, hidden.shape[0])
                buffers = (hidden.new_empty(rows, weight.shape[0]), hidden.new_empty(rows, weight.shape[0]))
            logits, log_probs = buffers[0][: h.shape[0]], buffers[1][: h.shape[0]]
            if bias is None:
                torch.mm(h, weight.t(), out=logits)
            else:
                torch.addmm(bias, h, weight.t(), out=logits)
            log_probs = torch.log_softmax(logits, dim=-1, out=log_probs)
        else:
            log_probs = torch.log_softmax(F.linear(h, weight, bias).to(acc), dim=-1)
        picked = log_probs.gather(1, t)
        loss -= picked.sum()
        if not need_grads:
            continue
        # d(-log_softmax(x)[t]) / dx = softmax(x) - onehot(t)
        grad_logits = log_probs.exp_().scatter_add_(1, t, torch.full_like(picked, -1.0))
        if grad_bias is not None:
            grad_bias.add_(grad_logits.sum(0), alpha=grad_scale)
        rows = grad_hidden[start : start + chunk]
        if hidden.dtype == acc:
            torch.addmm(rows, grad_logits, weight, beta=0.0, alpha=grad_scale, out=rows)
            grad_weight.addmm_(grad_logits.mT, h, beta=float(start > 0), alpha=grad_scale)
        else:  # low-precision GEMMs like the plain path's, accumulated in float32
            grad_logits = grad_logits.to(hidden.dtype)
            torch.addmm(rows, grad_logits, weight, beta=0.0, alpha=grad_scale, out=rows)
            grad_weight.add_(torch.mm(grad_logits.mT, h), alpha=grad_scale)
    return loss, grad_hidden, grad_weight, grad_bias


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss in the forward; the gradients are computed there too (the loss is a scalar) and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, denominator, chunk):
        # the mean's 1 / denominator goes into the gradient GEMMs (no later pass over them); a host value already:
        # finding the non-ignored labels synchronised with the device
        count = denominator.item()
        grad_scale = 1.0 / count if count else float("inf")  # no items: 0 / 0, as the plain path's mean
        loss_sum, grad_hidden, grad_weight, grad_bias = _loss_sum_and_grads(
            hidden, weight, bias, targets, chunk, need_grads=True, grad_scale=grad_scale
        )
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtype = weight.dtype
        return loss_sum / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # `loss.backward()`: the stored gradients are the answer (autograd copies them if the graph is kept)
        unscaled = bool(grad_loss == 1)
        grads = []
        for stored, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], strict=True):
            if stored is None or not needed:
                grads.append(None)
            elif unscaled:
                grads.append(stored.to(ctx.dtype))
            else:
                grads.append((stored * grad_loss.to(stored.dtype)).to(ctx.dtype))
        return *grads, None, None, None


def chunked_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden_states, weight, bias).float().flatten(0, -2), labels.flatten())` without the
    full logits; the same loss and gradients (w.r.t. hidden_states, weight, bias) up to float32 rounding.

    Args:
        hidden_states: `[..., H]` the final hidden states (already aligned with `labels`: shift before calling, see
            `shift_labels_for_causal_lm`).
        weight: `[V, H]` the LM head's weight; bias: `[V]` or None.
        labels: `[...]` target token ids, `ignore_index` where no loss is taken.
        num_items_in_batch: if given, the summed loss is divided by it (transformers' gradient-accumulation
            convention); otherwise by the number of non-ignored labels (mean, NaN if there are none, like
            `F.cross_entropy`).
        chunk_tokens: tokens per chunk (memory ~ chunk_tokens x V floats).

    Returns:
        The scalar loss (float32; float64 for float64 inputs).
    """
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must have the shape of hidden_states without its last dim: got labels {tuple(labels.shape)} "
            f"for hidden_states {tuple(hidden_states.shape)}"
        )
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat_labels = labels.reshape(-1).to(hidden.device)
    valid = (flat_labels != ignore_index).nonzero().squeeze(-1)
    if valid.numel() < flat_labels.numel():
        hidden, flat_labels = hidden.index_select(0, valid), flat_labels.index_select(0, valid)
    if num_items_in_batch is None:
        num_items_in_batch = valid.numel()
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).to(acc)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden_states, weight, bias)
    )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # the head's GEMMs in the autocast dtype, as `lm_head(h)` would run them; log-softmax in float32 either way
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif weight.dtype != hidden.dtype:
        raise TypeError(f"hidden_states ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    with torch.autocast(device_type, enabled=False):
        if not needs_grad:
            loss_sum = _loss_sum_and_grads(hidden, weight, bias, flat_labels, chunk_tokens, need_grads=False)[0]
            return loss_sum / denominator
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, flat_labels, denominator, chunk_tokens)

"""Per-head normalisations with hand-written, cache-blocked backward passes (pure functions over tensors).

Autograd through an RMSNorm or an L2 normalisation runs a dozen whole-tensor passes (square, mean, rsqrt, products,
and as many again backward), each re-reading its operands from memory; on CPU that, not arithmetic, is their cost.
Here forward and backward walk over blocks of time steps small enough to stay in cache, and only the per-row scale is
kept between them. Inputs are `[B, T, ..., D]`, normalised over the last dim.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .ops_blocks import cache_blocks

# elements of one block of rows (512 KiB of float32, this CPU's L2; measured fastest among 2^14-2^18)
BLOCK_ELEMENTS = 1 << 17


def _blocks(x: torch.Tensor) -> list[tuple[int, int]]:
    """Ranges `[start, end)` over dim 1 (time) of `x` `[B, T, ...]`, each about `BLOCK_ELEMENTS` elements."""
    return cache_blocks(x.shape[1], x.numel() // max(1, x.shape[1]), BLOCK_ELEMENTS)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over the last dim, kept as a size-1 dim."""
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


def scaled_unit_rows(x: torch.Tensor, scale: torch.Tensor | None, eps_root: torch.Tensor) -> torch.Tensor:
    """`scale * x / hypot(|x|, eps_root)` over the last dim (`scale` None: 1), for inference (no autograd): three
    dispatched ops.

    RMSNorm is this with `scale = weight * sqrt(D)` and `eps_root = sqrt(D * eps)`, since
    `x / sqrt(mean(x^2) + eps) = sqrt(D) x / sqrt(|x|^2 + D eps)` (a caller may fold `sqrt(D) weight` into the next
    product instead); the L2 normalisation with `scale = 1` and `eps_root = sqrt(eps)`. `F.rms_norm` is a CPU
    composite of about six ops: for one decoded token of width 64 this runs in 5.8 instead of 10.5 us (2-core AMD
    EPYC, 1 thread), and it equals the plain formula within fp32 rounding.
    """
    norms = torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), eps_root)
    return torch.div(x, norms) if scale is None else torch.mul(x, scale).div_(norms)


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        y, scale = torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(*x.shape[:-1], 1)
        for start, end in _blocks(x):
            block = x[:, start:end]
            rows = torch.rsqrt(_row_dot(block, block).add_(eps), out=scale[:, start:end])
            torch.mul(block, rows, out=y[:, start:end])
        ctx.save_for_backward(x, scale)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        # y = x r with r = (|x|^2 + eps)^-1/2:  dx = r g - x r^3 (g . x)
        x, scale = ctx.saved_tensors
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        for start, end in _blocks(x):
            block, grad, rows = x[:, start:end], grad_y[:, start:end], scale[:, start:end]
            out = torch.mul(grad, rows, out=grad_x[:, start:end])
            out.addcmul_(block, _row_dot(grad, block).mul_(rows.pow(3)), value=-1)
        return grad_x, None


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`x / sqrt(|x|^2 + eps)` over the last dim of `x` `[B, T, ..., D]` (the same function as the plain formula)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _L2Normalize.apply(x, eps)
    return x * torch.rsqrt(_row_dot(x, x) + eps)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, weight, eps):
        width = x.shape[-1]
        y, scale = torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(*x.shape[:-1], 1)
        for start, end in _blocks(x):
            block = x[:, start:end]
            rows = torch.rsqrt(_row_dot(block, block).div_(width).add_(eps), out=scale[:, start:end])
            out = torch.mul(block, rows, out=y[:, start:end]).mul_(weight)
            out.mul_(F.silu(gate[:, start:end]))
        ctx.save_for_backward(x, gate, weight, scale)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        # y = n w s with n = x r, r = (mean(x^2) + eps)^-1/2, s = silu(gate):
        #   dgate = silu'(gate) g n w;  dw = sum g s n;  dn = g s w;  dx = r (dn - n mean(dn n))
        x, gate, weight, scale = ctx.saved_tensors
        width = x.shape[-1]
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        grad_gate = torch.empty_like(gate, memory_format=torch.contiguous_format)
        weight_products = None
        for start, end in _blocks(x):
            block, grad, rows = x[:, start:end], grad_y[:, start:end], scale[:, start:end]
            normed = block * rows
            gated_grad = grad * F.silu(gate[:, start:end])
            if weight_products is None:  # [B, steps, ..., D] partial sums of dw, float32 at least across blocks
                weight_products = (gated_grad * normed).to(torch.promote_types(x.dtype, torch.float32))
            else:
                weight_products[:, : end - start].addcmul_(gated_grad, normed)
            grad_gate_input = (grad * normed).mul_(weight)
            torch.ops.aten.silu_backward.grad_input(
                grad_gate_input, gate[:, start:end], grad_input=grad_gate[:, start:end]
            )
            grad_normed = gated_grad.mul_(weight)
            coefficient = _row_dot(grad_normed, normed).mul_(-1.0 / width)
            torch.addcmul(grad_normed, normed, coefficient, out=grad_x[:, start:end]).mul_(rows)
        grad_weight = weight_products.reshape(-1, width).sum(0).to(weight.dtype)
        return grad_x, grad_gate, grad_weight, None


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`weight * x / rms(x) * silu(gate)` over the last dim of `x`, `gate` `[B, T, ..., D]` (Gated DeltaNet's output
    norm), in the inputs' dtype."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate, weight)):
        return _GatedRMSNorm.apply(x, gate, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps) * F.silu(gate)

"""The cache-blocked normalisations against their plain formulas through autograd."""

import pytest
import torch
from torch.nn import functional as F

from hybridzoo.modeling import ops_norm
from hybridzoo.modeling.layers import HybridRMSNorm, HybridRMSNormGated
from tiny_models import assert_all_close, random_linear_grads


def plain_l2_normalize(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def plain_gated_rms_norm(x, gate, weight, eps=1e-6):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * F.silu(gate)


def _split_inputs(batch=3, length=37, heads=4, dim=8):
    """Two `[B, T, H, D]` halves of one wider tensor, as the block's projections give them (strided, not copies)."""
    whole = torch.randn(batch, length, 2 * heads * dim, dtype=torch.float64, requires_grad=True)
    first, second = whole.split(heads * dim, dim=-1)
    return whole, first.unflatten(-1, (heads, dim)), second.unflatten(-1, (heads, dim))


@pytest.mark.parametrize("block_elements", [1, 100, ops_norm.BLOCK_ELEMENTS])  # one step per block, a few, all
def test_l2_normalize_matches_the_formula(monkeypatch, block_elements):
    monkeypatch.setattr(ops_norm, "BLOCK_ELEMENTS", block_elements)
    whole, x, _ = _split_inputs()
    y = ops_norm.l2_normalize(x)
    expected = plain_l2_normalize(x)
    torch.testing.assert_close(y, expected)
    assert_all_close(random_linear_grads([y], [whole]), random_linear_grads([expected], [whole]))
    with torch.no_grad():
        torch.testing.assert_close(ops_norm.l2_normalize(x), expected)


@pytest.mark.parametrize("block_elements", [1, 100, ops_norm.BLOCK_ELEMENTS])
def test_gated_rms_norm_matches_the_formula(monkeypatch, block_elements):
    monkeypatch.setattr(ops_norm, "BLOCK_ELEMENTS", block_elements)
    whole, x, gate = _split_inputs()
    weight = torch.randn(x.shape[-1], dtype=torch.float64, requires_grad=True)
    y = ops_norm.gated_rms_norm(x, gate, weight, 1e-5)
    expected = plain_gated_rms_norm(x, gate, weight, 1e-5)
    torch.testing.assert_close(y, expected)
    leaves = [whole, weight]
    assert_all_close(random_linear_grads([y], leaves), random_linear_grads([expected], leaves))
    with torch.no_grad():
        torch.testing.assert_close(ops_norm.gated_rms_norm(x, gate, weight, 1e-5), expected)


def test_float32_gated_norm_module_matches_the_float64_formula():
    """The module's float32 path (the blocked function) against the formula in float64, values and gradients."""
    norm = HybridRMSNormGated(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x64, gate64 = torch.randn(2, 2, 300, 4, 8, dtype=torch.float64).unbind(0)
    weight64 = norm.weight.detach().double()
    leaves64 = [t.requires_grad_() for t in (x64, gate64, weight64)]
    leaves32 = [x64.detach().float().requires_grad_(), gate64.detach().float().requires_grad_(), norm.weight]
    y = norm(*leaves32[:2])
    expected = plain_gated_rms_norm(x64, gate64, weight64)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    cotangent = torch.randn(expected.shape, dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves32, cotangent.float())
    expected_grads = torch.autograd.grad(expected, leaves64, cotangent)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.double(), expected_grad, atol=1e-4, rtol=1e-4)


def test_bfloat16_gated_rms_norm_gradients_have_the_inputs_dtype_and_values(monkeypatch):
    """bf16 in, bf16 gradients out (the weight's partial sums are kept in float32 across blocks), close to the
    float64 formula."""
    monkeypatch.setattr(ops_norm, "BLOCK_ELEMENTS", 64)
    x64, gate64 = torch.randn(2, 2, 50, 4, 8, dtype=torch.float64).unbind(0)
    weight64 = torch.randn(8, dtype=torch.float64)
    leaves16 = [t.bfloat16().requires_grad_() for t in (x64, gate64, weight64)]
    leaves64 = [t.detach().bfloat16().double().requires_grad_() for t in (x64, gate64, weight64)]
    cotangent = torch.randn(2, 50, 4, 8, dtype=torch.float64).bfloat16()
    grads = torch.autograd.grad(ops_norm.gated_rms_norm(*leaves16), leaves16, cotangent)
    expected = torch.autograd.grad(plain_gated_rms_norm(*leaves64), leaves64, cotangent.double())
    for grad, expected_grad in zip(grads, expected, strict=True):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.double(), expected_grad, atol=5e-2, rtol=2e-2)


def plain_rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_scaled_unit_rows_is_the_rms_norm_and_the_l2_normalisation():
    """The inference form `scale * x / hypot(|x|, eps_root)` against both plain formulas, rows of zeros and of tiny
    values included (where eps decides the result)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    x[0, 1] = 0.0
    x[1, 2] *= 1e-5
    weight, eps, width = torch.randn(16, dtype=torch.float64), 1e-5, 16
    as_rms = ops_norm.scaled_unit_rows(x, weight * width**0.5, torch.tensor((width * eps) ** 0.5, dtype=torch.float64))
    torch.testing.assert_close(as_rms, plain_rms_norm(x, weight, eps), atol=1e-14, rtol=1e-12)
    as_l2 = ops_norm.scaled_unit_rows(x, None, torch.tensor(1e-3, dtype=torch.float64))  # no scale: 1
    torch.testing.assert_close(as_l2, plain_l2_normalize(x, eps=1e-6), atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_rms_norm_module_without_autograd_matches_the_formula(zero_centered, bias):
    """`HybridRMSNorm` without autograd runs on a kept scaled weight: equal to the float64 formula, and it follows
    in-place and swapped weights and a changed epsilon (the kept form is rebuilt)."""
    torch.manual_seed(0)
    norm = HybridRMSNorm(16, eps=1e-6, zero_centered=zero_centered, bias=bias)
    x = torch.randn(3, 7, 16)
    x[0, 0] *= 1e-4

    def expected():
        weight = norm.weight.detach().double() + (1.0 if zero_centered else 0.0)
        out = plain_rms_norm(x.double(), weight, norm.variance_epsilon)
        return out + norm.bias.detach().double() if bias else out

    for change in (None, "in place", "swapped", "eps"):
        if change == "in place":
            with torch.no_grad():
                norm.weight.add_(torch.randn(16))
                if bias:
                    norm.bias.add_(torch.randn(16))
        elif change == "swapped":
            norm.weight.data = torch.randn(16)
        elif change == "eps":
            norm.variance_epsilon = 0.5  # large enough to move every row
        with torch.no_grad():
            inferred = norm(x)
        assert "_derived_from_weights" in norm.__dict__  # the inference path ran
        torch.testing.assert_close(inferred.double(), expected(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(inferred, norm(x).detach(), atol=1e-6, rtol=1e-5)  # the autograd path

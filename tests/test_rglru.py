"""The RG-LRU: the linear-recurrence op and the `rglru` block against step-by-step loops of the published equations."""

import math

import pytest
import torch
from torch.nn import functional as F

from hybridzoo.modeling.block_rglru import HybridRGLRU
from hybridzoo.modeling.ops_rglru import linear_recurrence, naive_linear_recurrence
from tiny_models import assert_all_close, random_linear_grads, tiny_config

PATHS = [None, 4, 8]  # the time loop, and the chunked form with chunks shorter and longer than some lengths


def _op_inputs(batch=3, length=7, dim=5):
    a = torch.rand(batch, length, dim, dtype=torch.float64).requires_grad_()
    b = torch.randn(batch, length, dim, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(batch, dim, dtype=torch.float64).requires_grad_()
    return a, b, h0


@pytest.mark.parametrize("chunk_size", PATHS)
@pytest.mark.parametrize("length", [1, 7, 33])
def test_op_matches_naive_with_mask_and_reset(length, chunk_size):
    a, b, h0 = _op_inputs(length=length)
    mask = torch.rand(3, length) > 0.3
    reset = torch.rand(3, length) > 0.8
    for kwargs in (dict(), dict(mask=mask, reset=reset)):
        out = linear_recurrence(a, b, h0, chunk_size=chunk_size, **kwargs)
        ref = naive_linear_recurrence(a, b, h0, **kwargs)
        assert_all_close(out, ref)
        assert_all_close(random_linear_grads(out, (a, b, h0)), random_linear_grads(ref, (a, b, h0)))


@pytest.mark.parametrize("chunk_size", PATHS)
def test_padded_steps_are_identities(chunk_size):
    a, b, h0 = _op_inputs(length=12)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    mask[1, 5:8] = False  # a hole
    mask[2, -2:] = False  # right padding
    states, final = linear_recurrence(a, b, h0, mask=mask, chunk_size=chunk_size)
    for row in range(3):
        keep = mask[row]
        ref_states, ref_final = naive_linear_recurrence(
            a[row : row + 1, keep], b[row : row + 1, keep], h0[row : row + 1]
        )
        torch.testing.assert_close(states[row, keep], ref_states[0])
        torch.testing.assert_close(final[row], ref_final[0])


@pytest.mark.parametrize("chunk_size", PATHS)
def test_split_and_carry_equals_one_call(chunk_size):
    a, b, h0 = _op_inputs(length=33)
    reset = torch.rand(3, 33) > 0.9
    full, full_final = linear_recurrence(a, b, h0, reset=reset, chunk_size=chunk_size)
    pieces, h = [], h0
    for start, end in [(0, 10), (10, 11), (11, 33)]:
        states, h = linear_recurrence(
            a[:, start:end], b[:, start:end], h, reset=reset[:, start:end], chunk_size=chunk_size
        )
        pieces.append(states)
    joined = torch.cat(pieces, dim=1)
    assert_all_close((joined, h), (full, full_final))
    assert_all_close(random_linear_grads([joined, h], (a, b, h0)), random_linear_grads([full, full_final], (a, b, h0)))


def test_chunked_form_falls_back_to_the_loop_when_a_chunk_would_overflow():
    a, b, h0 = _op_inputs(length=40)
    a = (a.detach() * 1e-30).requires_grad_()  # log-decay of ~-70 per step: exp(-A) would overflow within a chunk
    out = linear_recurrence(a, b, h0, chunk_size=8)
    ref = naive_linear_recurrence(a, b, h0)
    assert_all_close(out, ref)
    assert all(torch.isfinite(g).all() for g in random_linear_grads(out, (a, b, h0)))


# ---------------------------------------------------------------------------------------------------------------------
# the block


def _block(chunk_size=None) -> HybridRGLRU:
    block = HybridRGLRU(tiny_config("R", rglru_num_heads=4)).double()
    block.init_custom_parameters()
    with torch.no_grad():  # larger random projections than the init, so every term matters
        for module in (block.linear_x, block.linear_y, block.out_proj, block.conv1d):
            module.weight.normal_(0, 0.3)
            module.bias.normal_(0, 0.1)
        block.a_gate_bias.normal_(0, 0.5)
        block.x_gate_bias.normal_(0, 0.5)
    block.chunk_size = chunk_size
    return block


def published_equations_loop(block: HybridRGLRU, x: torch.Tensor, conv_history: torch.Tensor, h: torch.Tensor):
    """Griffin's recurrent block, one token at a time:
    u_t = sum_k w_k x'_{t-k} + bias (x' = linear_x(x)), r_t = sigmoid(W_a u_t + b_a), i_t = sigmoid(W_x u_t + b_x) per
    head, a_t = exp(-8 r_t softplus(Lambda)), h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t),
    y_t = out_proj(h_t * gelu(linear_y(x_t)))."""
    heads, head_dim = block.num_heads, block.head_dim
    weight = block.conv1d.weight[:, 0]  # [width, K]
    width = weight.shape[1]
    history = list(conv_history.unbind(1))  # the last K - 1 inputs
    outputs = []
    for t in range(x.shape[1]):
        x_t = x[:, t]
        history.append(block.linear_x(x_t))
        u = sum(weight[:, width - 1 - s] * history[-1 - s] for s in range(width)) + block.conv1d.bias
        history = history[1:]
        u_heads = [u[:, k * head_dim : (k + 1) * head_dim] for k in range(heads)]
        r = torch.cat(
            [torch.sigmoid(u_heads[k] @ block.a_gate_weight[k] + block.a_gate_bias[k]) for k in range(heads)], -1
        )
        i = torch.cat(
            [torch.sigmoid(u_heads[k] @ block.x_gate_weight[k] + block.x_gate_bias[k]) for k in range(heads)], -1
        )
        a = torch.exp(-8.0 * r * F.softplus(block.a_param))
        h = a * h + torch.sqrt(1 - a**2) * (i * u)
        outputs.append(block.out_proj(h * F.gelu(block.linear_y(x_t), approximate="tanh")))
    return torch.stack(outputs, dim=1), torch.stack(history, dim=1), h


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_block_matches_published_equations_outputs_and_gradients(chunk_size):
    block = _block(chunk_size)
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    conv0 = torch.randn(2, 3, 32, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    y, (conv, h) = block(x, (conv0, h0))
    ref_y, ref_conv, ref_h = published_equations_loop(block, x, conv0, h0)
    assert_all_close((y, conv, h), (ref_y, ref_conv, ref_h))
    inputs = (x, conv0, h0, *block.parameters())
    assert_all_close(random_linear_grads([y, h], inputs), random_linear_grads([ref_y, ref_h], inputs))


def test_init_gives_a_pow_c_in_range():
    block = HybridRGLRU(tiny_config("R"))
    block.init_custom_parameters()
    a_pow_c = torch.exp(-8.0 * F.softplus(block.a_param))
    assert a_pow_c.min() >= 0.9 - 1e-6 and a_pow_c.max() <= 0.999 + 1e-6


def test_full_forward_equals_prefill_then_decode():
    block = _block()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    y_full, state_full = block(x)
    y_prefill, state = block(x[:, :5])
    pieces = [y_prefill]
    for t in range(5, 11):
        y_t, state = block(x[:, t : t + 1], state)
        pieces.append(y_t)
    torch.testing.assert_close(torch.cat(pieces, dim=1), y_full)
    assert_all_close(state, state_full)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_left_padded_batch_equals_each_row_alone(chunk_size):
    block = _block(chunk_size)
    lengths = [9, 4, 6]
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    mask = torch.arange(9)[None] >= torch.tensor([9 - n for n in lengths])[:, None]
    y, (conv, h) = block(x, mask=mask)
    for row, n in enumerate(lengths):
        y_alone, (conv_alone, h_alone) = block(x[row : row + 1, 9 - n :])
        torch.testing.assert_close(y[row, 9 - n :], y_alone[0])
        torch.testing.assert_close(conv[row], conv_alone[0])
        torch.testing.assert_close(h[row], h_alone[0])


def test_reset_starts_a_new_document():
    block = _block()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    reset = torch.zeros(1, 10, dtype=torch.bool)
    reset[0, 6] = True
    y, _ = block(x, reset=reset)
    first, _ = block(x[:, :6])
    second, _ = block(x[:, 6:])
    torch.testing.assert_close(y, torch.cat([first, second], dim=1))


def test_float32_long_sequence_stays_close_to_float64():
    """A float32 run over 256 steps keeps the fp64 answer to ~1e-5 (the recurrence runs in float32 either way)."""
    block = _block()
    x = torch.randn(1, 256, 32, dtype=torch.float64)
    y64, _ = block(x)
    y32, _ = block.float()(x.float())
    assert (y32.double() - y64).abs().max() < 1e-4 * max(1.0, y64.abs().max().item())
    assert math.isfinite(y32.sum().item())


def test_sqrt_gradient_is_bounded_like_recurrent_gemma():
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import SqrtBoundDerivative

    from hybridzoo.modeling.block_rglru import _SqrtBoundedGrad

    x = torch.tensor([0.0, 1e-9, 1e-7, 2.5e-7, 1e-3, 0.5], dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(_SqrtBoundedGrad.apply(x).sum(), x)
    (theirs,) = torch.autograd.grad(SqrtBoundDerivative.apply(x).sum(), x)
    torch.testing.assert_close(ours, theirs)
    assert ours.max().item() == pytest.approx(1000.0)


def test_first_token_of_a_sequence_enters_unscaled():
    """A fresh call (no state) and a reset both use input multiplier 1 at their first token (RecurrentGemma)."""
    block = _block()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    y_fresh, _ = block(x[:, :1])
    zero_state = (torch.zeros(1, 3, 32, dtype=torch.float64), torch.zeros(1, 32, dtype=torch.float64))
    y_continued, _ = block(x[:, :1], zero_state)  # a continuation from a zero state scales by sqrt(1 - a^2)
    reset = torch.tensor([[True]])
    y_reset, _ = block(x[:, :1], zero_state, reset=reset)
    torch.testing.assert_close(y_reset, y_fresh)
    assert not torch.allclose(y_fresh, y_continued)

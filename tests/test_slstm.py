"""The sLSTM: the recurrence op and the `slstm` block against literal step-by-step loops of the xLSTM equations."""

import pytest
import torch
from torch.nn import functional as F

from hybridzoo.modeling.block_slstm import HybridSLSTM
from hybridzoo.modeling.ops_slstm import naive_slstm, slstm_recurrence
from tiny_models import assert_all_close, random_linear_grads, tiny_config

HEADS, HEAD_DIM = 3, 4


def _op_inputs(batch=2, length=7):
    gate_inputs = torch.randn(batch, length, 4, HEADS, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    recurrent = (0.5 * torch.randn(HEADS, HEAD_DIM, 4 * HEAD_DIM, dtype=torch.float64)).requires_grad_()
    shape = (batch, HEADS, HEAD_DIM)
    state = (
        torch.randn(shape, dtype=torch.float64),
        torch.rand(shape, dtype=torch.float64) + 0.5,  # n > 0 once a sequence has started
        torch.randn(shape, dtype=torch.float64),
        torch.randn(shape, dtype=torch.float64).tanh(),
    )
    return gate_inputs, recurrent, tuple(s.requires_grad_() for s in state)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
@pytest.mark.parametrize("length", [1, 7, 33])
def test_op_matches_naive_outputs_state_and_gradients(length, forget_gate):
    gate_inputs, recurrent, state = _op_inputs(length=length)
    for initial in (None, state):
        hidden, final = slstm_recurrence(gate_inputs, recurrent, initial, forget_gate=forget_gate)
        ref_hidden, ref_final = naive_slstm(gate_inputs, recurrent, initial, forget_gate=forget_gate)
        assert_all_close((hidden, *final), (ref_hidden, *ref_final))
        # losses on the outputs and on the final h (c, n, m are only defined up to the stabiliser's scale)
        inputs = (gate_inputs, recurrent) + (state if initial is not None else ())
        assert_all_close(
            random_linear_grads([hidden, final[3]], inputs), random_linear_grads([ref_hidden, ref_final[3]], inputs)
        )


def test_padded_steps_are_identities():
    gate_inputs, recurrent, state = _op_inputs(batch=3, length=10)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    mask[1, 3:6] = False  # a hole
    mask[2, -2:] = False  # right padding
    for initial in (None, state):
        hidden, final = slstm_recurrence(gate_inputs, recurrent, initial, mask=mask)
        for row in range(3):
            keep = mask[row]
            row_state = tuple(s[row : row + 1] for s in initial) if initial is not None else None
            ref_hidden, ref_final = naive_slstm(gate_inputs[row : row + 1, keep], recurrent, row_state)
            torch.testing.assert_close(hidden[row, keep], ref_hidden[0])
            assert_all_close([s[row] for s in final], [s[0] for s in ref_final])


def test_reset_makes_a_fresh_state():
    gate_inputs, recurrent, state = _op_inputs(batch=1, length=12)
    reset = torch.zeros(1, 12, dtype=torch.bool)
    reset[0, 5] = reset[0, 9] = True
    hidden, final = slstm_recurrence(gate_inputs, recurrent, state, reset=reset)
    pieces, ref_state = [], state
    for start, end in [(0, 5), (5, 9), (9, 12)]:
        ref_hidden, ref_state = naive_slstm(gate_inputs[:, start:end], recurrent, ref_state)
        pieces.append(ref_hidden)
        ref_state = None  # every later document starts fresh
    torch.testing.assert_close(hidden, torch.cat(pieces, dim=1))


def test_split_and_carry_equals_one_call_with_gradients():
    gate_inputs, recurrent, state = _op_inputs(length=33)
    reset = torch.rand(2, 33) > 0.9
    full, full_final = slstm_recurrence(gate_inputs, recurrent, state, reset=reset)
    pieces, carried = [], state
    for start, end in [(0, 10), (10, 11), (11, 33)]:
        hidden, carried = slstm_recurrence(gate_inputs[:, start:end], recurrent, carried, reset=reset[:, start:end])
        pieces.append(hidden)
    joined = torch.cat(pieces, dim=1)
    assert_all_close((joined, *carried), (full, *full_final))
    inputs = (gate_inputs, recurrent, *state)
    assert_all_close(
        random_linear_grads([joined, carried[3]], inputs), random_linear_grads([full, full_final[3]], inputs)
    )


def test_extreme_gates_stay_finite():
    """Large gate pre-activations: the stabiliser keeps every exponential <= 1, no inf or nan anywhere."""
    gate_inputs, recurrent, _ = _op_inputs(length=20)
    big = (gate_inputs.detach() * 60).requires_grad_()
    hidden, final = slstm_recurrence(big, recurrent, None, forget_gate="exp")
    grads = random_linear_grads([hidden], (big, recurrent))
    assert all(torch.isfinite(t).all() for t in (hidden, final[0], final[1], final[3], *grads))


# ---------------------------------------------------------------------------------------------------------------------
# the block


def _block(**overrides) -> HybridSLSTM:
    block = HybridSLSTM(tiny_config("X", slstm_num_heads=4, **overrides)).double()
    block.init_custom_parameters()
    with torch.no_grad():  # larger random weights than the init, so every term matters
        for parameter in block.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return block


def block_equations_loop(block: HybridSLSTM, x: torch.Tensor):
    """The sLSTM block from a fresh state, one token at a time: conv(4) of the real tokens seen so far + SiLU feeds the
    input and forget gates, x the cell input and output gate, then `naive_slstm` step by step, per-head group norm
    and out_proj."""
    batch, length, hidden = x.shape
    heads, head_dim = block.num_heads, block.head_dim
    weight, width = block.conv1d.weight[:, 0], block.conv_kernel_size
    history = [x.new_zeros(batch, hidden)] * (width - 1)
    state, outputs = None, []
    for t in range(length):
        history.append(x[:, t])
        conv = sum(weight[:, width - 1 - s] * history[-1 - s] for s in range(width)) + block.conv1d.bias
        pre = torch.cat([block.if_proj(F.silu(conv)), block.zo_proj(x[:, t])], dim=-1)
        pre = pre.view(batch, 1, 4, heads, head_dim) + block.gate_bias
        h, state = naive_slstm(pre, block.recurrent_weight, state, forget_gate=block.forget_gate)
        h = h.reshape(batch, heads, head_dim)
        normed = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + block.norm.eps)
        normed = normed.reshape(batch, hidden) * block.norm.weight + block.norm.bias
        outputs.append(block.out_proj(normed))
    return torch.stack(outputs, dim=1), state


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_block_matches_equations_outputs_and_gradients(forget_gate):
    block = _block(slstm_forget_gate=forget_gate)
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    y, state = block(x)
    ref_y, ref_state = block_equations_loop(block, x)
    assert_all_close((y, *state[:4]), (ref_y, *ref_state))
    inputs = (x, *block.parameters())
    assert_all_close(random_linear_grads([y], inputs), random_linear_grads([ref_y], inputs))


@pytest.mark.parametrize("conv", [4, 0])
def test_full_forward_equals_prefill_then_decode(conv):
    block = _block(slstm_conv_kernel_dim=conv)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    y_full, state_full = block(x)
    assert len(state_full) == (5 if conv else 4)
    y_prefill, state = block(x[:, :5])
    pieces = [y_prefill]
    for t in range(5, 11):
        y_t, state = block(x[:, t : t + 1], state)
        pieces.append(y_t)
    torch.testing.assert_close(torch.cat(pieces, dim=1), y_full)
    assert_all_close(state, state_full)


def test_left_padded_batch_equals_each_row_alone():
    block = _block()
    lengths = [9, 4, 6]
    x = torch.randn(3, 9, 32, dtype=torch.float64)
    mask = torch.arange(9)[None] >= torch.tensor([9 - n for n in lengths])[:, None]
    y, state = block(x, mask=mask)
    for row, n in enumerate(lengths):
        y_alone, state_alone = block(x[row : row + 1, 9 - n :])
        torch.testing.assert_close(y[row, 9 - n :], y_alone[0])
        assert_all_close([s[row] for s in state], [s[0] for s in state_alone])


def test_reset_starts_a_new_document():
    block = _block()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    reset = torch.zeros(1, 10, dtype=torch.bool)
    reset[0, 6] = True
    y, _ = block(x, reset=reset)
    first, _ = block(x[:, :6])
    second, _ = block(x[:, 6:])
    torch.testing.assert_close(y, torch.cat([first, second], dim=1))

"""The causal depthwise conv against a literal per-token loop over each row's real tokens."""

import pytest
import torch

from hybridzoo.modeling import ops_conv
from hybridzoo.modeling.ops_conv import causal_conv1d
from tiny_models import assert_all_close, random_linear_grads


def naive_conv(tokens: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = sum_s weight[:, K-1-s] * x_{t-s} over the concatenation [state, tokens] of one row."""
    width = weight.shape[-1]
    history = torch.cat([state, tokens], dim=0)
    outputs = []
    for t in range(tokens.shape[0]):
        outputs.append(sum(weight[:, width - 1 - s] * history[width - 1 + t - s] for s in range(width)))
    return torch.stack(outputs), history[history.shape[0] - (width - 1) :]


def _inputs(batch=3, length=11, channels=5, width=4):
    x = torch.randn(batch, length, channels, dtype=torch.float64)
    weight = torch.randn(channels, width, dtype=torch.float64)
    state = torch.randn(batch, width - 1, channels, dtype=torch.float64)
    return x, weight, state


def test_matches_loop_with_state():
    x, weight, state = _inputs()
    y, new_state = causal_conv1d(x, weight, state)
    for b in range(x.shape[0]):
        ref_y, ref_state = naive_conv(x[b], weight, state[b])
        torch.testing.assert_close(y[b], ref_y)
        torch.testing.assert_close(new_state[b], ref_state)


def test_padding_is_an_identity_step():
    x, weight, state = _inputs()
    mask = torch.rand(x.shape[:2]) > 0.4
    mask[:, -1] = True
    y, new_state = causal_conv1d(x, weight, state, mask=mask)
    for b in range(x.shape[0]):
        ref_y, ref_state = naive_conv(x[b][mask[b]], weight, state[b])
        torch.testing.assert_close(y[b][mask[b]], ref_y)
        torch.testing.assert_close(new_state[b], ref_state)


def test_reset_starts_each_document_from_zeros():
    x, weight, state = _inputs(batch=1, length=12)
    reset = torch.zeros(1, 12, dtype=torch.bool)
    reset[0, 5] = reset[0, 10] = True
    y, new_state = causal_conv1d(x, weight, state, reset=reset)
    zeros = torch.zeros_like(state[0])
    pieces = [(0, 5, state[0]), (5, 10, zeros), (10, 12, zeros)]
    for start, end, initial in pieces:
        ref_y, ref_state = naive_conv(x[0, start:end], weight, initial)
        torch.testing.assert_close(y[0, start:end], ref_y)
    # the last document is 2 tokens long: the state holds them after one zero
    torch.testing.assert_close(new_state[0], ref_state)


def test_split_and_carry_equals_one_call():
    x, weight, state = _inputs(batch=2, length=13)
    y, final = causal_conv1d(x, weight, state)
    y1, mid = causal_conv1d(x[:, :6], weight, state)
    y2, mid = causal_conv1d(x[:, 6:7], weight, mid)
    y3, end = causal_conv1d(x[:, 7:], weight, mid)
    torch.testing.assert_close(torch.cat([y1, y2, y3], dim=1), y)
    torch.testing.assert_close(end, final)


def _naive_batch(x, weight, state, reset=None):
    """The loop above per row, documents split at `reset` (each later document starting from zeros)."""
    ys = []
    for b in range(x.shape[0]):
        starts = [0] + ([t for t in range(1, x.shape[1]) if reset[b, t]] if reset is not None else []) + [x.shape[1]]
        pieces = []
        for i, (start, end) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
            initial = state[b] if i == 0 and not (reset is not None and reset[b, 0]) else torch.zeros_like(state[b])
            pieces.append(naive_conv(x[b, start:end], weight, initial)[0])
        ys.append(torch.cat(pieces))
    return torch.stack(ys)


@pytest.mark.parametrize("block_elements", [1, 64, ops_conv.BLOCK_ELEMENTS])  # rows per block: K, ~10, all
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("epilogue", [None, "bias", "bias+silu", "silu"])
def test_blocked_forward_and_hand_written_backward_match_autograd_of_the_loop(
    monkeypatch, block_elements, with_state, epilogue
):
    """Outputs and gradients (inputs, state, taps, bias) equal autograd through the literal loop, for blocks from
    the narrowest the code allows (K rows: every tap and gradient crosses a block boundary) to one block."""
    monkeypatch.setattr(ops_conv, "BLOCK_ELEMENTS", block_elements)
    x, weight, state = _inputs(batch=2, length=300)
    bias = torch.randn(x.shape[-1], dtype=torch.float64) if epilogue and "bias" in epilogue else None
    activation = "silu" if epilogue and "silu" in epilogue else None
    reset = torch.zeros(2, 300, dtype=torch.bool)
    reset[0, 7] = reset[0, 8] = reset[1, 0] = reset[1, 299] = True
    leaves = [t.requires_grad_() for t in (x, weight, state if with_state else None, bias) if t is not None]
    for row_reset in (None, reset):
        initial = state if with_state else None
        y = causal_conv1d(x, weight, initial, reset=row_reset, bias=bias, activation=activation)[0]
        expected_y = _naive_batch(x, weight, state if with_state else torch.zeros_like(state), row_reset)
        if bias is not None:
            expected_y = expected_y + bias
        if activation == "silu":
            expected_y = torch.nn.functional.silu(expected_y)
        torch.testing.assert_close(y, expected_y)
        assert_all_close(random_linear_grads([y], leaves), random_linear_grads([expected_y], leaves))


@pytest.mark.parametrize("block_elements", [1, ops_conv.BLOCK_ELEMENTS])
def test_backward_with_padding_and_gradcheck(monkeypatch, block_elements):
    monkeypatch.setattr(ops_conv, "BLOCK_ELEMENTS", block_elements)
    x, weight, state = _inputs(batch=2, length=9, channels=3)
    bias = torch.randn(3, dtype=torch.float64)
    mask = torch.rand(x.shape[:2]) > 0.3
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[1, 4] = True
    leaves = [t.requires_grad_() for t in (x, weight, state, bias)]
    torch.autograd.gradcheck(lambda *a: causal_conv1d(*a[:3], mask=mask, reset=reset), leaves[:3])
    torch.autograd.gradcheck(lambda *a: causal_conv1d(*a[:3]), leaves[:3])
    torch.autograd.gradcheck(
        lambda *a: causal_conv1d(*a[:3], mask=mask, reset=reset, bias=a[3], activation="silu"), leaves
    )


def test_short_input_without_state_pads_the_new_state_with_zeros():
    """Fewer tokens than the window: the new state is zeros, then the tokens (as the loop over zeros + tokens)."""
    x, weight, state = _inputs(length=2)
    y, new_state = causal_conv1d(x, weight)
    for b in range(x.shape[0]):
        ref_y, ref_state = naive_conv(x[b], weight, torch.zeros_like(state[b]))
        torch.testing.assert_close(y[b], ref_y)
        torch.testing.assert_close(new_state[b], ref_state)


def test_unknown_activation_is_rejected():
    x, weight, _ = _inputs()
    with pytest.raises(ValueError, match="activation='gelu'"):
        causal_conv1d(x, weight, activation="gelu")


def test_empty_input_passes_the_state_through():
    x, weight, state = _inputs(length=0)
    y, new_state = causal_conv1d(x, weight, state)
    assert y.shape == (3, 0, 5)
    torch.testing.assert_close(new_state, state)
    assert causal_conv1d(x, weight)[1].abs().sum() == 0


def test_reset_at_a_padded_position_is_ignored():
    x, weight, state = _inputs(batch=1, length=10)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 4] = False
    reset = torch.zeros(1, 10, dtype=torch.bool)
    with_pad_reset = reset.clone()
    with_pad_reset[0, 4] = True
    y, new_state = causal_conv1d(x, weight, state, mask=mask, reset=reset)
    y_pad_reset, new_state_pad_reset = causal_conv1d(x, weight, state, mask=mask, reset=with_pad_reset)
    torch.testing.assert_close(y_pad_reset[mask], y[mask])
    torch.testing.assert_close(new_state_pad_reset, new_state)


def test_bfloat16_weight_gradient_is_summed_over_blocks_in_float32(monkeypatch):
    """One-row blocks (a thousand partial sums): the bf16 weight gradient stays within one bf16 rounding of the
    float64 one instead of accumulating a rounding per block."""
    monkeypatch.setattr(ops_conv, "BLOCK_ELEMENTS", 1)
    x, weight, _ = _inputs(batch=1, length=1000, channels=4)
    grad_y = torch.randn(1, 1000, 4, dtype=torch.float64)
    x16, weight16 = x.bfloat16(), weight.bfloat16().requires_grad_()
    causal_conv1d(x16, weight16)[0].backward(grad_y.bfloat16())
    weight64 = weight16.detach().double().requires_grad_()
    zeros = torch.zeros(3, 4, dtype=torch.float64)  # the literal loop in float64 as the reference
    naive_conv(x16[0].double(), weight64, zeros)[0].backward(grad_y[0].bfloat16().double())
    relative = (weight16.grad.double() - weight64.grad).abs().max() / weight64.grad.abs().max()
    assert relative < 8e-3

"""The Gated DeltaNet block's no-autograd single-token step equals its general forward, and its kept fused
projection weight follows every change of the weights."""

import pytest
import torch

from hybridzoo.modeling.block_gated_deltanet import HybridGatedDeltaNet
from tiny_models import tiny_config


def full_and_stepped(block: HybridGatedDeltaNet, x: torch.Tensor, prompt: int):
    """The block over all of `x` at once, and over `x[:, :prompt]` then one token at a time (the decode step)."""
    with torch.no_grad():
        full, full_state = block(x)
        first, state = block(x[:, :prompt])
        pieces = [first]
        for t in range(prompt, x.shape[1]):
            y, state = block(x[:, t : t + 1], state)
            pieces.append(y)
    return (full, full_state), (torch.cat(pieces, dim=1), state)


@pytest.mark.parametrize("neg_eigval", [False, True])
def test_decode_step_equals_forward(neg_eigval):
    torch.manual_seed(0)
    block = HybridGatedDeltaNet(tiny_config("G", linear_allow_neg_eigval=neg_eigval)).eval()
    (full, (full_conv, full_matrix)), (stepped, state) = full_and_stepped(block, torch.randn(3, 7, 32), prompt=4)
    torch.testing.assert_close(stepped, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state[0], full_conv)
    torch.testing.assert_close(state[1], full_matrix, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_decode_step_equals_forward_in_other_dtypes(dtype):
    """float64 keeps float64 throughout (the step used to mix in float32 and fail); bfloat16 rounds as `forward`."""
    torch.manual_seed(0)
    block = HybridGatedDeltaNet(tiny_config("G", linear_num_value_heads=8)).eval().to(dtype)
    x = torch.randn(2, 6, 32, dtype=dtype)
    (full, (_, full_matrix)), (stepped, state) = full_and_stepped(block, x, prompt=4)
    assert state[1].dtype == full_matrix.dtype
    tolerance = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(stepped, full, **tolerance)
    torch.testing.assert_close(state[1], full_matrix, **tolerance)


def test_kept_projection_weight_follows_weight_changes():
    torch.manual_seed(0)
    block = HybridGatedDeltaNet(tiny_config("G")).eval()
    x = torch.randn(1, 5, 32)

    def step_output():
        with torch.no_grad():
            _, state = block(x[:, :4])
            return block(x[:, 4:], state)[0]

    def reference():  # the autograd path concatenates the current weights every call
        _, state = block(x[:, :4])
        return block(x[:, 4:], tuple(s.detach() for s in state))[0].detach()

    torch.testing.assert_close(step_output(), reference())
    with torch.no_grad():
        block.v_proj.weight.mul_(2.0)  # in place, like an optimizer step
    torch.testing.assert_close(step_output(), reference())
    block.a_proj.weight.data = torch.randn_like(block.a_proj.weight)  # swapped storage, like module.to()
    torch.testing.assert_close(step_output(), reference())
    # the kept conv taps and decay constants follow their parameters too
    with torch.no_grad():
        block.A_log.add_(0.5)
        block.dt_bias.mul_(-1.0)
    torch.testing.assert_close(step_output(), reference())
    block.conv1d.weight.data = torch.randn_like(block.conv1d.weight)
    torch.testing.assert_close(step_output(), reference())

"""The Newton solver (`ops_newton`) and ParaRNN's cells (`ops_pararnn`) against literal step-by-step loops.

References: the cells' equations written out one step at a time (`naive_paragru`, `naive_paralstm`) and autograd
through them (backpropagation through time) for gradients; autograd's full Jacobian for the analytic Jacobians;
a plain Python loop for the linear scans.
"""

import warnings

import pytest
import torch

from hybridzoo.modeling.ops_newton import (
    linear_scan,
    newton_recurrence,
    sequential_recurrence,
)
from hybridzoo.modeling.ops_pararnn import PARAGRU, PARALSTM, naive_paragru, naive_paralstm
from tiny_models import random_linear_grads

CELLS = {"paragru": PARAGRU, "paralstm": PARALSTM}


def _naive(cell_name, inputs, params, state):
    if cell_name == "paragru":
        return naive_paragru(inputs, params[0], state)
    return naive_paralstm(inputs, params[0], params[1], state)


def _problem(cell_name, batch, length, hidden, dtype=torch.float32, saturated=False, recurrent_scale=0.5):
    """Gate inputs, parameters and an initial state. `saturated`: gate inputs pushed far into the flat parts of
    sigmoid and tanh (Jacobians near 0 or 1: memories that last or vanish). A large `recurrent_scale` makes the
    dynamics expansive (|J| > 1 in places), where undamped Newton is known to diverge (Gonzalez et al., 2024)."""
    scale = 6.0 if saturated else 1.0
    inputs = (scale * torch.randn(batch, length, 3, hidden, dtype=dtype)).requires_grad_()
    a = (recurrent_scale * torch.randn(3, hidden, dtype=dtype)).requires_grad_()
    params = (a,)
    if cell_name == "paralstm":
        params += ((0.5 * torch.randn(2, hidden, dtype=dtype)).requires_grad_(),)
    shape = (batch, hidden) if cell_name == "paragru" else (batch, 2, hidden)
    state = torch.randn(shape, dtype=dtype).tanh().requires_grad_()
    return inputs, params, state


def _relative_error(actual, expected):
    return float((actual - expected).detach().abs().max() / expected.detach().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("cell_name", sorted(CELLS))
def test_analytic_jacobian_matches_autograd(cell_name):
    cell = CELLS[cell_name]
    hidden = 5
    inputs, params, state = _problem(cell_name, 1, 1, hidden, dtype=torch.float64, saturated=False)
    state, inputs = state[0].detach(), inputs[0, 0].detach()
    _, jac = cell.step(state, inputs, params, True)
    full = torch.autograd.functional.jacobian(lambda s: cell.step(s, inputs, params, False)[0], state)
    if cell.block == 1:
        torch.testing.assert_close(full, torch.diag(jac))  # diagonal, off-diagonal exactly zero
    else:
        expected = torch.zeros(2, hidden, 2, hidden, dtype=torch.float64)
        for i in range(2):
            for j in range(2):
                expected[i, :, j, :] = torch.diag(jac[i, j])
        torch.testing.assert_close(full, expected)  # 2x2 blocks per channel, nothing across channels


def _naive_scan(jac, b, state, block, reverse):
    h = state if state is not None else torch.zeros_like(b[:, 0])
    steps = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    out = torch.empty_like(b)
    for t in steps:
        h = b[:, t] + (jac[:, t] * h if block == 1 else torch.einsum("bijh,bjh->bih", jac[:, t], h))
        out[:, t] = h
    return out


@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length,chunk", [(1, None), (37, 8), (64, 16), (300, None)])
def test_linear_scan_matches_loop(block, reverse, length, chunk):
    state_shape = (3, 5) if block == 1 else (3, 2, 5)
    jac_shape = (3, length, 5) if block == 1 else (3, length, 2, 2, 5)
    jac = 1.2 * torch.rand(jac_shape, dtype=torch.float64) - 0.2  # negative entries, and zeros below
    jac[:, length // 2] = 0  # a document start
    b = torch.randn(state_shape[0], length, *state_shape[1:], dtype=torch.float64)
    state = None if reverse else torch.randn(state_shape, dtype=torch.float64)
    out = linear_scan(jac, b, state, block, chunk_size=chunk, reverse=reverse)
    torch.testing.assert_close(out, _naive_scan(jac, b, state, block, reverse))


@pytest.mark.parametrize("cell_name", sorted(CELLS))
@pytest.mark.parametrize("saturated", [False, True])
@pytest.mark.parametrize("length", [1, 45, 4096])
def test_newton_matches_sequential_forward_and_bptt(cell_name, saturated, length):
    inputs, params, state = _problem(cell_name, 2, length, 8, saturated=saturated)
    states, stats = newton_recurrence(CELLS[cell_name], inputs, params, state)
    reference = _naive(cell_name, inputs, params, state)
    assert stats.converged and stats.sequential_steps == 0
    assert stats.residual <= 32 * torch.finfo(torch.float32).eps
    assert _relative_error(states, reference) <= 1e-5
    wrt = (inputs, *params, state)
    for grad, expected in zip(random_linear_grads([states], wrt), random_linear_grads([reference], wrt), strict=True):
        assert _relative_error(grad, expected) <= 1e-4  # sums over up to 8k steps of fp32 products


@pytest.mark.parametrize("cell_name", sorted(CELLS))
def test_newton_gradients_exact_in_float64(cell_name):
    inputs, params, state = _problem(cell_name, 2, 200, 6, dtype=torch.float64, saturated=True)
    states, _ = newton_recurrence(CELLS[cell_name], inputs, params, state)
    reference = _naive(cell_name, inputs, params, state)
    torch.testing.assert_close(states, reference)
    wrt = (inputs, *params, state)
    for grad, expected in zip(random_linear_grads([states], wrt), random_linear_grads([reference], wrt), strict=True):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("cell_name", sorted(CELLS))
def test_padding_is_identity_and_resets_restart_documents(cell_name):
    batch, length = 3, 50
    inputs, params, state = _problem(cell_name, batch, length, 4, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, :7] = False  # left padding
    mask[1, 20:26] = False  # a hole
    mask[2, -9:] = False  # right padding
    reset = torch.zeros(batch, length, dtype=torch.bool)
    reset[0, 30] = reset[1, 10] = reset[1, 33] = reset[2, 0] = True  # packed documents
    cell = CELLS[cell_name]
    states, stats = newton_recurrence(cell, inputs, params, state, mask=mask, reset=reset)
    assert stats.converged
    looped = sequential_recurrence(cell, inputs, params, state, mask=mask, reset=reset)
    for row in range(batch):
        # the reference: each document of the row, padding removed, from the initial state or (after a reset) zeros
        starts = [0, *reset[row].nonzero().flatten().tolist(), length]
        carried = state[row : row + 1]
        for begin, end in zip(starts[:-1], starts[1:], strict=True):
            if begin > 0 or reset[row, 0]:
                carried = torch.zeros_like(carried)
            keep = mask[row, begin:end]
            if not keep.any():
                continue
            doc = _naive(cell_name, inputs[row : row + 1, begin:end][:, keep], params, carried)
            torch.testing.assert_close(states[row, begin:end][keep], doc[0])
            carried = doc[:, -1]
        # a padded step carries the state: same value as the step before (or the initial state)
        for t in (~mask[row]).nonzero().flatten().tolist():
            before = states[row, t - 1] if t > 0 else state[row]
            torch.testing.assert_close(states[row, t], before)
    torch.testing.assert_close(states, looped)
    wrt = (inputs, *params, state)
    for grad, expected in zip(random_linear_grads([states], wrt), random_linear_grads([looped], wrt), strict=True):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("cell_name", sorted(CELLS))
def test_non_converging_solve_finishes_sequentially_and_says_so(cell_name):
    inputs, params, state = _problem(cell_name, 2, 300, 8, dtype=torch.float64, saturated=True, recurrent_scale=3.0)
    cell = CELLS[cell_name]
    with pytest.warns(UserWarning, match="did not converge"):
        states, stats = newton_recurrence(cell, inputs, params, state, max_iter=1)
    assert not stats.converged
    assert stats.iterations == 1 and stats.residual > 1e-3
    assert 0 < stats.sequential_steps < 300  # Newton's first step made a prefix exact: only the rest is looped
    reference = _naive(cell_name, inputs, params, state)
    torch.testing.assert_close(states, reference)
    wrt = (inputs, *params, state)
    for grad, expected in zip(random_linear_grads([states], wrt), random_linear_grads([reference], wrt), strict=True):
        torch.testing.assert_close(grad, expected)


def test_converged_solve_does_not_warn():
    inputs, params, state = _problem("paragru", 2, 100, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, stats = newton_recurrence(PARAGRU, inputs, params, state)
    assert stats.converged and 1 <= stats.iterations <= 8


def test_rejects_negative_max_iter():
    inputs, params, state = _problem("paragru", 1, 4, 2)
    with pytest.raises(ValueError, match="max_iter"):
        newton_recurrence(PARAGRU, inputs, params, state, max_iter=-1)

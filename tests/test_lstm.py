"""The `lstm` block against a step-by-step loop of the LSTM cell equations written out here."""

import torch

from hybridzoo.modeling.block_lstm import HybridLSTM
from tiny_models import tiny_config


def cell_equations_loop(block: HybridLSTM, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """i, f, o = sigmoid(W x + U h + b); g = tanh(...); c' = f c + i g; h' = o tanh(c'), one token at a time."""
    lstm = block.lstm
    W_i, W_f, W_g, W_o = lstm.weight_ih_l0.chunk(4)
    U_i, U_f, U_g, U_o = lstm.weight_hh_l0.chunk(4)
    b_i, b_f, b_g, b_o = (lstm.bias_ih_l0 + lstm.bias_hh_l0).chunk(4)
    outputs = []
    for t in range(x.shape[1]):
        x_t = x[:, t]
        i = torch.sigmoid(x_t @ W_i.T + h @ U_i.T + b_i)
        f = torch.sigmoid(x_t @ W_f.T + h @ U_f.T + b_f)
        g = torch.tanh(x_t @ W_g.T + h @ U_g.T + b_g)
        o = torch.sigmoid(x_t @ W_o.T + h @ U_o.T + b_o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        outputs.append(h)
    return block.o_proj(torch.stack(outputs, dim=1)), h, c


def _block():
    block = HybridLSTM(tiny_config("L")).double()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0, 0.3)
    return block


def test_block_matches_cell_equations_with_initial_state():
    block = _block()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    h0, c0 = torch.randn(2, 24, dtype=torch.float64), torch.randn(2, 24, dtype=torch.float64)
    y, (h, c) = block(x, (h0, c0))
    ref_y, ref_h, ref_c = cell_equations_loop(block, x, h0, c0)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(c, ref_c)


def test_padded_steps_leave_the_state_unchanged():
    """Padding anywhere in a row: real tokens see exactly the unpadded sequence (the step-loop path)."""
    block = _block()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :3] = False  # left padding
    mask[1, 4:6] = False  # padding in the middle
    y, (h, c) = block(x, mask=mask)
    for row in range(2):
        zeros = torch.zeros(1, 24, dtype=torch.float64)
        ref_y, ref_h, ref_c = cell_equations_loop(block, x[row : row + 1, mask[row]], zeros, zeros)
        torch.testing.assert_close(y[row, mask[row]], ref_y[0])
        torch.testing.assert_close(h[row], ref_h[0])
        torch.testing.assert_close(c[row], ref_c[0])


def test_reset_restarts_from_zero_state():
    block = _block()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    reset = torch.zeros(1, 10, dtype=torch.bool)
    reset[0, 6] = True
    y, _ = block(x, reset=reset)
    zeros = torch.zeros(1, 24, dtype=torch.float64)
    first, _, _ = cell_equations_loop(block, x[:, :6], zeros, zeros)
    second, _, _ = cell_equations_loop(block, x[:, 6:], zeros, zeros)
    torch.testing.assert_close(y, torch.cat([first, second], dim=1))


def test_stream_in_pieces_like_nn_lstm():
    block = _block()
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    y_full, state_full = block(x)
    y1, state = block(x[:, :5])
    y2, state = block(x[:, 5:6], state)
    y3, state = block(x[:, 6:], state)
    torch.testing.assert_close(torch.cat([y1, y2, y3], dim=1), y_full)
    torch.testing.assert_close(state[0], state_full[0])

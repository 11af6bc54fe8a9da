"""ParaRNN's cells (Danieli et al., "ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for Large Language
Models", arXiv 2510.21450; code apple/ml-pararnn): a GRU and a CIFG LSTM whose recurrent weights are diagonal, so
that their Jacobians w.r.t. the previous state are diagonal (ParaGRU) or 2x2-block-diagonal over `[c, h]`
(ParaLSTM), which is what makes Newton's method with a parallel scan cheap (see `ops_newton`).

Per channel, with the input parts `g_* = (B x_t + b)_*` computed for all steps beforehand (`inputs`):

ParaGRU (`pararnn/rnn_cell/gru_diag_mh.py`; state `h`):

    z = sigmoid(a_z h + g_z)              update gate
    r = sigmoid(a_r h + g_r)              reset gate
    c = tanh(a_c (r h) + g_c)             candidate
    h' = (1 - z) h + z c

ParaLSTM (`pararnn/rnn_cell/lstm_cifg_diag_mh.py`: LSTM with coupled input and forget gates, Greff et al. 2017,
and peepholes; state `[c, h]`):

    f = sigmoid(a_f h + p_f c + g_f)      forget gate (input gate = 1 - f), peephole on the old cell
    c~ = tanh(a_c h + g_c)                candidate
    c' = f c + (1 - f) c~
    o = sigmoid(a_o h + p_o c' + g_o)     output gate, peephole on the new cell
    h' = o tanh(c')

`a_*` (`[3, H]`) are the diagonal recurrent weights, `p_*` (`[2, H]`) the peepholes. Each cell's `step` returns the new
state and, on request, the analytic Jacobian `d new / d old` (computed without autograd from the same gate values).
`naive_paragru` / `naive_paralstm` are the equations written out literally one step at a time, for tests.
"""

from __future__ import annotations

import torch


class ParaGRUCell:
    """ParaGRU: inputs `[..., 3, H]` (z, r, candidate); params `(a,)`, `a` `[3, H]`; state `[..., H]`."""

    block = 1

    @staticmethod
    def state_shape(inputs: torch.Tensor) -> tuple[int, ...]:
        return (inputs.shape[-1],)

    @staticmethod
    def step(
        h: torch.Tensor, inputs: torch.Tensor, params: tuple[torch.Tensor, ...], jacobian: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        (a,) = params
        a_z, a_r, a_c = a.unbind(0)
        g_z, g_r, g_c = inputs.unbind(-2)
        z = torch.sigmoid(torch.addcmul(g_z, a_z, h))
        r = torch.sigmoid(torch.addcmul(g_r, a_r, h))
        rh = r * h
        c = torch.tanh(torch.addcmul(g_c, a_c, rh))
        new = torch.addcmul(h, z, c - h)
        if not jacobian:
            return new, None
        with torch.no_grad():
            dz = z * (1 - z) * a_z  # d z / d h
            d_rh = torch.addcmul(r, h, r * (1 - r) * a_r)  # d (r h) / d h
            dc = (1 - c * c) * a_c * d_rh  # d c / d h
            jac = (1 - z) + (c - h) * dz + z * dc
        return new, jac


class ParaLSTMCell:
    """ParaLSTM: inputs `[..., 3, H]` (f, candidate, o); params `(a, p)`, `a` `[3, H]`, `p` `[2, H]`;
    state `[..., 2, H]`
    (`c` then `h`)."""

    block = 2

    @staticmethod
    def state_shape(inputs: torch.Tensor) -> tuple[int, ...]:
        return (2, inputs.shape[-1])

    @staticmethod
    def step(
        state: torch.Tensor, inputs: torch.Tensor, params: tuple[torch.Tensor, ...], jacobian: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, peephole = params
        a_f, a_c, a_o = a.unbind(0)
        p_f, p_o = peephole.unbind(0)
        g_f, g_c, g_o = inputs.unbind(-2)
        c, h = state.unbind(-2)
        f = torch.sigmoid(torch.addcmul(torch.addcmul(g_f, a_f, h), p_f, c))
        candidate = torch.tanh(torch.addcmul(g_c, a_c, h))
        c_new = torch.addcmul(candidate, f, c - candidate)
        o = torch.sigmoid(torch.addcmul(torch.addcmul(g_o, a_o, h), p_o, c_new))
        tanh_c = torch.tanh(c_new)
        new = torch.stack([c_new, o * tanh_c], dim=-2)
        if not jacobian:
            return new, None
        with torch.no_grad():
            df = f * (1 - f)
            forgotten = c - candidate
            dc_dc = torch.addcmul(f, df * p_f, forgotten)
            dc_dh = df * a_f * forgotten + (1 - f) * (1 - candidate * candidate) * a_c
            do = o * (1 - o)
            dh_dcnew = do * p_o * tanh_c + o * (1 - tanh_c * tanh_c)  # through o's peephole and through tanh(c')
            dh_dh = torch.addcmul(dh_dcnew * dc_dh, do * a_o, tanh_c)
            jac = torch.stack(
                [torch.stack([dc_dc, dc_dh], dim=-2), torch.stack([dh_dcnew * dc_dc, dh_dh], dim=-2)], dim=-3
            )
        return new, jac


PARAGRU = ParaGRUCell()
PARALSTM = ParaLSTMCell()


def naive_paragru(inputs: torch.Tensor, a: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ParaGRU one step at a time, `inputs` `[B, T, 3, H]`, `a` `[3, H]`, `h` `[B, H]`.

    Returns `[B, T, H]`."""
    if h is None:
        h = inputs.new_zeros(inputs.shape[0], inputs.shape[-1])
    outputs = []
    for step in inputs.unbind(1):  # not inputs[:, t]: indexing a long tensor per step makes backward O(T^2)
        z = torch.sigmoid(a[0] * h + step[:, 0])
        r = torch.sigmoid(a[1] * h + step[:, 1])
        candidate = torch.tanh(a[2] * (r * h) + step[:, 2])
        h = (1 - z) * h + z * candidate
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def naive_paralstm(
    inputs: torch.Tensor, a: torch.Tensor, peephole: torch.Tensor, state: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference: ParaLSTM one step at a time, `inputs` `[B, T, 3, H]`, `state` `[B, 2, H]`. Returns `[B, T, 2, H]`."""
    if state is None:
        state = inputs.new_zeros(inputs.shape[0], 2, inputs.shape[-1])
    c, h = state[:, 0], state[:, 1]
    outputs = []
    for step in inputs.unbind(1):
        f = torch.sigmoid(a[0] * h + peephole[0] * c + step[:, 0])
        candidate = torch.tanh(a[1] * h + step[:, 1])
        c = f * c + (1 - f) * candidate
        o = torch.sigmoid(a[2] * h + peephole[1] * c + step[:, 2])
        h = o * torch.tanh(c)
        outputs.append(torch.stack([c, h], dim=1))
    return torch.stack(outputs, dim=1)

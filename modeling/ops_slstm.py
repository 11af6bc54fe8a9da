"""The sLSTM recurrence (Beck et al., xLSTM, NeurIPS 2024) as pure functions over tensors.

Per unit, with gate pre-activations `i~, f~, z~, o~ = W x_t + R h_{t-1} + b` (R block-diagonal: each head's `h`
feeds that head's four gates):

    log i_t = i~                                  (exponential input gate)
    log f_t = log sigmoid(f~)   or   f~           (sigmoid or exponential forget gate)
    m_t = max(log f_t + m_{t-1}, log i_t)         (stabiliser: keeps every exp below 1)
    c_t = exp(log f_t + m_{t-1} - m_t) c_{t-1} + exp(log i_t - m_t) tanh(z~)
    n_t = exp(log f_t + m_{t-1} - m_t) n_{t-1} + exp(log i_t - m_t)
    h_t = sigmoid(o~) c_t / n_t

`c` and `n` are stored divided by `exp(m)`; `h` does not depend on the choice of `m`. A fresh (or reset) state is
`c = n = h = 0, m = -inf`, which makes the first step take `m_1 = log i_1`, as the reference implementation does.

The state feeds back through a non-linearity, so there is no parallel form: `slstm_recurrence` is a time loop made as
cheap as PyTorch allows (input projections for all steps done before the loop; per step one `baddbmm` over heads for
`R h` and a dozen element-wise ops; `unbind`/`stack`, never per-step indexing, so backward stays linear in T).
`naive_slstm` is the same recurrence written out literally, one head and one step at a time, for tests.

Measured (fwd+bwd incl. a Linear(256, 1024) input projection, B=8, hidden 256, 4 heads, 1 thread, T=512 / 2048, on a
loaded 2-core box): this loop 8.0k / 9.7k tok/s; without detaching m 6.9k / 7.3k; a hand-written BPTT backward
(`autograd.Function`, bulk gate derivatives, one bmm per step) 9.0k / 8.7k — no clear gain, so the simpler autograd
loop stays.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

SLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # c, n, m, h, each [B, H, d]


def fresh_slstm_state(batch: int, num_heads: int, head_dim: int, like: torch.Tensor) -> SLSTMState:
    """`(c, n, m, h)` of a sequence that has seen nothing: zeros, and `m = -inf` so the first step sets it."""
    zeros = like.new_zeros(batch, num_heads, head_dim)
    return zeros, zeros, torch.full_like(zeros, float("-inf")), zeros


def _log_forget(f_pre: torch.Tensor, forget_gate: str) -> torch.Tensor:
    return F.logsigmoid(f_pre) if forget_gate == "sigmoid" else f_pre


def slstm_recurrence(
    gate_inputs: torch.Tensor,
    recurrent_weight: torch.Tensor,
    state: SLSTMState | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    forget_gate: str = "sigmoid",
) -> tuple[torch.Tensor, SLSTMState]:
    """Run the sLSTM over all steps.

    Args:
        gate_inputs: `[B, T, 4, H, d]` the input part `W x_t + b` of the gate pre-activations, gates in the order
            i, f, z (cell input), o, as in `torch.nn.LSTM`.
        recurrent_weight: `[H, d, 4 * d]` per-head R; `h_head @ R[head]` gives that head's i, f, z, o (d each).
        state: `(c, n, m, h)` `[B, H, d]` each, or None for a fresh state.
        mask: `[B, T]` bool, False at padding: the state passes through unchanged (outputs there: the carried `h`).
        reset: `[B, T]` bool, True where a document starts: the state is made fresh before that step.
        forget_gate: "sigmoid" or "exp".

    Returns:
        `h` for every step `[B, T, H, d]` and the final state.
    """
    batch, length, _, num_heads, head_dim = gate_inputs.shape
    if state is None:
        state = fresh_slstm_state(batch, num_heads, head_dim, gate_inputs)
    # heads-first layout [H, B, .]: one baddbmm per step adds R h to the precomputed inputs, no transposes in the loop
    steps = gate_inputs.permute(1, 3, 0, 2, 4).reshape(length, num_heads, batch, 4 * head_dim).unbind(0)
    c, n, m, h = (s.transpose(0, 1) for s in state)
    keeps = mask.t()[:, None, :, None].unbind(0) if mask is not None else None  # [1, B, 1] per step
    starts = reset.t()[:, None, :, None].unbind(0) if reset is not None else None
    outputs = []
    for t, pre in enumerate(steps):
        if starts is not None:
            start = starts[t]
            c, n, h = (torch.where(start, torch.zeros_like(s), s) for s in (c, n, h))
            m = torch.where(start, torch.full_like(m, float("-inf")), m)
        gates = torch.baddbmm(pre, h, recurrent_weight)
        i_pre, f_pre, z_pre, o_pre = gates.split(head_dim, dim=-1)
        log_f_plus_m = _log_forget(f_pre, forget_gate) + m
        # h is invariant to m, so m needs no gradient: detaching it drops the max from the backward pass, and the
        # gradients of h (and of anything computed from a carried state) stay exact
        m_new = torch.maximum(log_f_plus_m, i_pre).detach()
        input_gate = torch.exp(i_pre - m_new)
        forget = torch.exp(log_f_plus_m - m_new)
        c_new = torch.addcmul(forget * c, input_gate, torch.tanh(z_pre))
        n_new = torch.addcmul(input_gate, forget, n)
        h_new = torch.sigmoid(o_pre) * c_new / n_new
        if keeps is not None:
            keep = keeps[t]
            c_new, n_new, m_new, h_new = (
                torch.where(keep, new, old) for new, old in ((c_new, c), (n_new, n), (m_new, m), (h_new, h))
            )
        c, n, m, h = c_new, n_new, m_new, h_new
        outputs.append(h)
    hidden = torch.stack(outputs, dim=0).permute(2, 0, 1, 3)  # [T, H, B, d] -> [B, T, H, d]
    return hidden, tuple(s.transpose(0, 1) for s in (c, n, m, h))


def naive_slstm(
    gate_inputs: torch.Tensor,
    recurrent_weight: torch.Tensor,
    state: SLSTMState | None = None,
    forget_gate: str = "sigmoid",
) -> tuple[torch.Tensor, SLSTMState]:
    """Reference: the sLSTM equations one step and one head at a time (slow; for tests). No mask/reset.

    A zero initial state (`n = 0`) takes `m_1 = log i_1`, as in the xLSTM reference code.
    """
    batch, length, _, num_heads, head_dim = gate_inputs.shape
    if state is None:
        zeros = gate_inputs.new_zeros(batch, num_heads, head_dim)
        state = (zeros, zeros, zeros, zeros)
    c, n, m, h = state
    outputs = []
    for t in range(length):
        heads = []
        for head in range(num_heads):
            recurrent = h[:, head] @ recurrent_weight[head]  # [B, 4d]
            i_pre, f_pre, z_pre, o_pre = (
                gate_inputs[:, t, g, head] + recurrent[:, g * head_dim : (g + 1) * head_dim] for g in range(4)
            )
            log_i, log_f = i_pre, _log_forget(f_pre, forget_gate)
            c_h, n_h, m_h = c[:, head], n[:, head], m[:, head]
            m_new = torch.where(n_h == 0, log_i, torch.maximum(log_f + m_h, log_i))
            i_gate = torch.exp(log_i - m_new)
            f_gate = torch.exp(log_f + m_h - m_new)
            c_new = f_gate * c_h + i_gate * torch.tanh(z_pre)
            n_new = f_gate * n_h + i_gate
            h_new = torch.sigmoid(o_pre) * c_new / n_new
            heads.append((c_new, n_new, m_new, h_new))
        c, n, m, h = (torch.stack([parts[k] for parts in heads], dim=1) for k in range(4))
        outputs.append(h)
    return torch.stack(outputs, dim=1), (c, n, m, h)

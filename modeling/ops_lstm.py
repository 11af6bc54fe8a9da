"""The LSTM recurrence as a plain time loop (pure function), for inputs `torch.nn.LSTM` cannot take as they are.

`nn.LSTM` runs whole sequences in fused C++ and is the fast path. It cannot skip padded steps or restart at document
boundaries inside a row, so those inputs take this loop over the same weights. The loop uses `unbind`/`stack` rather
than per-step indexing so that autograd stays linear in the length.
"""

from __future__ import annotations

import torch


def lstm_loop(
    x: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    c: torch.Tensor,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classic LSTM (gate order i, f, g, o as in `torch.nn.LSTM`) over `x` `[B, T, D]` from state `h`, `c` `[B, H]`.

    `mask` `[B, T]` False at padding: the state passes through a padded step unchanged. `reset` `[B, T]` True where a
    document starts: the state is zeroed before that step. Returns outputs `[B, T, H]` and the final `h`, `c`.
    """
    projected = x @ weight_ih.t()  # the input half of every gate, for all steps at once
    if bias is not None:
        projected = projected + bias
    masks = mask.unsqueeze(-1).to(x.dtype).unbind(1) if mask is not None else None
    resets = (~reset).unsqueeze(-1).to(x.dtype).unbind(1) if reset is not None else None
    outputs = []
    for t, gates_x in enumerate(projected.unbind(1)):
        if resets is not None:
            h, c = h * resets[t], c * resets[t]
        gates = gates_x + h @ weight_hh.t()
        input_gate, forget_gate, cell_gate, output_gate = gates.chunk(4, dim=-1)
        c_new = torch.sigmoid(forget_gate) * c + torch.sigmoid(input_gate) * torch.tanh(cell_gate)
        h_new = torch.sigmoid(output_gate) * torch.tanh(c_new)
        if masks is not None:
            h_new = masks[t] * h_new + (1 - masks[t]) * h
            c_new = masks[t] * c_new + (1 - masks[t]) * c
        h, c = h_new, c_new
        outputs.append(h)
    return torch.stack(outputs, dim=1), h, c

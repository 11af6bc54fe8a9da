"""The toy block's recurrence as a pure tensor function: a gated leaky average, one time step at a time."""

from __future__ import annotations

import torch


def toy_recurrence(
    decay: torch.Tensor,
    update: torch.Tensor,
    state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`h_t = decay_t * h_{t-1} + (1 - decay_t) * update_t` over `[B, T, D]`, from `state` `[B, D]` (None: zeros).

    A padded step (`mask` False) keeps `h`; a `reset` step starts from zero. Returns every `h_t` and the last one.
    """
    batch, length, width = update.shape
    h = update.new_zeros(batch, width) if state is None else state
    outputs = []
    for t in range(length):
        previous = h if reset is None else h * (~reset[:, t, None]).to(h.dtype)
        new = decay[:, t] * previous + (1 - decay[:, t]) * update[:, t]
        h = new if mask is None else torch.where(mask[:, t, None], new, h)
        outputs.append(h)
    return torch.stack(outputs, dim=1), h

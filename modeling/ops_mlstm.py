"""The mLSTM recurrence of xLSTM (Beck et al., 2024) as pure functions over tensors: a loop oracle, a fast step loop
for decoding and a chunkwise-parallel form for training and prefill.

Per head, with scalar gate pre-activations `i_t`, `f_t` and `q` scaled by `Dk ** -0.5`:

    C_t = f_t C_{t-1} + i_t k_t v_t^T        (matrix memory, [Dk, Dv])
    n_t = f_t n_{t-1} + i_t k_t              (normaliser, [Dk])
    h_t = C_t^T q_t / max(|n_t . q_t|, 1)

Two gate variants:
- `input_gate="exp"` (xLSTM, xLSTM-7B): input gate `exp(i_t)`, forget gate `sigmoid(f_t)`. `exp` overflows, so the state
  is stored scaled by `exp(-m_t)` with the max-state `m_t = max(log sigmoid(f_t) + m_{t-1}, i_t)`; the step becomes
  `C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T` and the denominator `max(|n_t . q_t|,
  exp(-m_t))`. A fresh state is `C = 0, n = 0, m = 0`.
- `input_gate="sigmoid"` (mLSTMsig, Beck et al., 2025, the TFLA paper): both gates sigmoid. Every weight is <= 1, so no
  max-state is needed: `m` stays 0 (an initial `m` is ignored and the returned `m` is zeros).

Padding: where `mask` is False the step is an identity transition (forget gate "keep" = log f 0, input gate "write
nothing" = log i -inf), so the state after a padded sequence equals the state of the sequence without its pads.
Outputs at padded steps are finite but meaningless. `reset` True at a token clears the state (to the fresh state)
before that token, so packed documents do not see each other.

All arithmetic is float32 whatever the input dtype (float64 inputs stay float64, for tests); outputs come back in the
input dtype, the state stays in the compute dtype.
The chunkwise form follows the algebra of transformers' xLSTM chunkwise kernels (Apache-2.0), written anew with
exact resets, masks and arbitrary lengths.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
INPUT_GATES = ("exp", "sigmoid")


def _check_input_gate(input_gate: str) -> None:
    if input_gate not in INPUT_GATES:
        raise ValueError(f"`input_gate` must be one of {INPUT_GATES}, got {input_gate!r}.")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 inputs: half-precision exponentials and sums would lose the state."""
    return torch.promote_types(x.dtype, torch.float32)


def _initial_state(
    initial_state: MLSTMState | None, batch: int, heads: int, dk: int, dv: int, input_gate: str, x: torch.Tensor
) -> MLSTMState:
    """The (C, n, m) state to start from, in the compute dtype; the sigmoid variant always starts from m = 0."""
    dtype = _compute_dtype(x)
    if initial_state is None:
        return (
            x.new_zeros(batch, heads, dk, dv, dtype=dtype),
            x.new_zeros(batch, heads, dk, dtype=dtype),
            x.new_zeros(batch, heads, dtype=dtype),
        )
    c, n, m = (s.to(dtype) for s in initial_state)
    if input_gate == "sigmoid":
        m = torch.zeros_like(m)
    return c, n, m


def _log_gates(
    i: torch.Tensor, f: torch.Tensor, mask: torch.Tensor | None, input_gate: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log input and log forget gates `[B, T, H]` in `dtype`; padded steps get log i = -inf and log f = 0."""
    log_f = F.logsigmoid(f.to(dtype))
    log_i = i.to(dtype) if input_gate == "exp" else F.logsigmoid(i.to(dtype))
    if mask is not None:
        keep = mask.unsqueeze(-1)
        log_f = torch.where(keep, log_f, torch.zeros_like(log_f))
        log_i = torch.where(keep, log_i, torch.full_like(log_i, -math.inf))
    return log_i, log_f


def naive_recurrent_mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    input_gate: str = "exp",
    scale: float | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """The published equations one token at a time: the test oracle (slow; per-step indexing).

    Padding is handled here the literal way, by keeping the old state where `mask` is False, which checks the gate
    trick the fast forms use. Shapes as in `mlstm`.
    """
    _check_input_gate(input_gate)
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    c, n, m = _initial_state(initial_state, batch, heads, dk, dv, input_gate, q)
    dtype = c.dtype
    outputs = []
    for t in range(length):
        if reset is not None:
            fresh = reset[:, t].view(batch, 1)
            c = torch.where(fresh[..., None, None], torch.zeros_like(c), c)
            n = torch.where(fresh[..., None], torch.zeros_like(n), n)
            m = torch.where(fresh, torch.zeros_like(m), m)
        q_t, k_t, v_t = q[:, t].to(dtype) * scale, k[:, t].to(dtype), v[:, t].to(dtype)
        i_t, f_t = i[:, t].to(dtype), f[:, t].to(dtype)
        if input_gate == "exp":
            log_f = F.logsigmoid(f_t)
            m_new = torch.maximum(log_f + m, i_t)
            f_act = torch.exp(log_f + m - m_new)
            i_act = torch.exp(i_t - m_new)
        else:
            m_new = m
            f_act = torch.sigmoid(f_t)
            i_act = torch.sigmoid(i_t)
        c_new = f_act[..., None, None] * c + i_act[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        n_new = f_act[..., None] * n + i_act[..., None] * k_t
        numerator = torch.einsum("bhk,bhkv->bhv", q_t, c_new)
        denominator = torch.maximum((q_t * n_new).sum(-1).abs(), torch.exp(-m_new)) + eps
        outputs.append(numerator / denominator[..., None])
        if mask is not None:
            real = mask[:, t].view(batch, 1)
            c_new = torch.where(real[..., None, None], c_new, c)
            n_new = torch.where(real[..., None], n_new, n)
            m_new = torch.where(real, m_new, m)
        c, n, m = c_new, n_new, m_new
    return torch.stack(outputs, dim=1).to(q.dtype), (c, n, m)


def recurrent_mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    input_gate: str = "exp",
    scale: float | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """The stabilised step, looped with `unbind`/`stack` (autograd stays linear in T): the decoding path.

    Shapes as in `mlstm`.
    """
    _check_input_gate(input_gate)
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    c, n, m = _initial_state(initial_state, batch, heads, dk, dv, input_gate, q)
    dtype = _compute_dtype(q)
    log_i, log_f = _log_gates(i, f, mask, input_gate, dtype)
    stabilize = input_gate == "exp"
    keeps = (~reset).to(dtype).view(batch, length, 1).unbind(1) if reset is not None else None
    queries, keys, values = (q.to(dtype) * scale).unbind(1), k.to(dtype).unbind(1), v.to(dtype).unbind(1)
    steps = zip(queries, keys, values, log_i.unbind(1), log_f.unbind(1), strict=True)
    outputs = []
    for t, (q_t, k_t, v_t, log_i_t, log_f_t) in enumerate(steps):
        if keeps is not None:
            keep = keeps[t]
            c, n, m = c * keep[..., None, None], n * keep[..., None], m * keep
        m_new = torch.maximum(log_f_t + m, log_i_t) if stabilize else m
        f_act = torch.exp(log_f_t + m - m_new)
        i_act = torch.exp(log_i_t - m_new)
        c = f_act[..., None, None] * c + (i_act[..., None] * k_t)[..., :, None] * v_t[..., None, :]
        n = f_act[..., None] * n + i_act[..., None] * k_t
        m = m_new
        numerator = (q_t.unsqueeze(-2) @ c).squeeze(-2)
        denominator = torch.maximum((q_t * n).sum(-1).abs(), torch.exp(-m)) + eps
        outputs.append(numerator / denominator[..., None])
    return torch.stack(outputs, dim=1).to(q.dtype), (c, n, m)


def chunk_mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    input_gate: str = "exp",
    scale: float | None = None,
    eps: float = 1e-6,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise-parallel mLSTM: attention-like matmuls inside each chunk, a loop over chunks for the small state.

    The sequence is cut into equal chunks of at most `chunk_size` tokens, the last one padded with identity steps, so
    any length works and the final state is exact. Within a chunk, with `b` the running sum of log f since its start:
    - the carried state reaches token t with log weight `b_t + m_prev`, token j with `b_t - b_j + log i_j`;
    - the row stabiliser is the max of those log weights, which is exactly the step form's `m_t`;
    - a reset at token s cuts every weight across s; the fresh state behind it has m = 0, log weight `b_t - b_{s-1}`.
    Shapes as in `mlstm`. Differentiable by autograd.
    """
    _check_input_gate(input_gate)
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    c, n, m = _initial_state(initial_state, batch, heads, dk, dv, input_gate, q)
    stabilize = input_gate == "exp"
    dtype = _compute_dtype(q)
    log_i, log_f = _log_gates(i, f, mask, input_gate, dtype)

    # [B, T, H, D] -> [B, H, N, L, D] with the tail padded by identity steps (log f = 0, log i = -inf); chunks are
    # evened out so that a short input is not padded up to a whole `chunk_size`
    num_chunks = max(1, -(-length // chunk_size))
    size = max(1, -(-length // num_chunks))
    pad = num_chunks * size - length

    def to_chunks(x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        x = x.to(dtype).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad) if x.ndim == 4 else (0, pad), value=value)
        return x.reshape(batch, heads, num_chunks, size, *x.shape[3:])

    q_c, k_c, v_c = to_chunks(q.to(dtype) * scale), to_chunks(k), to_chunks(v)
    log_i, log_f = to_chunks(log_i, -math.inf), to_chunks(log_f)  # [B, H, N, L]
    b = log_f.cumsum(-1)

    causal = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    if reset is None:
        same_segment = causal  # [L, L]
        b_before = torch.zeros_like(b)  # b just before each row's segment start
        carried = None  # every row sees the carried state
        last_segment = torch.ones_like(b, dtype=torch.bool)  # the tokens that reach the chunk's final state
    else:
        starts = torch.cat([reset, reset.new_zeros(batch, pad)], dim=1).view(batch, 1, num_chunks, size)
        segment = starts.long().cumsum(-1)  # 0: still the document carried in from before the chunk
        same_segment = causal & (segment[..., :, None] == segment[..., None, :])  # [B, 1, N, L, L]
        positions = torch.arange(size, device=q.device)
        last_start = torch.where(starts, positions, 0).cummax(-1).values.expand(batch, heads, -1, -1)
        b_before = (b - log_f).gather(-1, last_start)
        carried = segment == 0
        last_segment = segment == segment[..., -1:]

    # --- the state at every chunk boundary: a loop over chunks, everything per token batched beforehand
    # log weight of token j in the chunk's final state (relative to the carried state's scale)
    log_a = (b[..., -1:] - b + log_i).masked_fill(~last_segment, -math.inf)
    if stabilize:
        a_max = log_a.amax(-1)
        a_max_safe = torch.where(torch.isfinite(a_max), a_max, torch.zeros_like(a_max))  # fully padded chunk
    else:
        a_max = a_max_safe = torch.zeros_like(log_a[..., 0])
    # the normaliser n is C's extra column when v gets an extra column of ones: one matmul serves both
    v_c = torch.cat([v_c, torch.ones_like(v_c[..., :1])], dim=-1)  # [B, H, N, L, Dv + 1]
    k_weighted = k_c * torch.exp(log_a - a_max_safe[..., None])[..., None]
    chunk_cn = k_weighted.transpose(-1, -2) @ v_c  # [B, H, N, Dk, Dv + 1]
    # log weight of the carried state at the chunk end: b_L + m if no reset in the chunk, else the fresh state's
    decay_log = b[..., -1]
    tail_log = b[..., -1] - b_before[..., -1]
    keeps = carried[..., -1].expand(batch, heads, -1).unbind(2) if carried is not None else None

    cn = torch.cat([c, n.unsqueeze(-1)], dim=-1)
    states_cn, states_m = [], []
    per_chunk = zip(chunk_cn.unbind(2), a_max.unbind(2), decay_log.unbind(2), tail_log.unbind(2), strict=True)
    for idx, (chunk_cn_k, a_max_k, decay_log_k, tail_log_k) in enumerate(per_chunk):
        states_cn.append(cn)
        states_m.append(m)
        candidate = decay_log_k + m if keeps is None else torch.where(keeps[idx], decay_log_k + m, tail_log_k)
        m_new = torch.maximum(candidate, a_max_k) if stabilize else m
        decay = torch.exp(candidate - m_new)
        if keeps is not None:
            decay = decay * keeps[idx]
        inflow = torch.exp(a_max_k - m_new)
        cn = decay[..., None, None] * cn + inflow[..., None, None] * chunk_cn_k
        m = m_new
    cn_prev, m_prev = torch.stack(states_cn, 2), torch.stack(states_m, 2)

    # --- outputs, all chunks at once
    log_d = (b[..., :, None] - (b - log_i)[..., None, :]).masked_fill(~same_segment, -math.inf)
    base = b - b_before + (m_prev[..., None] if carried is None else torch.where(carried, m_prev[..., None], 0.0))
    m_row = torch.maximum(base, log_d.amax(-1)) if stabilize else torch.zeros_like(base)
    scores = (q_c @ k_c.transpose(-1, -2)) * torch.exp(log_d - m_row[..., None])  # [B, H, N, L, L]
    q_carried = q_c * torch.exp(base - m_row)[..., None]
    if carried is not None:
        q_carried = q_carried * carried[..., None]
    numerator, denominator = (q_carried @ cn_prev + scores @ v_c).split([dv, 1], dim=-1)
    h = numerator / (torch.maximum(denominator.abs(), torch.exp(-m_row)[..., None]) + eps)
    h = h.reshape(batch, heads, num_chunks * size, dv)[:, :, :length].transpose(1, 2)
    return h.to(q.dtype), (cn[..., :dv].contiguous(), cn[..., dv].contiguous(), m)


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    initial_state: MLSTMState | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    input_gate: str = "exp",
    chunk_size: int = 64,
    scale: float | None = None,
    eps: float = 1e-6,
    mode: str | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """mLSTM over a sequence, continuing from `initial_state`; picks the step loop for short inputs (decoding).

    Args:
        q, k: `[B, T, H, Dk]` queries and keys (q is scaled by `scale`, default `Dk ** -0.5`, inside).
        v: `[B, T, H, Dv]` values.
        i, f: `[B, T, H]` input- and forget-gate pre-activations.
        initial_state: (C `[B, H, Dk, Dv]`, n `[B, H, Dk]`, m `[B, H]`), float32; None = fresh (zeros).
        mask: `[B, T]` bool, False at padding: those steps leave the state unchanged.
        reset: `[B, T]` bool, True where a new document starts: the state is cleared before that token.
        input_gate: "exp" (xLSTM, max-state stabilised) or "sigmoid" (mLSTMsig).
        chunk_size: chunk length of the parallel form.
        eps: added to the normaliser, as in xLSTM.
        mode: "chunk", "recurrent" or None (chunk unless the input is shorter than 4 tokens).

    Returns:
        `h` `[B, T, H, Dv]` in q's dtype and the final state (C, n, m), float32.
    """
    if mode is None:
        mode = "recurrent" if q.shape[1] < 4 else "chunk"  # the step loop wins only for a few tokens (decoding)
    if mode == "recurrent":
        return recurrent_mlstm(q, k, v, i, f, initial_state, mask, reset, input_gate, scale, eps)
    if mode == "chunk":
        return chunk_mlstm(q, k, v, i, f, initial_state, mask, reset, input_gate, scale, eps, chunk_size)
    raise ValueError(f"`mode` must be 'chunk', 'recurrent' or None, got {mode!r}.")

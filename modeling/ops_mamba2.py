"""Mamba-2's state-space duality (SSD) scan (Dao & Gu, ICML 2024) as pure functions over tensors.

Per batch row and head the state `S` is a `[P, N]` matrix (head dim x state size). With a per-head scalar decay
`A < 0` and a per-token step `dt >= 0` (already through softplus, bias and clamping):

    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,        y_t = S_t C_t

Shapes (batch-first, like transformers): x `[B, T, H, P]`, dt `[B, T, H]`, A `[H]`, B and C `[B, T, G, N]` shared by
groups of `H / G` consecutive heads (head h reads group `h // (H / G)`, transformers' `repeat_interleave`), state
`[B, H, P, N]` (transformers' `ssm_states` layout). `reset` `[B, T]` is True where a new document starts: the state is
zeroed before that token. A token with `dt = 0` is an exact identity step (no decay, nothing written), which is how
callers express padding. The `D` skip (`y + D x`) belongs to the block, not to the scan.

Four entry points:
- `naive_ssd`: the equation as a literal token loop (test oracle).
- `recurrent_ssd`: a lean token loop for decoding and very short inputs.
- `chunk_ssd`: the chunked form (SSD paper §6) for training and prefill on CPU.
- `ssd`: the dispatcher the block calls; uses `mamba_ssm`'s Triton kernels for CUDA tensors when installed.

Everything is computed in float32 (float64 if the inputs are float64); outputs come back in `x.dtype`, the final state
in the compute dtype.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["chunk_ssd", "mamba_ssm_available", "naive_ssd", "recurrent_ssd", "ssd"]

# Up to this many tokens the token loop beats the chunked form on CPU (measured at H = 24, P = 64, N = 128, one
# thread: 0.30 vs 0.52 ms at T = 1, equal at T = 2, 1.1 vs 0.6 ms at T = 4).
RECURRENT_MAX_LEN = 2
# Chunk length of the chunked form on CPU: forward + backward at T = 2048, H = 24, P = 64, N = 128, one thread, took
# 0.27 / 0.17 / 0.21 / 0.29 s at chunks of 32 / 64 / 128 / 256 (G = 1), 0.32 / 0.24 / 0.27 / 0.39 s (G = 8).
CPU_CHUNK_SIZE = 64
# mamba_ssm's Triton kernels are tuned for this chunk length (Mamba-2's default).
GPU_CHUNK_SIZE = 256


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input already is (lets tests check gradients in double precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _initial_state(initial_state, batch: int, heads: int, head_dim: int, d_state: int, dtype, device) -> torch.Tensor:
    """The given state in the compute dtype, or zeros `[B, H, P, N]`."""
    if initial_state is None:
        return torch.zeros(batch, heads, head_dim, d_state, dtype=dtype, device=device)
    return initial_state.to(dtype)


def _check_shapes(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> None:
    batch, length, heads, _ = x.shape
    groups = B.shape[2]
    if dt.shape != (batch, length, heads) or A.shape != (heads,):
        raise ValueError(
            f"dt must be [B, T, H] = {[batch, length, heads]} and A [H], got {list(dt.shape)}, {list(A.shape)}"
        )
    if B.shape != C.shape or B.shape[:2] != (batch, length) or heads % groups != 0:
        raise ValueError(
            f"B and C must be [B, T, G, N] with G dividing H = {heads}, got {list(B.shape)}, {list(C.shape)}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Token loops
# ----------------------------------------------------------------------------------------------------------------------


def naive_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence written out token by token with heads expanded; slow, the reference for the other forms.

    Args:
        x: `[B, T, H, P]`; dt: `[B, T, H]` (>= 0); A: `[H]` (< 0); B, C: `[B, T, G, N]`.
        initial_state: `[B, H, P, N]` or None (zeros).
        reset: `[B, T]` bool, True where the state is cleared before the token.

    Returns:
        `y` `[B, T, H, P]` in `x.dtype` and the final state `[B, H, P, N]` (float32 / float64).
    """
    _check_shapes(x, dt, A, B, C)
    batch, length, heads, head_dim = x.shape
    dtype = _compute_dtype(x, dt, B, C)
    per_group = heads // B.shape[2]
    out_dtype = x.dtype
    x, dt, A = x.to(dtype), dt.to(dtype), A.to(dtype)
    B = B.to(dtype).repeat_interleave(per_group, dim=2)  # [B, T, H, N]: head h reads group h // per_group
    C = C.to(dtype).repeat_interleave(per_group, dim=2)
    state = _initial_state(initial_state, batch, heads, head_dim, B.shape[-1], dtype, x.device)
    outputs = []
    for t in range(length):
        if reset is not None:
            state = state * (~reset[:, t].bool()).to(dtype)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        write = torch.einsum("bhp,bhn->bhpn", dt[:, t, :, None] * x[:, t], B[:, t])
        state = decay * state + write
        outputs.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(outputs, dim=1) if outputs else x.new_zeros(batch, 0, heads, head_dim)
    return y.to(out_dtype), state


def recurrent_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token loop for decoding and short inputs. Same arguments and returns as `naive_ssd`.

    Heads stay grouped (`[B, G, H/G, P, N]`) so B and C broadcast over a group's heads instead of being copied;
    per token: one multiply-add for the state and one batched matrix-vector product for the output.
    """
    _check_shapes(x, dt, A, B, C)
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    per_group = heads // groups
    dtype = _compute_dtype(x, dt, B, C)
    state = _initial_state(initial_state, batch, heads, head_dim, d_state, dtype, x.device)
    state = state.reshape(batch, groups, per_group, head_dim, d_state)
    decay = torch.exp(dt.to(dtype) * A.to(dtype))  # [B, T, H]
    if reset is not None:
        decay = decay * (~reset.bool()).to(dtype)[..., None]  # decay 0 clears the state exactly
    decay = decay.reshape(batch, length, groups, per_group, 1, 1)
    u = (x.to(dtype) * dt.to(dtype)[..., None]).reshape(batch, length, groups, per_group, head_dim, 1)
    B = B.to(dtype).reshape(batch, length, groups, 1, 1, d_state)
    C = C.to(dtype).reshape(batch, length, groups, 1, d_state, 1)
    outputs = []
    for t in range(length):
        state = torch.addcmul(state * decay[:, t], u[:, t], B[:, t])
        outputs.append(torch.matmul(state, C[:, t]))  # [B, G, H/G, P, 1]
    if length == 0:
        y = x.new_zeros(batch, 0, heads, head_dim)
    else:
        y = torch.stack(outputs, dim=1).reshape(batch, length, heads, head_dim)
    return y.to(x.dtype), state.reshape(batch, heads, head_dim, d_state)


# ----------------------------------------------------------------------------------------------------------------------
# Chunked form
# ----------------------------------------------------------------------------------------------------------------------
#
# Within a chunk of Q tokens let gam_i be the cumulative log decay (sum of dt A) since the chunk start, u_j = dt_j x_j,
# and L_ij = exp(gam_i - gam_j) for j <= i in the same document (0 otherwise). With S the state entering the chunk:
#   y_i     = sum_j L_ij (C_i . B_j) u_j  +  f_i exp(gam_i) S C_i           (f_i = 1 while no reset yet in the chunk)
#   S_next  = a S + sum_j exp(gam_Q - gam_j) [j in the last document] u_j B_j^T,     a = f_Q exp(gam_Q)
# Only the last line is sequential over chunks (one multiply-add on [P, N] states); the rest is batched over chunks.
#
# Heads are kept grouped as [G, R = H/G] so that C B^T is computed once per group and B, C are never copied per head;
# states are held transposed, [N, R*P] per group, so the two state products are single GEMMs over a group's heads.


def chunk_ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    chunk_size: int = CPU_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form; exact up to rounding, differentiable with autograd. For training and prefill.

    Args:
        x: `[B, T, H, P]`; dt: `[B, T, H]` (>= 0); A: `[H]` (< 0); B, C: `[B, T, G, N]`.
        initial_state: `[B, H, P, N]` or None (zeros).
        reset: `[B, T]` bool, True where the state is cleared before the token (document starts in packed rows).
        chunk_size: tokens per chunk; T is padded internally with identity steps (dt = 0).

    Returns:
        `y` `[B, T, H, P]` in `x.dtype` and the final state `[B, H, P, N]` (float32 / float64).
    """
    _check_shapes(x, dt, A, B, C)
    batch, length, heads, head_dim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    per_group = heads // groups
    dtype = _compute_dtype(x, dt, B, C)
    state = _initial_state(initial_state, batch, heads, head_dim, d_state, dtype, x.device)
    if length == 0:
        return x.new_zeros(batch, 0, heads, head_dim), state
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length

    dt = dt.to(dtype)
    u = x.to(dtype) * dt[..., None]
    log_decay = dt * A.to(dtype)
    if pad:  # dt = 0 steps: no decay, nothing written
        u = F.pad(u, (0, 0, 0, 0, 0, pad))
        log_decay = F.pad(log_decay, (0, 0, 0, pad))
    shape = (batch, num_chunks, chunk, groups, per_group)
    u = u.reshape(*shape, head_dim)
    u_by_token = u.permute(0, 1, 3, 2, 4, 5).reshape(batch, num_chunks, groups, chunk, per_group * head_dim)
    gam = log_decay.reshape(shape).permute(0, 1, 3, 4, 2).cumsum(-1)  # [b, c, G, R, Q]

    def by_group(t: torch.Tensor) -> torch.Tensor:  # [b, T, G, N] -> [b, c, G, Q, N]
        t = t.to(dtype)
        if pad:
            t = F.pad(t, (0, 0, 0, 0, 0, pad))
        # contiguous once here: with G > 1 the transposed view would be copied again by every matmul that reads it
        return t.reshape(batch, num_chunks, chunk, groups, d_state).transpose(2, 3).contiguous()

    B, C = by_group(B), by_group(C)

    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    first_doc = last_doc = None
    if reset is not None and bool(reset.any()):
        starts = F.pad(reset.to(torch.int32), (0, pad)).reshape(batch, num_chunks, 1, 1, chunk)
        segment = starts.cumsum(-1)  # document index within the chunk
        causal = causal & (segment[..., :, None] == segment[..., None, :])
        first_doc, last_doc = segment == 0, segment == segment[..., -1:]

    state = state.reshape(batch, groups, per_group, head_dim, d_state).permute(0, 1, 4, 2, 3)  # [b, G, N, R, P]
    u_by_token = u_by_token.unflatten(-1, (per_group, head_dim))  # [b, c, G, Q, R, P]
    inputs = (u_by_token, gam, B, C, state, causal, first_doc, last_doc)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs[:5]):
        y, state = _ChunkSSD.apply(*inputs)
    else:
        y, state, _ = _chunk_forward(*inputs, keep=False)
    y = y.transpose(2, 3).reshape(batch, num_chunks * chunk, heads, head_dim)[:, :length]
    final = state.permute(0, 1, 3, 4, 2).reshape(batch, heads, head_dim, d_state)
    return y.to(x.dtype), final


def _chunk_forward(u, gam, B, C, state, causal, first_doc, last_doc, keep: bool):
    """Chunk-layout forward. u `[b, c, G, Q, R, P]`, gam `[b, c, G, R, Q]`, B and C `[b, c, G, Q, N]`, state
    `[b, G, N, R, P]`; masks broadcast to `[b, c, 1, 1, Q(, Q)]`. Returns y `[b, c, G, Q, R, P]`, the final state and,
    if `keep`, what the backward needs (every chunk's entering state included)."""
    batch, num_chunks, groups, chunk, per_group, head_dim = u.shape
    d_state = B.shape[-1]
    # intra-chunk: (C B^T * L) u
    L = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp_()
    CB = torch.matmul(C, B.mT)  # [b, c, G, Q, Q]
    scores = CB.unsqueeze(3) * L  # [b, c, G, R, Q, Q]
    u_by_head = u.transpose(3, 4).contiguous()  # [b, c, G, R, Q, P], copied once and kept for the backward
    y = torch.matmul(scores, u_by_head).transpose(3, 4)  # [b, c, G, Q, R, P]

    # what each chunk writes into the state, and how much of the entering state survives each position
    decay_in = gam.exp()
    decay_out = (gam[..., -1:] - gam).exp_()
    if first_doc is not None:
        decay_in = decay_in * first_doc
        decay_out = decay_out * last_doc
    carry = decay_in[..., -1]  # [b, c, G, R]
    decay_in_t, decay_out_t = decay_in.transpose(-1, -2)[..., None], decay_out.transpose(-1, -2)[..., None]
    u_weighted = (u * decay_out_t).flatten(-2)  # what each token writes, decayed to the chunk end
    written = torch.matmul(B.mT, u_weighted)  # [b, c, G, N, R*P]

    # the sequential part: the state entering every chunk
    carry_b = carry[:, :, :, None, :, None]
    written = written.view(batch, num_chunks, groups, d_state, per_group, head_dim)
    entering = torch.empty_like(written) if keep else None
    for n in range(num_chunks):
        if keep:
            entering[:, n] = state
            state = torch.addcmul(written[:, n], state, carry_b[:, n])
        else:
            y_off = torch.matmul(C[:, n], state.flatten(-2)).view(batch, groups, chunk, per_group, head_dim)
            y[:, n].addcmul_(y_off, decay_in_t[:, n])
            state = torch.addcmul(written[:, n], state, carry_b[:, n])
    if not keep:
        return y, state, None
    # inter-chunk: exp(gam_i) f_i S C_i
    CS = torch.matmul(C, entering.flatten(-2)).view(batch, num_chunks, groups, chunk, per_group, head_dim)
    y = torch.addcmul(y, CS, decay_in_t)
    return y, state, (u, u_by_head, u_weighted, B, C, L, CB, scores, decay_in, decay_out, carry, entering, CS)


def _chunk_backward(dy, dfinal, saved):
    """Gradients of `_chunk_forward` w.r.t. u, gam, B, C and the initial state (derivation beside the forward)."""
    u, u_by_head, u_weighted, B, C, L, CB, scores, decay_in, decay_out, carry, entering, CS = saved
    batch, num_chunks, groups, chunk, per_group, head_dim = u.shape
    decay_in_t, decay_out_t = decay_in.transpose(-1, -2)[..., None], decay_out.transpose(-1, -2)[..., None]
    # y_off = CS * decay_in, CS = C entering
    dCS = (dy * decay_in_t).flatten(-2)  # [b, c, G, Q, R*P]
    d_decay_in = (dy * CS).sum(-1).transpose(-1, -2)  # [b, c, G, R, Q]
    dC = torch.matmul(dCS, entering.flatten(-2).mT)
    d_entering = torch.matmul(C.mT, dCS).view_as(entering)
    # reverse recurrence: S_{n+1} = carry_n S_n + written_n
    d_state = torch.zeros_like(entering[:, 0]) if dfinal is None else dfinal.clone()
    d_written = torch.empty_like(entering)
    d_carry = torch.empty_like(carry)
    carry_b = carry[:, :, :, None, :, None]
    for n in range(num_chunks - 1, -1, -1):
        d_written[:, n] = d_state
        d_carry[:, n] = (entering[:, n] * d_state).sum((-3, -1))
        d_state = d_state.mul_(carry_b[:, n]).add_(d_entering[:, n])
    # written = B^T (u * decay_out)
    d_written = d_written.flatten(-2)
    d_weighted = torch.matmul(B, d_written).view_as(u)
    dB = torch.matmul(u_weighted, d_written.mT)
    du = d_weighted * decay_out_t
    d_decay_out = (d_weighted * u).sum(-1).transpose(-1, -2)  # [b, c, G, R, Q]
    # y_diag = (CB * L) u
    dy_by_head = dy.transpose(3, 4).contiguous()  # read by two matmuls: one copy instead of two
    d_scores = torch.matmul(dy_by_head, u_by_head.mT)  # [b, c, G, R, Q, Q]
    du += torch.matmul(scores.mT, dy_by_head).transpose(3, 4)
    dCB = (d_scores * L).sum(3)
    dC += torch.matmul(dCB, B)
    dB += torch.matmul(dCB.mT, C)
    # log decays: d exp(x) = exp(x) dx; L_ij depends on gam_i - gam_j, decay_out on gam_Q - gam_j
    dLL = d_scores.mul_(CB.unsqueeze(3)).mul_(L)
    d_gam = dLL.sum(-1) - dLL.sum(-2) + d_decay_in * decay_in
    d_out = d_decay_out * decay_out
    d_gam -= d_out
    d_gam[..., -1] += d_out.sum(-1) + d_carry * carry
    return du, d_gam, dB, dC, d_state


class _ChunkSSD(torch.autograd.Function):
    """The chunk scan with a hand-written backward. Measured at T = 2048, H = 24, P = 64, N = 128, one thread: 5-10%
    faster forward + backward than autograd through the same forward (0.184 vs 0.203 s at G = 1, 0.240 vs 0.250 s at
    G = 8); autograd through the chunk loop itself was not the bottleneck once the loop iterates over `unbind`
    slices. Without gradients the forward never materialises the per-chunk states (long prefills stay O(T))."""

    @staticmethod
    def forward(ctx, u, gam, B, C, state, causal, first_doc, last_doc):
        y, final, saved = _chunk_forward(u, gam, B, C, state, causal, first_doc, last_doc, keep=True)
        ctx.save_for_backward(*saved)
        return y, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dfinal):
        with torch.autocast(device_type=dy.device.type, enabled=False):  # float32, like the forward
            du, d_gam, dB, dC, d_state = _chunk_backward(dy.contiguous(), dfinal, ctx.saved_tensors)
        return du, d_gam, dB, dC, d_state, None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------------------------

_MAMBA_SSM_SCAN = None
_MAMBA_SSM_TRIED = False


def _mamba_ssm_scan():
    """`mamba_ssm`'s `mamba_chunk_scan_combined`, imported once on first use; None if it (or Triton) is unusable."""
    global _MAMBA_SSM_SCAN, _MAMBA_SSM_TRIED
    if not _MAMBA_SSM_TRIED:
        _MAMBA_SSM_TRIED = True
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            _MAMBA_SSM_SCAN = mamba_chunk_scan_combined
        except Exception:  # ImportError, or Triton failing to initialise: fall back to torch
            _MAMBA_SSM_SCAN = None
    return _MAMBA_SSM_SCAN


def mamba_ssm_available() -> bool:
    """Whether `mamba_ssm`'s Triton SSD kernel can be used (needs CUDA)."""
    return torch.cuda.is_available() and _mamba_ssm_scan() is not None


def _mamba_ssm_ssd(scan, x, dt, A, B, C, initial_state, reset, chunk_size):
    """Run `mamba_chunk_scan_combined` (its state layout `[B, H, P, N]` is ours). Document resets become its
    `seq_idx` (document index per token): the kernel zeroes the carried state where the index changes."""
    seq_idx = None if reset is None else reset.to(torch.int32).cumsum(-1, dtype=torch.int32).contiguous()
    y, final = scan(
        x.contiguous(),
        dt.float(),
        A.float(),
        B.to(x.dtype),
        C.to(x.dtype),
        chunk_size or GPU_CHUNK_SIZE,
        initial_states=None if initial_state is None else initial_state.float(),
        seq_idx=seq_idx,
        return_final_states=True,
    )
    return y.to(x.dtype), final.to(_compute_dtype(x, dt, B, C))


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan, picking the implementation per call from the tensors' device and length.

    CUDA tensors with `mamba_ssm` installed and more than `RECURRENT_MAX_LEN` tokens: `mamba_chunk_scan_combined`
    (document resets become its `seq_idx`; resets with a carried initial state stay on the torch path). Not run on a
    GPU yet: the adapter is tested on CPU with a stand-in kernel. Otherwise the token loop up to `RECURRENT_MAX_LEN`
    tokens (decoding) and the chunked form beyond (chunk_size default 64 on CPU, 256 on GPU). Arguments and returns
    as `chunk_ssd`.
    """
    length = x.shape[1]
    has_reset = reset is not None and bool(reset.any())
    # resets together with a carried state stay on the torch path: not every mamba_ssm release takes both
    if x.is_cuda and length > RECURRENT_MAX_LEN and not (has_reset and initial_state is not None):
        scan = _mamba_ssm_scan()
        if scan is not None:
            return _mamba_ssm_ssd(scan, x, dt, A, B, C, initial_state, reset if has_reset else None, chunk_size)
    # The torch paths compute in float32 on purpose (the state accumulates over thousands of steps); autocast would
    # turn their matmuls into bf16 ones, so it is switched off inside and the output cast back to x.dtype.
    with torch.autocast(device_type=x.device.type, enabled=False):
        if length <= RECURRENT_MAX_LEN:
            return recurrent_ssd(x, dt, A, B, C, initial_state=initial_state, reset=reset)
        if chunk_size is None:
            chunk_size = GPU_CHUNK_SIZE if x.is_cuda else CPU_CHUNK_SIZE
        return chunk_ssd(x, dt, A, B, C, initial_state=initial_state, reset=reset, chunk_size=chunk_size)

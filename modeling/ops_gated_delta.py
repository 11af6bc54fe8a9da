"""The gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh, ICLR 2025) as pure functions over tensors.

Per batch row and head the state `S` is a `[Dk, Dv]` matrix. With `alpha_t = exp(g_t)`:

    S_t = alpha_t S_{t-1} - beta_t k_t (k_t^T alpha_t S_{t-1}) + beta_t k_t v_t^T,      o_t = S_t^T (scale q_t)

Shapes (batch-first, like transformers and fla): q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, beta `[B, T, H]`,
state `[B, H, Dk, Dv]` (key dim first). q and k are expected to be L2-normalised by the caller. `reset` `[B, T]` is
True where a new document starts: the state is zeroed before that token. A token with `beta = 0, g = 0` is an exact
identity step, which is how callers express padding.

Four entry points:
- `naive_recurrent_gated_delta_rule`: the equation as a literal token loop (test oracle).
- `recurrent_gated_delta_rule`: a lean token loop for decoding and very short inputs.
- `chunk_gated_delta_rule`: the chunked WY / UT-transform form (GDN paper §3.3) with a hand-written backward; the fast
  path for training and prefill on CPU.
- `gated_delta_rule`: the dispatcher the model calls; uses fla's Triton kernels on CUDA when fla is installed.

Everything is computed in float32 (float64 if the inputs are float64); outputs come back in `v.dtype`, the final state
in the compute dtype.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = [
    "chunk_gated_delta_rule",
    "fla_available",
    "gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule",
]

# Below this many tokens the token loop beats the chunked form (fewer, smaller ops).
RECURRENT_MAX_LEN = 16


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input already is (lets tests check gradients in double precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _initial_state(
    initial_state: torch.Tensor | None, batch: int, heads: int, dk: int, dv: int, dtype: torch.dtype, device
) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(batch, heads, dk, dv, dtype=dtype, device=device)
    return initial_state.to(dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Token loops
# ----------------------------------------------------------------------------------------------------------------------


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence written out token by token; slow, meant as the reference the other forms are tested against.

    Args:
        q, k: `[B, T, H, Dk]`; v: `[B, T, H, Dv]`; g (log decay, <= 0), beta: `[B, T, H]`.
        scale: query scale, default `Dk ** -0.5`.
        initial_state: `[B, H, Dk, Dv]` or None (zeros).
        reset: `[B, T]` bool, True where the state is cleared before the token.

    Returns:
        `o` `[B, T, H, Dv]` in `v.dtype` and the final state `[B, H, Dk, Dv]` (float32 / float64).
    """
    batch, length, heads, dk = k.shape
    dv = v.shape[-1]
    dtype = _compute_dtype(q, k, v)
    scale = dk**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    state = _initial_state(initial_state, batch, heads, dk, dv, dtype, v.device)
    outputs = []
    for t in range(length):
        if reset is not None:
            state = state * (~reset[:, t]).to(dtype)[:, None, None, None]
        decayed = g[:, t].exp()[..., None, None] * state  # alpha_t S_{t-1}
        k_t, v_t, beta_t = k[:, t], v[:, t], beta[:, t][..., None, None]
        read = torch.einsum("bhk,bhkv->bhv", k_t, decayed)  # k_t^T alpha_t S_{t-1}
        state = (
            decayed
            - beta_t * torch.einsum("bhk,bhv->bhkv", k_t, read)
            + beta_t * torch.einsum("bhk,bhv->bhkv", k_t, v_t)
        )
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, scale * q[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(batch, 0, heads, dv)
    return o.to(v.dtype), state


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token loop for decoding and short inputs (T up to a few dozen). Same arguments and returns as the naive loop.

    Five tensor ops per token on `[B*H, ., .]` batches; inputs are split with `unbind` and outputs joined with `stack`,
    so autograd stays linear in T.
    """
    batch, length, heads, dk = k.shape
    dv = v.shape[-1]
    bh = batch * heads
    dtype = _compute_dtype(q, k, v)
    scale = dk**-0.5 if scale is None else scale
    state = _initial_state(initial_state, batch, heads, dk, dv, dtype, v.device).reshape(bh, dk, dv)
    if length == 0:
        return v.new_zeros(batch, 0, heads, dv), state.reshape(batch, heads, dk, dv)

    def per_step(x: torch.Tensor, *tail: int) -> tuple[torch.Tensor, ...]:
        # [B, T, H, ...] -> T tensors [B*H, *tail]
        return x.to(dtype).transpose(0, 1).reshape(length, bh, *tail).unbind(0)

    alpha = g.to(dtype).exp()
    if reset is not None:
        alpha = alpha * (~reset).to(dtype)[:, :, None]  # alpha = 0 clears the state exactly
    qs = per_step(q * scale, 1, dk)
    ks = per_step(k, 1, dk)
    kts = per_step(k, dk, 1)
    betas = per_step(beta, 1, 1)
    vbs = per_step(v.to(dtype) * beta.to(dtype)[..., None], 1, dv)
    alphas = per_step(alpha, 1, 1)
    outputs = []
    for q_t, k_t, kt_t, beta_t, vb_t, alpha_t in zip(qs, ks, kts, betas, vbs, alphas, strict=True):
        state = state * alpha_t
        update = torch.addcmul(vb_t, beta_t, torch.bmm(k_t, state), value=-1.0)  # beta (v - S^T k)
        state = torch.baddbmm(state, kt_t, update)
        outputs.append(torch.bmm(q_t, state))
    o = torch.stack(outputs, dim=0).reshape(length, batch, heads, dv).transpose(0, 1)
    return o.to(v.dtype), state.reshape(batch, heads, dk, dv)


# ----------------------------------------------------------------------------------------------------------------------
# Chunked form
# ----------------------------------------------------------------------------------------------------------------------
#
# Within a chunk of C tokens let gam_i be the cumulative log decay since the chunk start and L_ij = exp(gam_i - gam_j)
# for j <= i in the same document (0 otherwise). With the carried state S entering the chunk:
#   A = strict_lower(diag(beta) (K K^T * L)),   T = (I + A)^-1
#   U = T diag(beta) V,   W = T diag(beta * f * exp(gam)) K            (f_i = 1 while no reset has happened in the chunk)
#   V' = U - W S                                                       (the pseudo-values the chunk writes)
#   O  = (Q * f exp(gam)) S + ((Q K^T) * L) V'
#   S <- a S + (K * exp(gam_C - gam) * same_doc_as_last)^T V',         a = f_C exp(gam_C)
# Only the last two lines are sequential over chunks; everything else is one batched op over all chunks.


def _to_chunks(x: torch.Tensor, num_chunks: int, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """`[B, T, H, *D]` -> `[N, B*H, C, *D]` (zero padded at the end), one copy."""
    batch, length, heads = x.shape[:3]
    tail = x.shape[3:]
    x = x.to(dtype)
    pad = num_chunks * chunk - length
    if pad:
        x = F.pad(x, (0, 0) * len(tail) + (0, 0, 0, pad))
    x = x.reshape(batch, num_chunks, chunk, heads, *tail).transpose(2, 3).transpose(0, 1)
    return x.reshape(num_chunks, batch * heads, chunk, *tail)


def _from_chunks(x: torch.Tensor, batch: int, heads: int, length: int) -> torch.Tensor:
    """`[N, B*H, C, D]` -> `[B, T, H, D]`."""
    num_chunks, _, chunk, dim = x.shape
    x = x.reshape(num_chunks, batch, heads, chunk, dim).permute(1, 0, 3, 2, 4)
    return x.reshape(batch, num_chunks * chunk, heads, dim)[:, :length]


def _chunk_masks(
    segment: torch.Tensor | None, chunk: int, device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Where L may be non-zero (j <= i, same document), the `f` mask and the same-document-as-last-token mask."""
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=device).tril()
    if segment is None:
        return causal, None, None
    same = segment[..., :, None] == segment[..., None, :]
    return causal & same, segment == 0, segment == segment[..., -1:]


def _chunk_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gam: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    segment: torch.Tensor | None,
    keep: bool,
):
    """Chunk-layout forward. q (already scaled), k `[N, BH, C, Dk]`; v `[N, BH, C, Dv]`; gam, beta `[N, BH, C]`;
    state `[BH, Dk, Dv]`; segment `[N, BH, C]` (document index within the chunk) or None.

    Returns o `[N, BH, C, Dv]`, the final state and, if `keep`, what the backward needs.
    """
    num_chunks, bh, chunk, dk = k.shape
    dv = v.shape[-1]
    allowed, first_doc, last_doc = _chunk_masks(segment, chunk, q.device)
    L = (gam[..., :, None] - gam[..., None, :]).masked_fill_(~allowed, float("-inf")).exp_()
    KL = torch.matmul(k, k.mT).mul_(L).tril_(-1)  # K K^T * L below the diagonal
    A = KL * beta[..., :, None]
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    # explicit inverse of the unit lower-triangular I + A: a solve against I then matmuls is ~3x faster on CPU than
    # solving against the (wider) right-hand sides, and the backward reuses it
    Tinv = torch.linalg.solve_triangular(A, eye.expand_as(A), upper=False, unitriangular=True)
    decay = gam.exp()
    if first_doc is not None:
        decay = decay * first_doc
    kdecay = (gam[..., -1:] - gam).exp()
    carry = decay[..., -1]  # a, per (chunk, row)
    if last_doc is not None:
        kdecay = kdecay * last_doc
    U = torch.matmul(Tinv, v * beta[..., None])
    W = torch.matmul(Tinv, k * (beta * decay)[..., None])
    P = torch.matmul(q, k.mT).mul_(L)
    Kd = k * kdecay[..., None]

    states = torch.empty(num_chunks + 1, bh, dk, dv, dtype=q.dtype, device=q.device)
    states[0] = state
    new_v = torch.empty_like(U)
    carry3 = carry[..., None, None]
    Kd_t = Kd.mT
    for n in range(num_chunks):
        torch.baddbmm(U[n], W[n], states[n], alpha=-1.0, out=new_v[n])
        torch.baddbmm(states[n] * carry3[n], Kd_t[n], new_v[n], out=states[n + 1])
    Qd = q * decay[..., None]
    o = torch.matmul(Qd, states[:-1]).add_(torch.matmul(P, new_v))
    saved = (q, k, v, beta, L, KL, Tinv, U, W, P, Qd, Kd, decay, kdecay, carry3, states, new_v) if keep else None
    return o, states[-1], saved


def _chunk_backward(do: torch.Tensor, dfinal: torch.Tensor | None, saved):
    """Gradients of `_chunk_forward` w.r.t. q, k, v, gam, beta and the initial state (derivation in the comments)."""
    q, k, v, beta, L, KL, Tinv, U, W, P, Qd, Kd, decay, kdecay, carry3, states, new_v = saved
    num_chunks = q.shape[0]
    entering = states[:-1]  # state entering each chunk
    # the parts of dV' and dS that do not depend on the later chunks, batched over all chunks
    dP = torch.matmul(do, new_v.mT)
    d_new_v_local = torch.matmul(P.mT, do)
    d_state_local = torch.matmul(Qd.mT, do)
    # reverse scan: dV'_n = P^T dO_n + Kd_n dS_{n+1};  dS_n = a_n dS_{n+1} + Qd^T dO_n - W_n^T dV'_n
    dstates = torch.empty_like(states)
    if dfinal is None:
        dstates[-1].zero_()
    else:
        dstates[-1] = dfinal
    d_new_v = torch.empty_like(new_v)
    W_t = W.mT
    for n in range(num_chunks - 1, -1, -1):
        torch.baddbmm(d_new_v_local[n], Kd[n], dstates[n + 1], out=d_new_v[n])
        torch.baddbmm(
            torch.addcmul(d_state_local[n], dstates[n + 1], carry3[n]), W_t[n], d_new_v[n], alpha=-1.0, out=dstates[n]
        )
    leaving = dstates[1:]  # dS_{n+1}
    dKd = torch.matmul(new_v, leaving.mT)
    dcarry = (entering * leaving).sum((-2, -1))
    dQd = torch.matmul(do, entering.mT)
    dW = torch.matmul(d_new_v, entering.mT).neg_()  # V' = U - W S
    dU = d_new_v

    # U = T (beta V), W = T (beta decay K): dRHS = T^T dY and dA = -dRHS Y^T (A enters through T = (I + A)^-1)
    Tinv_t = Tinv.mT
    dVb = torch.matmul(Tinv_t, dU)
    dKb = torch.matmul(Tinv_t, dW)
    dA = torch.matmul(dVb, U.mT).add_(torch.matmul(dKb, W.mT)).neg_().tril_(-1)

    # P = (Q K^T) * L and A = diag(beta) (K K^T * L): gradients reaching Q, K through the products
    dPL = dP * L
    dKK = dA * L * beta[..., :, None]
    dq = torch.matmul(dPL, k).addcmul_(dQd, decay[..., None])
    dk = (
        torch.matmul(dPL.mT, q)
        .add_(torch.matmul(dKK + dKK.mT, k))
        .addcmul_(dKd, kdecay[..., None])
        .addcmul_(dKb, (beta * decay)[..., None])
    )
    dv = dVb * beta[..., None]
    dkb_k = (dKb * k).sum(-1)
    dbeta = (dVb * v).sum(-1).addcmul_(dkb_k, decay).add_((dA * KL).sum(-1))

    # log-decay: every factor exp(x) contributes d/dx = grad * value
    dLL = dP * P + dA * KL * beta[..., :, None]  # dL * L
    kd_term = (dKd * Kd).sum(-1)
    dgam = (
        (dQd * Qd).sum(-1)
        + dkb_k * decay * beta
        + dLL.sum(-1)
        - dLL.sum(-2)
        - kd_term
    )
    dgam[..., -1] += kd_term.sum(-1) + dcarry * carry3[..., 0, 0]
    return dq, dk, dv, dgam, dbeta, dstates[0]


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """Autograd through the chunk scan with a hand-written backward: ~2-4x faster than autograd through the loop."""

    @staticmethod
    def forward(ctx, q, k, v, gam, beta, state, segment):
        o, final, saved = _chunk_forward(q, k, v, gam, beta, state, segment, keep=True)
        ctx.save_for_backward(*saved)
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dfinal):
        dq, dk, dv, dgam, dbeta, dstate = _chunk_backward(do.contiguous(), dfinal, ctx.saved_tensors)
        return dq, dk, dv, dgam, dbeta, dstate, None


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked parallel form (WY representation); exact up to rounding, autograd-capable. For training and prefill.

    Args:
        q, k: `[B, T, H, Dk]`; v: `[B, T, H, Dv]`; g (log decay, <= 0), beta: `[B, T, H]`.
        scale: query scale, default `Dk ** -0.5`.
        initial_state: `[B, H, Dk, Dv]` or None (zeros).
        reset: `[B, T]` bool, True where the state is cleared before the token (document starts in packed rows).
        chunk_size: tokens per chunk; T is padded internally with identity steps. 32 is fastest on CPU.

    Returns:
        `o` `[B, T, H, Dv]` in `v.dtype` and the final state `[B, H, Dk, Dv]` (float32 / float64).
    """
    batch, length, heads, dk = k.shape
    dv = v.shape[-1]
    dtype = _compute_dtype(q, k, v)
    scale = dk**-0.5 if scale is None else scale
    state = _initial_state(initial_state, batch, heads, dk, dv, dtype, v.device)
    if length == 0:
        return v.new_zeros(batch, 0, heads, dv), state
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    segment = None
    if reset is not None and bool(reset.any()):
        # document index within each chunk; only the masks use it, so reset-free inputs take the cheaper path
        starts = F.pad(reset.to(torch.int32), (0, num_chunks * chunk - length)).reshape(batch, num_chunks, 1, chunk)
        segment = starts.cumsum(-1).expand(-1, -1, heads, -1).transpose(0, 1).reshape(num_chunks, batch * heads, chunk)
    gam = _to_chunks(g, num_chunks, chunk, dtype).cumsum(-1)
    o, final = _ChunkGatedDeltaRule.apply(
        _to_chunks(q * scale, num_chunks, chunk, dtype),
        _to_chunks(k, num_chunks, chunk, dtype),
        _to_chunks(v, num_chunks, chunk, dtype),
        gam,
        _to_chunks(beta, num_chunks, chunk, dtype),
        state.reshape(batch * heads, dk, dv),
        segment,
    )
    return _from_chunks(o, batch, heads, length).to(v.dtype), final.reshape(batch, heads, dk, dv)


# ----------------------------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------------------------

_FLA_KERNELS: tuple | None = None
_FLA_TRIED = False


def _fla_kernels() -> tuple | None:
    """fla's (chunk, fused_recurrent) kernels, imported once on first use; None if fla (or Triton) is unusable."""
    global _FLA_KERNELS, _FLA_TRIED
    if not _FLA_TRIED:
        _FLA_TRIED = True
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

            _FLA_KERNELS = (fla_chunk, fla_recurrent)
        except Exception:  # ImportError, or Triton failing to initialise: fall back to torch
            _FLA_KERNELS = None
    return _FLA_KERNELS


def fla_available() -> bool:
    """Whether fla's Triton kernels can be used (needs CUDA; fla's kernels crash on CPU-only machines)."""
    return torch.cuda.is_available() and _fla_kernels() is not None


def _fla_gated_delta_rule(kernels, q, k, v, g, beta, scale, initial_state, reset):
    """Run fla's kernels. Document resets become varlen segments (`cu_seqlens`) over the flattened batch."""
    fla_chunk, fla_recurrent = kernels
    batch, length, heads, dk = k.shape
    dv = v.shape[-1]
    dtype = v.dtype
    q, k = q.to(dtype), k.to(dtype)
    state = _initial_state(initial_state, batch, heads, dk, dv, torch.float32, v.device)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta, state))
    if reset is None or not bool(reset.any()):
        # fla's fused recurrent kernel has no backward: use it only for inference on short inputs
        kernel = fla_recurrent if length <= RECURRENT_MAX_LEN and not needs_grad else fla_chunk
        o, final = kernel(q, k, v, g, beta, scale=scale, initial_state=state, output_final_state=True)
        return o.to(dtype), final.float()
    # one segment per (row, document); a segment carries the row's initial state only if it is the row's first one
    starts = reset.clone()
    starts[:, 0] = True
    flat_starts = starts.reshape(-1).nonzero().squeeze(-1)
    cu_seqlens = F.pad(flat_starts, (0, 1), value=batch * length)
    row_of_segment = flat_starts // length
    carries_state = ~reset.reshape(-1)[flat_starts]  # first segment of a row, not itself a reset
    seg_state = state[row_of_segment] * carries_state.to(state.dtype)[:, None, None, None]
    flat = [x.reshape(1, batch * length, *x.shape[2:]) for x in (q, k, v, g, beta)]
    o, seg_final = fla_chunk(
        *flat, scale=scale, initial_state=seg_state, output_final_state=True, cu_seqlens=cu_seqlens
    )
    last_segment = torch.bucketize(
        torch.arange(1, batch + 1, device=v.device) * length - 1, flat_starts, right=True
    ) - 1
    return o.reshape(batch, length, heads, dv).to(dtype), seg_final[last_segment].float()


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule, picking the implementation per call from the tensors' device and length.

    CUDA with fla installed: fla's Triton kernels (resets become `cu_seqlens` segments). Otherwise the token loop for
    T <= 16 and the chunked form beyond (chunk_size default 32 on CPU, 64 on GPU).

    Args and returns as `chunk_gated_delta_rule`: q, k `[B, T, H, Dk]`, v `[B, T, H, Dv]`, g, beta `[B, T, H]`,
    initial_state `[B, H, Dk, Dv]`, reset `[B, T]` -> o `[B, T, H, Dv]` (v.dtype), final state (float32).
    """
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    if q.is_cuda:
        kernels = _fla_kernels()
        if kernels is not None:
            return _fla_gated_delta_rule(kernels, q, k, v, g, beta, scale, initial_state, reset)
    if k.shape[1] <= RECURRENT_MAX_LEN:
        return recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state, reset=reset)
    if chunk_size is None:
        chunk_size = 64 if q.is_cuda else 32
    return chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, reset=reset, chunk_size=chunk_size
    )

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

from .ops_blocks import cache_blocks

__all__ = [
    "chunk_gated_delta_rule",
    "default_chunk_size",
    "fla_available",
    "gated_delta_rule",
    "naive_recurrent_gated_delta_rule",
    "recurrent_gated_delta_rule",
]

# Up to this many tokens the torch token loop beats the chunked form on CPU (measured crossover: T ~ 4-8 forward,
# T ~ 2-4 forward + backward, for B*H = 4-16, D = 64-128).
RECURRENT_MAX_LEN = 4
# fla's fused recurrent kernel (inference only) beats its chunk kernel up to about this length (fla layers use 64).
FLA_RECURRENT_MAX_LEN = 64


def default_chunk_size(head_k_dim: int, head_v_dim: int, cuda: bool) -> int:
    """Chunk length of the chunked form when the caller gives none: 64 on GPU (fla's); on CPU 16 for heads up to 32
    wide, else 32. A chunk costs ~C^2 (D + C) against ~C D^2 for the state, so narrow heads want short chunks: measured
    fwd+bwd on 1 thread, D = 16: 27.5 vs 35.8 ms (C = 16 vs 32), D = 32: 54 vs 78 ms; D = 64 about even; D = 128:
    C = 32 is 20% faster than 16 and 8% faster than 64."""
    if cuda:
        return 64
    return 16 if max(head_k_dim, head_v_dim) <= 32 else 32


def _head_share(k: torch.Tensor, v: torch.Tensor) -> int:
    """How many value heads share each q/k head (1 without grouping); checks that the counts divide."""
    key_heads, value_heads = k.shape[2], v.shape[2]
    if value_heads % key_heads:
        raise ValueError(f"v has {value_heads} heads, not a multiple of q/k's {key_heads}")
    return value_heads // key_heads


def _repeat_heads(x: torch.Tensor, share: int) -> torch.Tensor:
    """`[B, T, Hk, D]` -> `[B, T, Hk * share, D]`, each head repeated for the value heads it serves."""
    return x if share == 1 else x.repeat_interleave(share, dim=2)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when any input already is (lets tests check gradients in double precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _initial_state(
    initial_state: torch.Tensor | None, batch: int, heads: int, dk: int, dv: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """The given state in the compute dtype, or zeros `[B, H, Dk, Dv]`."""
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
    out_dtype = v.dtype
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    state = _initial_state(initial_state, batch, heads, dk, dv, dtype, v.device)
    outputs = []
    for t in range(length):
        if reset is not None:
            state = state * (~reset[:, t].bool()).to(dtype)[:, None, None, None]
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
    return o.to(out_dtype), state


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

    Five small batched matmul / elementwise ops per token on `[B*H, ., .]`; inputs are split with `unbind` and outputs
    joined with `stack` (no per-step indexing or in-place writes), so autograd stays linear in T.
    """
    batch, length, heads, dk = k.shape
    dv = v.shape[-1]
    bh = batch * heads
    dtype = _compute_dtype(q, k, v)
    scale = dk**-0.5 if scale is None else scale
    state = _initial_state(initial_state, batch, heads, dk, dv, dtype, v.device).reshape(bh, dk, dv)
    if length == 0:
        return v.new_zeros(batch, 0, heads, dv), state.reshape(batch, heads, dk, dv)
    alpha = g.to(dtype).exp()
    if reset is not None:
        alpha = alpha * (~reset.bool()).to(dtype)[:, :, None]  # alpha = 0 clears the state exactly
    beta = beta.to(dtype)
    v_beta = v.to(dtype) * beta[..., None]
    q, k = q.to(dtype) * scale, k.to(dtype)
    if length == 1:  # decoding: views (no copies) of contiguous inputs
        steps = [
            (
                q.reshape(bh, 1, dk),
                k.reshape(bh, 1, dk),
                alpha.reshape(bh, 1, 1),
                beta.reshape(bh, 1, 1),
                v_beta.reshape(bh, 1, dv),
            )
        ]
    else:

        def per_step(x: torch.Tensor, *tail: int) -> tuple[torch.Tensor, ...]:
            # [B, T, H, ...] -> T tensors [B*H, *tail]
            return x.transpose(0, 1).reshape(length, bh, *tail).unbind(0)

        steps = zip(
            per_step(q, 1, dk),
            per_step(k, 1, dk),
            per_step(alpha, 1, 1),
            per_step(beta, 1, 1),
            per_step(v_beta, 1, dv),
            strict=True,
        )
    outputs = []
    for q_t, k_t, alpha_t, beta_t, vb_t in steps:
        state = state * alpha_t
        update = torch.addcmul(vb_t, beta_t, torch.bmm(k_t, state), value=-1.0)  # beta (v - S^T k)
        state = torch.addcmul(state, k_t.mT, update)  # rank-1 update; ~2x faster than baddbmm at these sizes
        outputs.append(torch.bmm(q_t, state))
    if length == 1:
        o = outputs[0].view(batch, 1, heads, dv)
    else:
        o = torch.stack(outputs, dim=0).view(length, batch, heads, dv).transpose(0, 1)
    return o.to(v.dtype), state.view(batch, heads, dk, dv)


# ----------------------------------------------------------------------------------------------------------------------
# Chunked form
# ----------------------------------------------------------------------------------------------------------------------
#
# Within a chunk of C tokens let gam_i be the cumulative log decay since the chunk start and L_ij = exp(gam_i - gam_j)
# for j <= i in the same document (0 otherwise). With the carried state S entering the chunk:
#   A = strict_lower(diag(beta) (K K^T * L)),   T = (I + A)^-1
#   U = T diag(beta) V,   W = T diag(beta * f * exp(gam)) K     (f_i = 1 while no reset has happened in the chunk)
#   V' = U - W S                                                (the pseudo-values the chunk writes)
#   O  = (Q * f exp(gam)) S + ((Q K^T) * L) V'
#   S <- a S + (K * exp(gam_C - gam) * same_doc_as_last)^T V',         a = f_C exp(gam_C)
# Only the last two lines are sequential over chunks; everything else is one batched op over all chunks (over each
# tile of chunks in training, see `TILE_ELEMENTS`).


def _to_chunks(x: torch.Tensor, num_chunks: int, chunk: int, dtype: torch.dtype, repeat: int = 1) -> torch.Tensor:
    """`[B, T, H, *D]` -> `[N, B*H*repeat, C, *D]` (zero padded at the end), one copy. `repeat` > 1 serves each head
    to `repeat` consecutive heads (grouped value heads share a q/k head) inside that same copy."""
    batch, length, heads = x.shape[:3]
    tail = x.shape[3:]
    x = x.to(dtype)
    pad = num_chunks * chunk - length
    if pad:
        x = F.pad(x, (0, 0) * len(tail) + (0, 0, 0, pad))
    x = x.reshape(batch, num_chunks, chunk, heads, 1, *tail).expand(-1, -1, -1, -1, repeat, *tail)
    x = x.permute(1, 0, 3, 4, 2, *range(5, 5 + len(tail)))  # [N, B, H, repeat, C, *D]
    return x.reshape(num_chunks, batch * heads * repeat, chunk, *tail)


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
    scale: float,
    state: torch.Tensor,
    segment: torch.Tensor | None,
    keep: bool,
    out: torch.Tensor | None = None,
):
    """Chunk-layout forward. q, k `[N, BH, C, Dk]`; v `[N, BH, C, Dv]`; gam, beta `[N, BH, C]`;
    state `[BH, Dk, Dv]`; segment `[N, BH, C]` (document index within the chunk) or None.

    Returns o `[N, BH, C, Dv]`, the final state and, if `keep`, what the backward needs (including every chunk's
    entering state; without `keep` only the running state is held, so long inference prefills stay O(T) in memory).
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
    if last_doc is not None:
        kdecay = kdecay * last_doc
    carry = decay[..., -1, None, None]  # a: how much of the entering state survives the chunk
    # diagonal scalings are folded into the C x C factors rather than applied to the C x D operands
    U = torch.matmul(Tinv * beta[..., None, :], v)
    W = torch.matmul(Tinv * (beta * decay)[..., None, :], k)
    P = torch.matmul(q, k.mT).mul_(L).mul_(scale)
    Qd = q * (decay * scale)[..., None]
    Kd_t = (k * kdecay[..., None]).mT

    states = None
    if keep:
        states = torch.empty(num_chunks + 1, bh, dk, dv, dtype=q.dtype, device=q.device)
        states[0] = state
    new_v = torch.empty_like(U)
    o = torch.empty_like(U) if out is None else out
    # the sequential part: four small matmuls per chunk, written into preallocated outputs
    for n in range(num_chunks):
        torch.baddbmm(U[n], W[n], state, alpha=-1.0, out=new_v[n])
        torch.bmm(P[n], new_v[n], out=o[n]).baddbmm_(Qd[n], state)
        state = (torch.mul(state, carry[n], out=states[n + 1]) if keep else state * carry[n]).baddbmm_(
            Kd_t[n], new_v[n]
        )
    if not keep:
        return o, state, None
    # Qd and Kd are one product each away from q, k: recomputed in the backward rather than kept (2 of ~15 saved
    # [T, D]-sized tensors per layer; at 8k tokens that is most of the step memory the block adds over attention)
    return o, state, (q, k, v, beta, L, KL, Tinv, U, W, P, decay, kdecay, carry, states, new_v)


def _chunk_backward(
    do: torch.Tensor, dfinal: torch.Tensor | None, scale: float, saved, out: tuple[torch.Tensor, ...] | None = None
):
    """Gradients of `_chunk_forward` w.r.t. q, k, v, gam, beta and the initial state; those of q, k, v written into
    `out` when given (a tile's slices of the whole gradients)."""
    q, k, v, beta, L, KL, Tinv, U, W, P, decay, kdecay, carry, states, new_v = saved
    num_chunks = q.shape[0]
    Qd_t = (q * (decay * scale)[..., None]).mT
    Kd = k * kdecay[..., None]
    dP = torch.matmul(do, new_v.mT)
    d_new_v = torch.matmul(P.mT, do)  # the local part of dV'; the scan adds the part through later chunks
    # reverse scan, the only sequential part: dV'_n += Kd_n G_{n+1};  G_n = a_n G_{n+1} + Qd_n^T dO_n - W_n^T dV'_n,
    # G_{n+1} = dstates[n + 1] the gradient w.r.t. the state leaving chunk n (dstates[0]: the initial state's). The
    # products with the states (dKd, da, dQd, dW) then run once over all chunks: fewer, larger ops, which two
    # threads share better (fwd + bwd at D = 64 on 2 threads: 0.92-0.98x the time of doing them chunk by chunk)
    dstates = torch.empty_like(states)
    if dfinal is None:
        dstates[-1].zero_()
    else:
        dstates[-1] = dfinal
    W_t = W.mT
    for n in range(num_chunks - 1, -1, -1):
        d_new_v[n].baddbmm_(Kd[n], dstates[n + 1])
        torch.mul(dstates[n + 1], carry[n], out=dstates[n]).baddbmm_(Qd_t[n], do[n]).baddbmm_(
            W_t[n], d_new_v[n], alpha=-1.0
        )
    dU = d_new_v
    entering, leaving = states[:-1], dstates[1:]
    dKd = torch.matmul(new_v, leaving.mT)
    dcarry = torch.linalg.vecdot(entering.flatten(-2), leaving.flatten(-2))[..., None, None]
    entering_t = entering.mT
    dQd = torch.matmul(do, entering_t)
    dW = torch.matmul(d_new_v, entering_t).neg_()  # V' = U - W S
    dstate = dstates[0]

    # U = T (beta V), W = T (beta decay K): dRHS = T^T dY and dA = -dRHS Y^T (A enters through T = (I + A)^-1)
    Tinv_t = Tinv.mT
    dVb = torch.matmul(Tinv_t, dU)
    dKb = torch.matmul(Tinv_t, dW)
    dA = torch.matmul(dVb, U.mT).add_(torch.matmul(dKb, W.mT)).neg_().tril_(-1)

    # P = (Q K^T) * L and A = diag(beta) (K K^T * L): gradients reaching Q, K through the products
    dPL = (dP * L).mul_(scale)
    dAbeta = dA * beta[..., :, None]
    dKK = dAbeta * L
    out_q, out_k, out_v = (None, None, None) if out is None else out
    dq = torch.matmul(dPL, k, out=out_q).addcmul_(dQd, (decay * scale)[..., None])
    dk = (
        torch.matmul(dPL.mT, q, out=out_k)
        .add_(torch.matmul(dKK + dKK.mT, k))
        .addcmul_(dKd, kdecay[..., None])
        .addcmul_(dKb, (beta * decay)[..., None])
    )
    dkb_k = torch.linalg.vecdot(dKb, k)
    dbeta = torch.linalg.vecdot(dVb, v).addcmul_(dkb_k, decay).add_(torch.linalg.vecdot(dA, KL))
    dv = torch.mul(dVb, beta[..., None], out=out_v)

    # log-decay: every factor exp(x) contributes d/dx = grad * value
    dLL = (dP * P).addcmul_(dAbeta, KL)  # dL * L
    kd_term = torch.linalg.vecdot(dKd, k) * kdecay
    dgam = torch.linalg.vecdot(dQd, q).mul_(decay * scale).addcmul_(dkb_k, decay * beta)
    dgam += dLL.sum(-1) - dLL.sum(-2) - kd_term
    dgam[..., -1] += kd_term.sum(-1) + (dcarry * carry)[..., 0, 0]
    return dq, dk, dv, dgam, dbeta, dstate


# Elements per [C, D]-sized tensor of one tile of the training scan (512 KiB in float32, one core's L2 cache here).
# The sequence is processed tile after tile with the state carried across, so each tile's C x C factors,
# pseudo-values and states are reused from cache and from the allocator instead of being page-faulted in as
# [T, D]-sized temporaries. Forward + backward, 1 thread: D = 64, 8 heads: T = 2048 99.8 -> 74.0 ms, T = 8192
# 407 -> 287 ms; D = 128, 2 x 4 heads, T = 2048: 185 -> 158 ms; measured best of 2^16-2^19 and of no tiling.
TILE_ELEMENTS = 1 << 17


def _tiles(num_chunks: int, rows: int, chunk: int, dim: int) -> list[slice]:
    """Slices of the chunk axis, each about `TILE_ELEMENTS` per `[rows, chunk, dim]`-shaped tensor."""
    return [slice(start, end) for start, end in cache_blocks(num_chunks, rows * chunk * dim, TILE_ELEMENTS)]


class _ChunkGatedDeltaRule(torch.autograd.Function):
    """The chunk scan with a hand-written backward: 10-30% faster on CPU than autograd through the same loop
    (measured at T = 2048-4096, D = 64-128), and it keeps fewer intermediates alive. Runs in tiles of chunks
    (`TILE_ELEMENTS`; inputs are `[N, BH, C, ...]`, so a tile is a contiguous slice)."""

    @staticmethod
    def forward(ctx, q, k, v, gam, beta, scale, state, segment):
        num_chunks, rows, chunk, _ = q.shape
        tiles = _tiles(num_chunks, rows, chunk, max(q.shape[-1], v.shape[-1]))
        o = v.new_empty(v.shape)  # every tile writes its slice
        saved = []
        for tile in tiles:
            tile_segment = None if segment is None else segment[tile]
            state, tile_saved = _chunk_forward(
                q[tile], k[tile], v[tile], gam[tile], beta[tile], scale, state, tile_segment, keep=True, out=o[tile]
            )[1:]
            saved.extend(tile_saved)
        ctx.save_for_backward(*saved)
        ctx.scale, ctx.tiles = scale, tiles
        return o, state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dfinal):
        do = do.contiguous()
        saved = ctx.saved_tensors
        per_tile = len(saved) // len(ctx.tiles)
        q, k, v = saved[:3]  # the first tile's: for the trailing shapes
        dq, dk, dv = (do.new_empty(do.shape[0], *x.shape[1:]) for x in (q, k, v))  # every tile writes its slice
        gate_grads = [None] * len(ctx.tiles)  # dgam, dbeta per tile: small, joined at the end
        dstate = dfinal
        with torch.autocast(device_type=do.device.type, enabled=False):  # float32, like the forward
            for index in range(len(ctx.tiles) - 1, -1, -1):
                tile = ctx.tiles[index]
                tile_saved = saved[index * per_tile : (index + 1) * per_tile]
                *_, dgam, dbeta, dstate = _chunk_backward(
                    do[tile], dstate, ctx.scale, tile_saved, out=(dq[tile], dk[tile], dv[tile])
                )
                gate_grads[index] = (dgam, dbeta)
        dgam, dbeta = (torch.cat(parts) for parts in zip(*gate_grads, strict=True))
        return dq, dk, dv, dgam, dbeta, None, dstate, None


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
        q, k: `[B, T, Hk, Dk]`; v: `[B, T, H, Dv]`; g (log decay, <= 0), beta: `[B, T, H]`. Hk may divide H
            (grouped value heads, as Qwen3-Next's): q/k head i serves value heads i * H/Hk ... (i + 1) * H/Hk - 1,
            repeated inside the copy into chunk layout instead of by the caller.
        scale: query scale, default `Dk ** -0.5`.
        initial_state: `[B, H, Dk, Dv]` or None (zeros).
        reset: `[B, T]` bool, True where the state is cleared before the token (document starts in packed rows).
        chunk_size: tokens per chunk; T is padded internally with identity steps (the dispatcher `gated_delta_rule`
            passes `default_chunk_size`).

    Returns:
        `o` `[B, T, H, Dv]` in `v.dtype` and the final state `[B, H, Dk, Dv]` (float32 / float64).
    """
    batch, length, heads, dv = v.shape
    dk = k.shape[-1]
    share = _head_share(k, v)
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
    inputs = (
        _to_chunks(q, num_chunks, chunk, dtype, repeat=share),
        _to_chunks(k, num_chunks, chunk, dtype, repeat=share),
        _to_chunks(v, num_chunks, chunk, dtype),
        _to_chunks(g, num_chunks, chunk, dtype).cumsum(-1),
        _to_chunks(beta, num_chunks, chunk, dtype),
        scale,
        state.reshape(batch * heads, dk, dv),
        segment,
    )
    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
        o, final = _ChunkGatedDeltaRule.apply(*inputs)
    else:  # inference (prefill): the same tiles, carrying only the running state
        chunked, final, segment = inputs[:5], inputs[6], inputs[7]
        o = chunked[2].new_empty(chunked[2].shape)
        for tile in _tiles(num_chunks, batch * heads, chunk, max(dk, dv)):
            tile_segment = None if segment is None else segment[tile]
            tile_inputs = [x[tile] for x in chunked]
            final = _chunk_forward(*tile_inputs, scale, final, tile_segment, keep=False, out=o[tile])[1]
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
    """Run fla's kernels (state layout `[N, H, Dk, Dv]`, fla's default). Document resets become varlen segments
    (`cu_seqlens`) over the flattened batch, each segment starting from its row's state or from zero."""
    fla_chunk, fla_recurrent = kernels
    batch, length, heads, dk = k.shape
    dv = v.shape[-1]
    state_dtype = _compute_dtype(q, k, v)
    q, k = q.to(v.dtype), k.to(v.dtype)  # fla wants one dtype for q, k, v
    if initial_state is not None:
        initial_state = initial_state.to(state_dtype)
    if reset is None or not bool(reset.any()):
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state)
        )
        # fla's fused recurrent kernel has no backward; it is for short inference calls
        kernel = fla_recurrent if length <= FLA_RECURRENT_MAX_LEN and not needs_grad else fla_chunk
        o, final = kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True)
        return o.to(v.dtype), final.to(state_dtype)
    state = _initial_state(initial_state, batch, heads, dk, dv, state_dtype, v.device)
    reset = reset.bool()
    starts = reset.clone()
    starts[:, 0] = True
    flat_starts = starts.reshape(-1).nonzero().squeeze(-1)
    cu_seqlens = F.pad(flat_starts, (0, 1), value=batch * length)
    row_of_segment = flat_starts // length
    carries_state = ~reset.reshape(-1)[flat_starts]  # a row's first segment, unless the row itself starts with a reset
    segment_state = state[row_of_segment] * carries_state.to(state.dtype)[:, None, None, None]
    flat = [x.reshape(1, batch * length, *x.shape[2:]) for x in (q, k, v, g, beta)]
    o, segment_final = fla_chunk(
        *flat, scale=scale, initial_state=segment_state, output_final_state=True, cu_seqlens=cu_seqlens
    )
    row_ends = torch.arange(1, batch + 1, device=v.device) * length - 1
    last_segment = torch.bucketize(row_ends, flat_starts, right=True) - 1
    return o.reshape(batch, length, heads, dv).to(v.dtype), segment_final[last_segment].to(state_dtype)


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
    T <= `RECURRENT_MAX_LEN` (decoding) and the chunked form beyond (chunk_size default: `default_chunk_size`).

    Args and returns as `chunk_gated_delta_rule`: q, k `[B, T, Hk, Dk]` (Hk dividing H: grouped value heads),
    v `[B, T, H, Dv]`, g, beta `[B, T, H]`, initial_state `[B, H, Dk, Dv]`, reset `[B, T]` -> o `[B, T, H, Dv]`
    (v.dtype), final state (float32).
    """
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    share = _head_share(k, v)
    if q.is_cuda:
        kernels = _fla_kernels()
        if kernels is not None:
            q, k = _repeat_heads(q, share), _repeat_heads(k, share)
            return _fla_gated_delta_rule(kernels, q, k, v, g, beta, scale, initial_state, reset)
    # The torch paths compute in float32 on purpose (the state accumulates over thousands of steps); autocast would
    # silently turn their matmuls into bf16 ones, so it is switched off inside and the output cast back to v.dtype.
    with torch.autocast(device_type=v.device.type, enabled=False):
        if k.shape[1] <= RECURRENT_MAX_LEN:
            q, k = _repeat_heads(q, share), _repeat_heads(k, share)
            return recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state, reset=reset)
        if chunk_size is None:
            chunk_size = default_chunk_size(k.shape[-1], v.shape[-1], q.is_cuda)
        return chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, reset=reset, chunk_size=chunk_size
        )

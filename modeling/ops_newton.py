"""Newton's method for non-linear recurrences `h_t = f(h_{t-1}, x_t)`, all time steps at once (pure functions).

DEER (Lim et al., ICLR 2024, arXiv 2309.12252) treats the whole sequence of states as the unknown of one system of
equations `h_t - f(h_{t-1}, x_t) = 0` and solves it with Newton's method. Linearising `f` around the current guess
`h^k` gives an *affine* recurrence,

    h^{k+1}_t = J_t h^{k+1}_{t-1} + b_t,   J_t = df/dh (h^k_{t-1}, x_t),   b_t = f(h^k_{t-1}, x_t) - J_t h^k_{t-1},

which a parallel scan solves for all t at once. Newton converges quadratically near the solution, and after k
iterations the first k states are exact, so it always ends. A dense `J` costs O(H^3) per step of the scan; cells whose
Jacobian is diagonal (ParaGRU) or 2x2-block-diagonal over `[c, h]` (ParaLSTM) keep it O(H) (ParaRNN, Danieli et al.,
arXiv 2510.21450; quasi-DEER, Gonzalez et al., NeurIPS 2024, arXiv 2407.19115, uses the diagonal of a dense Jacobian
as an approximation). See `ops_pararnn` for the cells.

A cell is any object with `step(h_prev, inputs, params, jacobian) -> (h, J or None)`, vectorised over leading dims,
and `block` (1: diagonal; 2: 2x2 blocks). States are `[B, T, H]` (`block == 1`) or `[B, T, 2, H]` (the two parts of
each channel's block on dim -2); Jacobians `[B, T, H]` or `[B, T, 2, 2, H]` with `J[..., i, j, :] = d new_i / d old_j`.

* `newton_recurrence`: the entry point. Forward: initial guess = one cell step from the zero state everywhere (as
  ParaRNN), then Newton steps until the defect `max |h_t - f(h_{t-1}, x_t)|` is at most `tol`. Past `max_iter` steps
  the remaining positions (from the first one whose defect is above `tol`) are finished by the sequential loop; the
  returned `NewtonStats` says how many iterations it took, the final defect and how many steps ran sequentially, and
  a `UserWarning` is issued. Backward: the adjoint recurrence `lambda_t = g_t + J_{t+1}^T lambda_{t+1}` with the
  Jacobians at the converged states (one reverse scan), then one vectorised vector-Jacobian product of the cell at all
  steps for the gradients of the inputs, parameters and initial state - no differentiation through the iterations.
* `sequential_recurrence`: the same masked cell as a plain time loop under autograd (backpropagation through time);
  the reference, the decoding path and the fallback.
* `linear_scan`: `h_t = J_t h_{t-1} + b_t` for diagonal or 2x2-block `J` (chunked, see below).

Padding (`mask` False) is an identity step (`J = I, b = 0`); a document start (`reset` True) zeroes `h_{t-1}` before
its step (`J = 0`): both are a `where` around the cell, so every path treats them identically.

Choosing the scan by measurement (forward of `h_t = a_t h_{t-1} + b_t` alone, B=8, fp32, 1 thread, 2-core AMD EPYC
shared with other jobs, load average ~5, best of 3; times in ms for T = 512 / 2048 / 4096 / 8192):

    D=256: time loop 7 / 24-40 / 57-100 / 115-216; Hillis-Steele doubling 20 / 315 / 727 / 4258;
           chunked 32 / 64 / 128: 12 / 33 / 175 / 567,  9 / 37 / 176 / 646,  38 / 35 / 189 / 673;
           doubling inside 64-chunks 33 / 231 / 477 / 2629
    D=64:  time loop 2 / 25 / 50-57 / 117-160; doubling 2 / 50 / 166 / 463;
           chunked 32 / 64 / 128: 0.7 / 13 / 34 / 67,  1.0 / 17 / 49 / 74,  1.0 / 14 / 30 / 75;
           doubling inside 64-chunks 1.4 / 37 / 115 / 256

Log-depth doubling does O(T log T) work and loses everywhere on a CPU; the chunked scan (a short loop over the steps
of a chunk, all chunks at once, then a loop over the chunk ends and one vectorised correction) is never much slower
than a plain loop and 2-3x faster when a step is small. It is exact (no division, no logarithm: zeros and negative
entries in `J` are fine). The win of Newton on a CPU comes from replacing T Python-level steps of a non-linear cell
(a dozen tensor ops each, under autograd) by a few vectorised passes (see benchmarks/bench_newton.py).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

DEFAULT_MAX_ITER = 8


@dataclass
class NewtonStats:
    """What one Newton solve did.

    iterations: Newton steps taken (linear solves; 0 if the initial guess already met `tol`).
    residual: the largest defect `|h_t - f(h_{t-1}, x_t)|` measured at the last Newton iterate.
    converged: whether that defect was at most `tol`.
    sequential_steps: time steps the sequential fallback ran (0 when Newton converged).
    """

    iterations: int = 0
    residual: float = math.nan
    converged: bool = False
    sequential_steps: int = 0


def default_tolerance(dtype: torch.dtype) -> float:
    """Defect at which Newton stops: ~30 ulps of 1 (the states of gated cells are O(1)).

    Newton's error squares every step, so the iterate that first gets below this is usually far below it; a tighter
    value would sit under the rounding floor of evaluating the cell, and a looser one would stop one step early.
    """
    return 32 * torch.finfo(dtype).eps


# ----------------------------------------------------------------------------------------------------------------------
# Helpers over diagonal (block 1) and 2x2-block (block 2) Jacobians


def _matvec(jac: torch.Tensor, state: torch.Tensor, block: int) -> torch.Tensor:
    """`J h` per channel: an element-wise product, or a 2x2 matrix times a 2-vector."""
    if block == 1:
        return jac * state
    return (jac * state.unsqueeze(-3)).sum(-2)


def _transpose(jac: torch.Tensor, block: int) -> torch.Tensor:
    return jac if block == 1 else jac.transpose(-3, -2)


def _identity_like(jac: torch.Tensor, block: int) -> torch.Tensor:
    if block == 1:
        return torch.ones_like(jac)
    eye = torch.eye(2, dtype=jac.dtype, device=jac.device).unsqueeze(-1)  # [2, 2, 1]
    return eye.expand_as(jac)


def _channel_dims(block: int) -> int:
    """Number of trailing dims of a state after [B, T]: `[H]` or `[2, H]`."""
    return block


def _shift(states: torch.Tensor, initial_state: torch.Tensor) -> torch.Tensor:
    """`h_{t-1}` for every t: the initial state, then all states but the last."""
    return torch.cat([initial_state.unsqueeze(1), states[:, :-1]], dim=1)


def _step_masks(
    mask: torch.Tensor | None, reset: torch.Tensor | None, state_dims: int, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`[B, T]` masks broadcast against states: `keep` (0 where a document starts) and `valid` (False at padding)."""
    shape_tail = (1,) * state_dims
    keep = (~reset).to(dtype).view(*reset.shape, *shape_tail) if reset is not None else None
    valid = mask.view(*mask.shape, *shape_tail) if mask is not None else None
    return keep, valid


def masked_step(
    cell,
    h_prev: torch.Tensor,
    inputs: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    keep: torch.Tensor | None,
    valid: torch.Tensor | None,
    jacobian: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cell with resets (state zeroed before the step: `J = 0`) and padding (identity step: `J = I`)."""
    source = h_prev * keep if keep is not None else h_prev
    new, jac = cell.step(source, inputs, params, jacobian)
    if jac is not None and keep is not None:
        jac = jac * (keep.unsqueeze(-2) if cell.block == 2 else keep)
    if valid is not None:
        new = torch.where(valid, new, h_prev)
        if jac is not None:
            jac = torch.where(valid.unsqueeze(-2) if cell.block == 2 else valid, jac, _identity_like(jac, cell.block))
    return new, jac


# ----------------------------------------------------------------------------------------------------------------------
# The affine recurrence h_t = J_t h_{t-1} + b_t


def _chunk_length(length: int) -> int:
    """About sqrt(T), a power of two in [8, 128]: the in-chunk loop and the loop over chunk ends are both short."""
    return int(min(128, max(8, 2 ** round(math.log2(max(length, 1)) / 2))))


def linear_scan(
    jac: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None,
    block: int,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """All states of `h_t = J_t h_{t-1} + b_t` (`J` diagonal or 2x2 blocks, see the module docstring).

    Chunked: split T into chunks of `chunk_size` steps; (1) run every chunk from a zero state at once, a loop over the
    steps of a chunk, also collecting the product of the Jacobians so far; (2) carry the states across chunk ends, a
    loop over chunks; (3) add the carried state times the Jacobian products to every step, one vectorised pass.
    """
    batch, length = b.shape[:2]
    chunk = chunk_size or _chunk_length(length)
    pad = (-length) % chunk
    if pad:  # identity steps at the end change no state
        jac = torch.cat([jac, _identity_like(jac[:, :1], block).expand(batch, pad, *jac.shape[2:])], dim=1)
        b = torch.cat([b, b.new_zeros(batch, pad, *b.shape[2:])], dim=1)
    chunks = b.shape[1] // chunk
    # time-within-chunk first, so that each step of the loop is one contiguous slice [B, chunks, ...]
    jac_steps = jac.view(batch, chunks, chunk, *jac.shape[2:]).movedim(2, 0).contiguous()
    b_steps = b.view(batch, chunks, chunk, *b.shape[2:]).movedim(2, 0).contiguous()

    local = torch.empty_like(b_steps)
    h = torch.zeros_like(b_steps[0])
    if block == 1:
        for t in range(chunk):
            h = torch.addcmul(b_steps[t], jac_steps[t], h, out=local[t])
        products = torch.cumprod(jac_steps, dim=0)  # J_t ... J_first of the chunk, exact
    else:
        products = torch.empty_like(jac_steps)
        product = _identity_like(jac_steps[0], 2)
        for t in range(chunk):
            j = jac_steps[t]
            h = torch.add(b_steps[t], _matvec(j, h, 2), out=local[t])
            product = torch.matmul(j.movedim(-1, -3), product.movedim(-1, -3)).movedim(-3, -1)
            products[t] = product

    # state entering each chunk
    entering = torch.empty_like(local[0])  # [B, chunks, ...]
    h = initial_state if initial_state is not None else torch.zeros_like(entering[:, 0])
    for k in range(chunks):
        entering[:, k] = h
        h = local[-1, :, k] + _matvec(products[-1, :, k], h, block)
    states = local + _matvec(products, entering.unsqueeze(0), block)
    states = states.movedim(0, 2).reshape(batch, chunks * chunk, *b.shape[2:])
    return states[:, :length] if pad else states


def reverse_linear_scan(jac: torch.Tensor, grad: torch.Tensor, block: int) -> torch.Tensor:
    """The adjoint recurrence `lambda_t = g_t + J_{t+1}^T lambda_{t+1}` (`lambda_T = g_T`), run backwards in time."""
    successor = torch.cat([_transpose(jac[:, 1:], block), torch.zeros_like(jac[:, :1])], dim=1)  # J_{t+1}^T
    flipped = linear_scan(successor.flip(1), grad.flip(1), None, block)
    return flipped.flip(1)


# ----------------------------------------------------------------------------------------------------------------------
# Forward solve


def _sequential_finish(cell, states, start, initial_state, inputs, params, keep, valid) -> None:
    """Overwrite `states[:, start:]` with the exact time loop started from `states[:, start - 1]` (no grad)."""
    h = states[:, start - 1] if start > 0 else initial_state
    for t in range(start, states.shape[1]):
        window = slice(t, t + 1)
        step_keep = keep[:, window] if keep is not None else None
        step_valid = valid[:, window] if valid is not None else None
        new, _ = masked_step(cell, h.unsqueeze(1), inputs[:, window], params, step_keep, step_valid, False)
        h = new[:, 0]
        states[:, t] = h


def _newton_solve(cell, inputs, params, initial_state, keep, valid, tol, max_iter, stats: NewtonStats):
    """Newton iterations (no autograd); fills `stats`; returns all states."""
    # initial guess: one cell step from the zero state at every position (the true initial state at t = 0)
    guess_prev = initial_state.new_zeros(initial_state.shape[0], inputs.shape[1], *initial_state.shape[1:])
    guess_prev[:, 0] = initial_state
    states, _ = masked_step(cell, guess_prev, inputs, params, keep, valid, False)
    state_dims = cell.block
    iterations = 0
    while True:
        h_prev = _shift(states, initial_state)
        new, jac = masked_step(cell, h_prev, inputs, params, keep, valid, iterations < max_iter)
        defect = (new - states).abs().amax(dim=(0, *range(2, 2 + state_dims)))  # per time step
        residual = float(defect.max())
        if residual <= tol or iterations == max_iter or not math.isfinite(residual):
            break
        states = linear_scan(jac, new - _matvec(jac, h_prev, cell.block), initial_state, cell.block)
        iterations += 1
    stats.iterations, stats.residual = iterations, residual
    stats.converged = residual <= tol
    if not stats.converged:
        start = int((~(defect <= tol)).nonzero()[0, 0])  # first step whose defect is too large (or not finite)
        stats.sequential_steps = inputs.shape[1] - start
        warnings.warn(
            f"Newton did not converge in {max_iter} iterations (defect {residual:.3g} > tol {tol:.3g}); "
            f"finishing the last {stats.sequential_steps} of {inputs.shape[1]} steps sequentially",
            stacklevel=3,
        )
        _sequential_finish(cell, states, start, initial_state, inputs, params, keep, valid)
    return states


class _NewtonRecurrence(torch.autograd.Function):
    """Forward: Newton solve. Backward: adjoint scan with the converged Jacobians + one vectorised VJP of the cell."""

    @staticmethod
    def forward(ctx, cell, options, stats, keep, valid, inputs, initial_state, *params):
        tol, max_iter = options
        states = _newton_solve(cell, inputs, params, initial_state, keep, valid, tol, max_iter, stats)
        ctx.cell, ctx.keep, ctx.valid = cell, keep, valid
        ctx.save_for_backward(inputs, initial_state, states, *params)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):
        inputs, initial_state, states, *params = ctx.saved_tensors
        cell = ctx.cell
        needs = ctx.needs_input_grad[5:]
        h_prev = _shift(states, initial_state).requires_grad_(needs[1])
        inputs = inputs.detach().requires_grad_(needs[0])
        params = tuple(p.detach().requires_grad_(need) for p, need in zip(params, needs[2:], strict=True))
        with torch.enable_grad():
            new, jac = masked_step(cell, h_prev, inputs, params, ctx.keep, ctx.valid, True)
        adjoint = reverse_linear_scan(jac, grad_states, cell.block)
        wrt = [t for t, need in zip((inputs, h_prev, *params), needs, strict=True) if need]
        grads = iter(torch.autograd.grad(new, wrt, adjoint, allow_unused=True) if wrt else ())
        grad_inputs = next(grads) if needs[0] else None
        grad_initial = next(grads)[:, 0] if needs[1] else None
        grad_params = [next(grads) if need else None for need in needs[2:]]
        return None, None, None, None, None, grad_inputs, grad_initial, *grad_params


def _prepare(cell, inputs, initial_state, mask, reset, dtype):
    batch, length = inputs.shape[:2]
    if initial_state is None:
        initial_state = inputs.new_zeros(batch, *cell.state_shape(inputs))
    keep, valid = _step_masks(mask, reset, _channel_dims(cell.block), dtype)
    return initial_state, keep, valid


def newton_recurrence(
    cell,
    inputs: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    tol: float | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    stats: NewtonStats | None = None,
) -> tuple[torch.Tensor, NewtonStats]:
    """All states of `h_t = cell(h_{t-1}, inputs_t)` by Newton's method (see the module docstring).

    Args:
        cell: a cell (e.g. `ops_pararnn.PARAGRU`), `block` 1 or 2.
        inputs: `[B, T, ...]` the per-step inputs of the cell (e.g. its gate pre-activations from x).
        params: the cell's parameters (differentiable).
        initial_state: `[B, H]` or `[B, 2, H]`; None = zeros.
        mask: `[B, T]` bool, False at padding (the state passes through unchanged).
        reset: `[B, T]` bool, True where a document starts (the state is zeroed before that step).
        tol: largest acceptable defect `|h_t - f(h_{t-1}, x_t)|` (None: `default_tolerance(dtype)`).
        max_iter: Newton steps before the sequential fallback takes over.
        stats: filled in place if given (else a new one is returned).

    Returns:
        all states `[B, T, ...]` and the `NewtonStats` of this solve.
    """
    stats = stats if stats is not None else NewtonStats()
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    tol = default_tolerance(inputs.dtype) if tol is None else tol
    initial_state, keep, valid = _prepare(cell, inputs, initial_state, mask, reset, inputs.dtype)
    states = _NewtonRecurrence.apply(cell, (tol, max_iter), stats, keep, valid, inputs, initial_state, *params)
    return states, stats


def sequential_recurrence(
    cell,
    inputs: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> torch.Tensor:
    """All states of the same masked cell as a time loop under autograd (`unbind`/`stack`, linear in T)."""
    initial_state, keep, valid = _prepare(cell, inputs, initial_state, mask, reset, inputs.dtype)
    keeps = keep.unbind(1) if keep is not None else None
    valids = valid.unbind(1) if valid is not None else None
    h, outputs = initial_state, []
    for t, step_inputs in enumerate(inputs.unbind(1)):
        h, _ = masked_step(
            cell,
            h,
            step_inputs,
            params,
            keeps[t] if keeps is not None else None,
            valids[t] if valids is not None else None,
            False,
        )
        outputs.append(h)
    return torch.stack(outputs, dim=1)

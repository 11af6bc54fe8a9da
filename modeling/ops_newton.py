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
(a dozen tensor ops each, under autograd) by a few vectorised passes: measured fwd+bwd at T = 4096 (1 thread, loaded
2-core machine), 9.8x (ParaGRU) / 7.3x (ParaLSTM) faster than the time loop at B=2, H=64, but 0.84x / 0.44x at B=8,
H=256, where a step's arithmetic outweighs its overhead (benchmarks/bench_newton.py, benchmarks/RESULTS.md).

The cell is evaluated in time tiles of ~64k elements, never on whole `[B, T, H]` temporaries: multi-MB buffers are
fresh mmaps that cost page faults on every op (measured: an add over 32 MiB 78 ms vs 9 ms into a reused buffer).
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


def _matvec_add_(out: torch.Tensor, jac: torch.Tensor, state: torch.Tensor, block: int) -> torch.Tensor:
    """`out += J h` in place (`state` broadcasts against `out`)."""
    if block == 1:
        return out.addcmul_(jac, state)
    for i in range(2):
        out[..., i, :].addcmul_(jac[..., i, 0, :], state[..., 0, :]).addcmul_(jac[..., i, 1, :], state[..., 1, :])
    return out


def _step_matvec_add_(out: torch.Tensor, jac: torch.Tensor, state: torch.Tensor, block: int) -> torch.Tensor:
    """`out += J h` for one step of a scan loop: few, small ops (the loop is bound by per-op overhead)."""
    if block == 1:
        return out.addcmul_(jac, state)
    return out.add_((jac * state.unsqueeze(-3)).sum(-2))


def _matmul_into(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, block: int) -> None:
    """`out = left @ right` per channel (element-wise product for diagonal Jacobians)."""
    if block == 1:
        torch.mul(left, right, out=out)
    else:
        torch.sum(left.unsqueeze(-2) * right.unsqueeze(-4), dim=-3, out=out)  # [i, j, 1] * [1, j, k], sum over j


def linear_scan_(
    jac: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None,
    block: int,
    chunk: int,
    reverse: bool = False,
    products: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place, `b` becomes the states of `h_t = J_t h_{t-1} + b_t` (or, `reverse`, of `h_t = J_t h_{t+1} + b_t`).

    `b` `[B, T, ...]` with T a multiple of `chunk`. Chunked: (1) every chunk from a zero state at once, a loop over
    the steps of a chunk that also collects the running product of the Jacobians (into `products`, scratch of `jac`'s
    shape); (2) the states entering each chunk, a loop over chunks; (3) `h += (J ... J) h_entering` at every step, one
    vectorised pass. Exact: no division or logarithm, so zeros and negative entries in `J` are fine.
    """
    batch, length = b.shape[:2]
    chunks = length // chunk
    jac_c = jac.view(batch, chunks, chunk, *jac.shape[2:])
    states = b.view(batch, chunks, chunk, *b.shape[2:])
    prods = (products if products is not None else torch.empty_like(jac)).view_as(jac_c)
    order = range(chunk - 1, -1, -1) if reverse else range(chunk)
    previous = None
    for t in order:
        if previous is None:
            prods[:, :, t].copy_(jac_c[:, :, t])
        else:
            _step_matvec_add_(states[:, :, t], jac_c[:, :, t], states[:, :, previous], block)
            _matmul_into(prods[:, :, t], jac_c[:, :, t], prods[:, :, previous], block)
        previous = t
    last = order[-1]
    entering = torch.empty_like(states[:, :, 0])  # [B, chunks, ...]
    h = initial_state if initial_state is not None else torch.zeros_like(entering[:, 0])
    for k in range(chunks - 1, -1, -1) if reverse else range(chunks):
        entering[:, k] = h
        h = _step_matvec_add_(states[:, k, last].clone(), prods[:, k, last], h, block)
    _matvec_add_(states, prods, entering.unsqueeze(2), block)
    return b


def linear_scan(
    jac: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None,
    block: int,
    chunk_size: int | None = None,
    reverse: bool = False,
) -> torch.Tensor:
    """All states of `h_t = J_t h_{t-1} + b_t` (out of place, any T; see `linear_scan_`)."""
    batch, length = b.shape[:2]
    chunk = chunk_size or _chunk_length(length)
    pad = (-length) % chunk
    if pad:  # identity steps at the end (or, reversed, at the end too: they come first and carry a zero state)
        eye = _identity_like(jac[:, :1], block).expand(batch, pad, *jac.shape[2:])
        jac = torch.cat([jac, eye], dim=1) if not reverse else torch.cat([jac, torch.zeros_like(eye)], dim=1)
        b = torch.cat([b, b.new_zeros(batch, pad, *b.shape[2:])], dim=1)
    else:
        b = b.clone()
    states = linear_scan_(jac.contiguous(), b, initial_state, block, chunk, reverse)
    return states[:, :length]


# ----------------------------------------------------------------------------------------------------------------------
# Newton solve and its adjoint


def _tiles(length: int, chunk: int, step_elements: int) -> list[slice]:
    """Time tiles (whole chunks) over which the cell is evaluated: ~64k elements each, so that the dozen temporaries
    of a cell evaluation stay in cache and small enough for the allocator to reuse (fresh multi-MB buffers cost page
    faults that dwarf the arithmetic)."""
    steps = max(chunk, (65536 // max(step_elements, 1)) // chunk * chunk)
    return [slice(start, min(start + steps, length)) for start in range(0, length, steps)]


def _previous(states: torch.Tensor, initial_state: torch.Tensor, tile: slice) -> torch.Tensor:
    """`h_{t-1}` for the steps of `tile`."""
    if tile.start == 0:
        return torch.cat([initial_state.unsqueeze(1), states[:, : tile.stop - 1]], dim=1)
    return states[:, tile.start - 1 : tile.stop - 1]


def _sliced(mask: torch.Tensor | None, tile: slice) -> torch.Tensor | None:
    return mask[:, tile] if mask is not None else None


def _sequential_finish(cell, states, start, initial_state, inputs, params, keep, valid) -> None:
    """Overwrite `states[:, start:]` with the exact time loop started from `states[:, start - 1]` (no grad)."""
    h = states[:, start - 1] if start > 0 else initial_state
    for t in range(start, states.shape[1]):
        window = slice(t, t + 1)
        new, _ = masked_step(
            cell, h.unsqueeze(1), inputs[:, window], params, _sliced(keep, window), _sliced(valid, window), False
        )
        h = new[:, 0]
        states[:, t] = h


def _jacobian_shape(cell, state_shape: tuple[int, ...]) -> tuple[int, ...]:
    return state_shape if cell.block == 1 else (2, 2, state_shape[-1])


def _newton_solve(cell, inputs, params, initial_state, keep, valid, options, stats: NewtonStats):
    """Newton iterations (no autograd) over padded inputs (T a multiple of `chunk`); fills `stats`.

    Returns the states and, when the last evaluation computed them at the returned states, their Jacobians.
    """
    tol, max_iter, chunk, real_length = options
    batch, length = inputs.shape[:2]
    state_shape = tuple(initial_state.shape[1:])
    block = cell.block
    reduce_dims = tuple(range(2, 2 + len(state_shape)))
    states = inputs.new_empty(batch, length, *state_shape)
    work = torch.empty_like(states)  # b of the next linear solve, then (in place) its solution
    jac = inputs.new_empty(batch, length, *_jacobian_shape(cell, state_shape))
    products = torch.empty_like(jac)
    defect = inputs.new_empty(length)
    tiles = _tiles(length, chunk, batch * math.prod(state_shape))

    # initial guess: one cell step from the zero state at every position (the true initial state at t = 0)
    for tile in tiles:
        zeros = initial_state.new_zeros(batch, tile.stop - tile.start, *state_shape)
        if tile.start == 0:
            zeros[:, 0] = initial_state
        states[:, tile] = masked_step(
            cell, zeros, inputs[:, tile], params, _sliced(keep, tile), _sliced(valid, tile), False
        )[0]
    iterations = 0
    while True:
        need_jacobian = iterations < max_iter
        for tile in tiles:
            h_prev = _previous(states, initial_state, tile)
            new, jac_tile = masked_step(
                cell, h_prev, inputs[:, tile], params, _sliced(keep, tile), _sliced(valid, tile), need_jacobian
            )
            torch.amax((new - states[:, tile]).abs_(), dim=(0, *reduce_dims), out=defect[tile])
            if need_jacobian:
                jac[:, tile] = jac_tile
                work[:, tile] = new
                _matvec_add_(work[:, tile], -jac_tile, h_prev, block)  # b = f - J h_prev
        residual = float(defect.max())
        if residual <= tol or not need_jacobian or not math.isfinite(residual):
            break
        linear_scan_(jac, work, initial_state, block, chunk, products=products)
        states, work = work, states
        iterations += 1
    stats.iterations, stats.residual = iterations, residual
    stats.converged = residual <= tol
    if not stats.converged:
        start = int((~(defect <= tol)).nonzero()[0, 0])  # first step whose defect is too large (or not finite)
        stats.sequential_steps = max(real_length - start, 0)  # identity steps appended for the chunks do not count
        warnings.warn(
            f"Newton did not converge in {max_iter} iterations (defect {residual:.3g} > tol {tol:.3g}); "
            f"finishing the last {stats.sequential_steps} of {real_length} steps sequentially",
            stacklevel=5,  # the caller of newton_recurrence
        )
        _sequential_finish(cell, states, start, initial_state, inputs, params, keep, valid)
    # the last evaluation was at the returned states: its Jacobians are the ones the backward pass needs
    return states, (jac if stats.converged and need_jacobian else None)


class _NewtonRecurrence(torch.autograd.Function):
    """Forward: Newton solve. Backward: adjoint scan with the converged Jacobians + one vectorised VJP of the cell.

    Works on inputs padded to a multiple of the chunk length (padding = identity steps, zero gradient)."""

    @staticmethod
    def forward(ctx, cell, options, stats, keep, valid, inputs, initial_state, *params):
        states, jac = _newton_solve(cell, inputs, params, initial_state, keep, valid, options, stats)
        ctx.cell, ctx.keep, ctx.valid, ctx.chunk = cell, keep, valid, options[2]
        ctx.save_for_backward(inputs, initial_state, states, jac, *params)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):
        inputs, initial_state, states, jac_at_solution, *params = ctx.saved_tensors
        cell, keep, valid, chunk = ctx.cell, ctx.keep, ctx.valid, ctx.chunk
        need_inputs, need_initial, *need_params = ctx.needs_input_grad[5:]
        batch, length = states.shape[:2]
        tiles = _tiles(length, chunk, batch * math.prod(states.shape[2:]))

        # the adjoint recurrence lambda_t = g_t + J_{t+1}^T lambda_{t+1}: the Jacobian of step t + 1, transposed, at t
        successor = inputs.new_empty(batch, length, *_jacobian_shape(cell, tuple(states.shape[2:])))
        successor[:, -1] = 0
        for tile in tiles:
            if jac_at_solution is not None:
                jac = jac_at_solution[:, tile]
            else:  # the sequential fallback changed the states: evaluate the Jacobians there
                h_prev = _previous(states, initial_state, tile)
                tile_keep, tile_valid = _sliced(keep, tile), _sliced(valid, tile)
                _, jac = masked_step(cell, h_prev, inputs[:, tile], params, tile_keep, tile_valid, True)
            jac = _transpose(jac, cell.block)
            if tile.start == 0:
                successor[:, : tile.stop - 1] = jac[:, 1:]
            else:
                successor[:, tile.start - 1 : tile.stop - 1] = jac
        adjoint = linear_scan_(
            successor,
            grad_states.contiguous().clone(),
            None,
            cell.block,
            chunk,
            reverse=True,
            products=torch.empty_like(successor),
        )
        del successor

        # gradients of everything the steps read: one VJP of the cell at the solution, tile by tile
        grad_inputs = torch.empty_like(inputs) if need_inputs else None
        grad_initial = None
        leaf_params = tuple(p.detach().requires_grad_(need) for p, need in zip(params, need_params, strict=True))
        grad_params = [torch.zeros_like(p) if need else None for p, need in zip(params, need_params, strict=True)]
        wanted_params = [p for p, need in zip(leaf_params, need_params, strict=True) if need]
        for tile in tiles:
            want_initial = need_initial and tile.start == 0
            h_prev = _previous(states, initial_state, tile).detach().requires_grad_(want_initial)
            tile_inputs = inputs[:, tile].detach().requires_grad_(need_inputs)
            wrt = ([tile_inputs] if need_inputs else []) + ([h_prev] if want_initial else []) + wanted_params
            if not wrt:
                continue
            with torch.enable_grad():
                new, _ = masked_step(
                    cell, h_prev, tile_inputs, leaf_params, _sliced(keep, tile), _sliced(valid, tile), False
                )
                grads = list(torch.autograd.grad(new, wrt, adjoint[:, tile], allow_unused=True))
            if need_inputs:
                grad_inputs[:, tile] = grads.pop(0)
            if want_initial:
                grad_initial = grads.pop(0)[:, 0]
            for i, need in enumerate(need_params):
                if need:
                    grad = grads.pop(0)
                    if grad is not None:
                        grad_params[i] += grad
        return None, None, None, None, None, grad_inputs, grad_initial, *grad_params


def _prepare(cell, inputs, initial_state, mask, reset, pad):
    """Zero initial state if none; masks broadcast against states; `pad` identity steps appended (False in `valid`)."""
    batch, length = inputs.shape[:2]
    if initial_state is None:
        initial_state = inputs.new_zeros(batch, *cell.state_shape(inputs))
    if pad:
        mask = mask if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=inputs.device)
        mask = torch.cat([mask, mask.new_zeros(batch, pad)], dim=1)
        if reset is not None:
            reset = torch.cat([reset, reset.new_zeros(batch, pad)], dim=1)
    keep, valid = _step_masks(mask, reset, _channel_dims(cell.block), inputs.dtype)
    return initial_state.to(inputs.dtype), keep, valid


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
    chunk_size: int | None = None,
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
        chunk_size: chunk length of the scan (None: about sqrt(T)).

    Returns:
        all states `[B, T, ...]` and the `NewtonStats` of this solve.
    """
    stats = stats if stats is not None else NewtonStats()
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    tol = default_tolerance(inputs.dtype) if tol is None else tol
    length = inputs.shape[1]
    chunk = chunk_size or _chunk_length(length)
    pad = (-length) % chunk
    initial_state, keep, valid = _prepare(cell, inputs, initial_state, mask, reset, pad)
    if pad:
        inputs = torch.cat([inputs, inputs.new_zeros(inputs.shape[0], pad, *inputs.shape[2:])], dim=1)
    states = _NewtonRecurrence.apply(
        cell, (tol, max_iter, chunk, length), stats, keep, valid, inputs.contiguous(), initial_state, *params
    )
    return states[:, :length], stats


def sequential_recurrence(
    cell,
    inputs: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    initial_state: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> torch.Tensor:
    """All states of the same masked cell as a time loop under autograd (`unbind`/`stack`, linear in T)."""
    initial_state, keep, valid = _prepare(cell, inputs, initial_state, mask, reset, 0)
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

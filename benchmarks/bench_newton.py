"""Newton-parallel training of ParaRNN's cells: Newton vs the same cell run sequentially, and vs `torch.nn.LSTM`.

For each cell (ParaGRU, ParaLSTM), width H and batch B, on the same gate inputs `[B, T, 3, H]` (fp32, ParaRNN's
initialisation: diagonal recurrent weights normal(0, 2/sqrt(5H)), peepholes likewise, unit-normal gate inputs):
- `newton`: `ops_newton.newton_recurrence` (Newton iterations + adjoint backward),
- `sequential`: `ops_newton.sequential_recurrence`, the same masked cell as a time loop under autograd (BPTT),
- `torch.nn.LSTM(H, H)` on `[B, T, H]`: the fused classic LSTM of the same width (its input GEMM included).
Training = forward + backward w.r.t. the inputs and all parameters, tokens/s = B*T / time. Also: Newton iterations to
converge vs T.

    python benchmarks/bench_newton.py                  # B=8/H=256 and B=2/H=64, T = 512 ... 8192, 2 threads
    python benchmarks/bench_newton.py --quick          # smoke run, < 60 s

Ends with `RATIO newton / sequential ...` lines at T = 4096 (speed-up; the target is >= 5x) for each shape.
"""

from __future__ import annotations

import argparse
import math

import torch
from common import add_common_arguments, best_of, machine_info, markdown_table, print_header, ratio_line, write_json
from torch import nn

from hybridzoo.modeling.ops_newton import NewtonStats, newton_recurrence, sequential_recurrence
from hybridzoo.modeling.ops_pararnn import PARAGRU, PARALSTM

CELLS = {"paragru": PARAGRU, "paralstm": PARALSTM}


def problem(cell, batch: int, length: int, hidden: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    std = 2.0 / math.sqrt(5 * hidden)
    inputs = torch.randn(batch, length, 3, hidden, generator=gen)
    params = [std * torch.randn(3, hidden, generator=gen)]
    if cell.block == 2:
        params.append(std * torch.randn(2, hidden, generator=gen))
    shape = (batch, length, hidden) if cell.block == 1 else (batch, length, 2, hidden)
    return inputs, params, torch.randn(shape, generator=gen)


class QuasiDeerLSTM:
    """The classic LSTM cell (gates i, f, g, o; dense recurrent matrix `W_hh`) for quasi-DEER: the exact step, but
    Newton's linearisation keeps only the diagonal of `W_hh` (so each channel's `[c, h]` Jacobian is a 2x2 block).
    Same fixed point, more iterations; forward only (the adjoint would need the dense Jacobian)."""

    block = 2

    @staticmethod
    def state_shape(inputs: torch.Tensor) -> tuple[int, ...]:
        return (2, inputs.shape[-1])

    @staticmethod
    def step(state, inputs, params, jacobian):
        (weight_hh,) = params
        hidden = inputs.shape[-1]
        c, h = state.unbind(-2)
        gates = inputs + (h @ weight_hh.t()).unflatten(-1, (4, hidden))
        i, f, g, o = gates.unbind(-2)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * c + i * g
        tanh_c = torch.tanh(c_new)
        new = torch.stack([c_new, o * tanh_c], dim=-2)
        if not jacobian:
            return new, None
        d_i, d_f, d_g, d_o = torch.diagonal(weight_hh.view(4, hidden, hidden), dim1=-2, dim2=-1).unbind(0)
        dc_dh = c * f * (1 - f) * d_f + g * i * (1 - i) * d_i + i * (1 - g * g) * d_g
        dh_dc_new = o * (1 - tanh_c * tanh_c)
        dh_dh = o * (1 - o) * d_o * tanh_c + dh_dc_new * dc_dh
        jac = torch.stack([torch.stack([f, dc_dh], -2), torch.stack([dh_dc_new * f, dh_dh], -2)], -3)
        return new, jac


class QuasiDeerSLSTM:
    """The sLSTM cell (exponential gating, stabiliser `m`, per-head dense `R`) for quasi-DEER: the exact step, but the
    Newton linearisation keeps only the diagonal of the full Jacobian over the state `[c | n | m | h]` (one channel per
    entry, `block = 1`): dc/dc = dn/dn = the stabilised forget gate, dm/dm = 1 where the forget branch of the max wins,
    dh/dh through the diagonal of each head's `R`. The cross terms (c, n, m -> h, h -> c, n) are dropped. A zero `m`
    at t = 0 gives the same `h` as the reference's `-inf` (h = c / n is invariant to `m`). Forward only."""

    block = 1

    def __init__(self, num_heads: int, head_dim: int) -> None:
        self.num_heads, self.head_dim = num_heads, head_dim

    def state_shape(self, inputs: torch.Tensor) -> tuple[int, ...]:
        return (4 * inputs.shape[-1],)

    def step(self, state, inputs, params, jacobian):
        (weight,) = params  # [H, d, 4d]: a head's h -> its i, f, z, o
        heads, d = self.num_heads, self.head_dim
        c, n, m, h = state.unflatten(-1, (4, heads * d)).unbind(-2)
        recurrent = torch.einsum("...hd,hdk->...hk", h.unflatten(-1, (heads, d)), weight)  # [..., H, 4d]
        recurrent = recurrent.unflatten(-1, (4, d)).transpose(-3, -2).flatten(-2)  # [..., 4, H*d]
        i_pre, f_pre, z_pre, o_pre = (inputs + recurrent).unbind(-2)
        log_f_plus_m = torch.nn.functional.logsigmoid(f_pre) + m
        m_new = torch.maximum(log_f_plus_m, i_pre)
        input_gate, forget = torch.exp(i_pre - m_new), torch.exp(log_f_plus_m - m_new)
        tanh_z, out_gate = torch.tanh(z_pre), torch.sigmoid(o_pre)
        c_new = forget * c + input_gate * tanh_z
        n_new = forget * n + input_gate
        ratio = c_new / n_new
        new = torch.cat([c_new, n_new, m_new, out_gate * ratio], dim=-1)
        if not jacobian:
            return new, None
        diagonal = torch.diagonal(weight.view(heads, d, 4, d), dim1=1, dim2=3)  # [H, 4, d]: R's own-unit entries
        r_i, r_f, r_z, r_o = diagonal.transpose(0, 1).flatten(-2).unbind(0)  # [H*d] each
        # d(c/n) through each gate, m held fixed (h does not depend on m)
        d_i = input_gate * (tanh_z - ratio) / n_new
        d_f = forget * torch.sigmoid(-f_pre) * (c - ratio * n) / n_new
        d_z = input_gate * (1 - tanh_z * tanh_z) / n_new
        dh_dh = out_gate * (d_i * r_i + d_f * r_f + d_z * r_z) + out_gate * (1 - out_gate) * ratio * r_o
        dm_dm = (log_f_plus_m >= i_pre).to(state.dtype)
        return new, torch.cat([forget, forget, dm_dm, dh_dh], dim=-1)


def quasi_deer_slstm(args, lengths) -> list[list[str]]:
    """Forward (no grad) of the sLSTM by quasi-DEER vs its sequential loop (`slstm_recurrence`); iterations vs T."""
    from hybridzoo.modeling.ops_slstm import slstm_recurrence

    rows = []
    batch, heads, head_dim = (2, 2, 16) if args.quick else (8, 4, 64)
    width = heads * head_dim
    # the block's initialisation (R ~ normal(0, 0.02), forget bias linspace(3, 6) per head) and a trained-like R
    # (normal(0, 1/sqrt(d)), comparable to the input weights) with the same biases
    forget_bias = torch.linspace(3.0, 6.0, head_dim).repeat(heads)
    for label, std in (("init R", 0.02), ("R ~ 1/sqrt(d)", 1 / math.sqrt(head_dim))):
        weight = std * torch.randn(heads, head_dim, 4 * head_dim, generator=torch.Generator().manual_seed(0))
        for length in lengths:
            gates = torch.randn(batch, length, 4, heads, head_dim, generator=torch.Generator().manual_seed(length))
            gates[:, :, 1] += forget_bias.view(heads, head_dim)
            flat = gates.flatten(-2)  # [B, T, 4, H*d]
            stats = NewtonStats()
            cell = QuasiDeerSLSTM(heads, head_dim)

            def newton(stats=stats, flat=flat, cell=cell, length=length, weight=weight):
                return newton_recurrence(cell, flat, (weight,), max_iter=length, stats=stats)[0]

            calls = {
                "quasi-DEER": newton,
                "slstm loop": lambda gates=gates, weight=weight: slstm_recurrence(gates, weight),
            }
            with torch.no_grad():
                reference = slstm_recurrence(gates, weight)[0].flatten(-2)
                error = float((newton()[..., 3 * width :] - reference).abs().max())
                seconds = best_of(calls, args.repeats or (1 if args.quick else 2), args.clock)
            rows.append(
                [f"slstm {label} B={batch} H={width} ({heads} heads) T={length}", str(stats.iterations), f"{error:.1e}"]
                + [f"{batch * length / s:,.0f}" for s in seconds.values()]
            )
            print(rows[-1], flush=True)
    return rows


def quasi_deer_lstm(args, lengths) -> list[list[str]]:
    """Forward (no grad) of the classic LSTM by quasi-DEER vs its sequential loop and nn.LSTM; iterations vs T."""
    from hybridzoo.modeling.ops_lstm import lstm_loop

    rows = []
    batch, hidden = (2, 32) if args.quick else (8, 256)
    torch.manual_seed(0)
    lstm = nn.LSTM(hidden, hidden, batch_first=True)
    weight_hh = lstm.weight_hh_l0.detach()
    bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()
    for length in lengths:
        x = torch.randn(batch, length, hidden, generator=torch.Generator().manual_seed(length))
        gates_x = (x @ lstm.weight_ih_l0.detach().t() + bias).unflatten(-1, (4, hidden))
        zeros = torch.zeros(batch, hidden)
        stats = NewtonStats()

        def newton(stats=stats, gates_x=gates_x, length=length):
            return newton_recurrence(QuasiDeerLSTM(), gates_x, (weight_hh,), max_iter=length, stats=stats)[0]

        calls = {
            "quasi-DEER": newton,
            "lstm loop": lambda x=x, zeros=zeros: lstm_loop(x, lstm.weight_ih_l0, weight_hh, bias, zeros, zeros),
            "torch.nn.LSTM": lambda x=x: lstm(x),
        }
        with torch.no_grad():
            reference = lstm(x)[0]
            error = float((newton()[:, :, 1] - reference).abs().max())
            seconds = best_of(calls, args.repeats or (1 if args.quick else 2), args.clock)
        rows.append(
            [f"lstm B={batch} H={hidden} T={length}", str(stats.iterations), f"{error:.1e}"]
            + [f"{batch * length / s:,.0f}" for s in seconds.values()]
        )
        print(rows[-1], flush=True)
    return rows


def evaluation_call(cell, inputs, params, tile_elements: int = 1 << 16):
    """One evaluation of the cell with its Jacobian at every position (no autograd), in time tiles of ~64k elements as
    the solver evaluates it: the unit of Newton's work. With ~3 iterations the solver needs at least 5 of them (the
    initial guess, 3 iterations, the convergence check) before its scans and its backward pass, so
    `sequential / (5 x evaluation)` bounds the speed-up Newton can reach on this machine at this shape."""
    batch, length, _, hidden = inputs.shape
    state = torch.zeros((batch, length, *cell.state_shape(inputs)))
    tile = max(1, tile_elements // (batch * hidden))

    def evaluate() -> None:
        with torch.no_grad():
            for start in range(0, length, tile):
                cell.step(state[:, start : start + tile], inputs[:, start : start + tile], params, True)

    return evaluate


def train_calls(cell, inputs, params, grad, lstm: nn.LSTM, lstm_x, lstm_grad) -> dict:
    def newton() -> None:
        leaves = [inputs.detach().requires_grad_(), *(p.detach().requires_grad_() for p in params)]
        states, _ = newton_recurrence(cell, leaves[0], tuple(leaves[1:]))
        states.backward(grad)

    def sequential() -> None:
        leaves = [inputs.detach().requires_grad_(), *(p.detach().requires_grad_() for p in params)]
        sequential_recurrence(cell, leaves[0], tuple(leaves[1:])).backward(grad)

    def fused_lstm() -> None:
        lstm(lstm_x.detach().requires_grad_())[0].backward(lstm_grad)

    return {"newton": newton, "sequential": sequential, "torch.nn.LSTM": fused_lstm}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--shapes", type=str, default=None, help="comma-separated BxH, e.g. 8x256,2x64")
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated sequence lengths")
    parser.set_defaults(threads=2, clock="wall")
    args = parser.parse_args(argv)
    shapes = [
        tuple(int(v) for v in s.split("x"))
        for s in (args.shapes or ("2x32" if args.quick else "8x256,2x64")).split(",")
    ]
    lengths = [int(x) for x in (args.lengths or ("256,512" if args.quick else "512,1024,2048,4096,8192")).split(",")]
    repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)

    info = machine_info(args.threads, args.clock)
    print_header("Newton (ParaRNN) vs the same cell sequentially vs torch.nn.LSTM, fwd+bwd, fp32", info)
    rows, iteration_rows, results = [], [], []
    for batch, hidden in shapes:
        torch.manual_seed(0)
        lstm = nn.LSTM(hidden, hidden, batch_first=True)
        for name, cell in CELLS.items():
            iterations = []
            for length in lengths:
                inputs, params, grad = problem(cell, batch, length, hidden)
                gen = torch.Generator().manual_seed(length)
                lstm_x, lstm_grad = (
                    torch.randn(batch, length, hidden, generator=gen),
                    torch.randn(batch, length, hidden, generator=gen),
                )
                calls = train_calls(cell, inputs, params, grad, lstm, lstm_x, lstm_grad)
                for call in calls.values():  # warm-up
                    call()
                seconds = best_of(calls, repeats, args.clock)
                evaluation = best_of({"evaluation": evaluation_call(cell, inputs, params)}, repeats, args.clock)
                bound = seconds["sequential"] / (5 * evaluation["evaluation"])
                stats = NewtonStats()
                with torch.no_grad():
                    newton_recurrence(cell, inputs, tuple(params), stats=stats)
                iterations.append(stats.iterations)
                tokens = batch * length
                rows.append(
                    [f"{name} B={batch} H={hidden} T={length}"]
                    + [f"{tokens / s:,.0f}" for s in seconds.values()]
                    + [
                        f"{seconds['sequential'] / seconds['newton']:.2f}x",
                        f"{seconds['torch.nn.LSTM'] / seconds['newton']:.2f}x",
                        str(stats.iterations),
                        f"{1000 * evaluation['evaluation']:.1f}",
                        f"{bound:.1f}x",
                    ]
                )
                results.append(
                    {
                        "cell": name,
                        "batch": batch,
                        "hidden": hidden,
                        "length": length,
                        "seconds": seconds,
                        "evaluation_seconds": evaluation["evaluation"],
                        "speedup_bound": bound,
                        "iterations": stats.iterations,
                        "residual": stats.residual,
                    }
                )
                print(rows[-1], flush=True)
            iteration_rows.append([f"{name} B={batch} H={hidden}", *map(str, iterations)])
    headers = [
        "case",
        "newton tok/s",
        "sequential tok/s",
        "torch.nn.LSTM tok/s",
        "newton speed-up vs sequential",
        "newton speed-up vs nn.LSTM",
        "Newton iterations",
        "one cell evaluation ms",
        "bound: sequential / 5 evaluations",
    ]
    print()
    print(markdown_table(headers, rows))
    print("\nNewton iterations to converge (defect <= 32 float32 ulps) vs T:\n")
    print(markdown_table(["cell", *[f"T={length}" for length in lengths]], iteration_rows))
    print(f"\n{repeats} timed runs per cell after a warm-up, best kept\n")
    print("\nquasi-DEER for the classic `lstm` cell (dense W_hh, diagonal Jacobian), forward only, no grad:\n")
    deer_rows = quasi_deer_lstm(args, lengths[:3])
    print(
        markdown_table(
            ["case", "iterations", "max |h - nn.LSTM|", "quasi-DEER tok/s", "lstm loop tok/s", "torch.nn.LSTM tok/s"],
            deer_rows,
        )
    )
    print("\nquasi-DEER for the `slstm` cell (diagonal of the full Jacobian over [c, n, m, h]), forward only:\n")
    slstm_rows = quasi_deer_slstm(args, lengths[:2])  # hundreds of iterations: the two shortest lengths suffice
    print(
        markdown_table(
            ["case", "iterations", "max |h - slstm loop|", "quasi-DEER tok/s", "slstm loop tok/s"], slstm_rows
        )
    )
    write_json(
        args.json,
        {"machine": info, "results": results, "quasi_deer_lstm": deer_rows, "quasi_deer_slstm": slstm_rows},
    )

    target_length = 4096 if 4096 in lengths else lengths[-1]
    for r in results:
        if r["length"] == target_length:
            speedup = r["seconds"]["sequential"] / r["seconds"]["newton"]
            label = f"newton / sequential speed-up, {r['cell']} B={r['batch']} H={r['hidden']} T={target_length}"
            print(ratio_line(label, speedup, ">= 5x", speedup >= 5))
            print(f"  (bound at this shape: {r['speedup_bound']:.1f}x = sequential / 5 cell evaluations)")


if __name__ == "__main__":
    main()

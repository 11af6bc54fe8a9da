"""Benchmark our chunked gated delta rule against transformers' `torch_chunk_gated_delta_rule` on CPU.

Both run on identical inputs (fp32, q/k L2-normalised, GDN-style decays): forward (no grad) and forward + backward
(loss = <o, w_o> + <S_T, w_s>, gradients for q, k, v, g, beta). Reported times are the minimum over `--repeats` runs
after a warm-up, the two implementations interleaved (`common.best_of`). Defaults: 2 threads, wall clock (the issue's
setting, for a quiet machine); on a shared, oversubscribed machine `--threads 1 --clock cpu` gives steadier numbers.

    python benchmarks/bench_gdn_kernel.py            # full table, B=2 H=4, D in {64, 128}, T up to 8192 (a few min)
    python benchmarks/bench_gdn_kernel.py --quick    # smoke run, < 30 s

The last line reads `RATIO fwd+bwd transformers time / ours at T>=2048 (min over cases): X.XXx (target >= 2x: ...)`.
"""

from __future__ import annotations

import argparse
import math

import torch
from common import add_common_arguments, best_of, machine_info, print_header, ratio_line, timed, write_json
from torch.nn import functional as F
from transformers.models.qwen3_next import modeling_qwen3_next

from hybridzoo.modeling.ops_gated_delta import chunk_gated_delta_rule

# the hub-kernel decorator may have bound fla at import time; `__wrapped__` is the plain torch function
hf_chunk_gated_delta_rule = getattr(
    modeling_qwen3_next.torch_chunk_gated_delta_rule, "__wrapped__", modeling_qwen3_next.torch_chunk_gated_delta_rule
)


def chunk_flops(batch: int, heads: int, length: int, chunk: int, dk: int, dv: int, backward: bool) -> float:
    """Main matmul flops of our chunk algorithm (2 per multiply-add), per (b, h) token:

    forward:  K K^T and Q K^T (2 C Dk), U = T (beta V) and W = T (beta K) (C (Dv + Dk)), P V' (C Dv),
              W S, Qd S, Kd^T V' (3 Dk Dv)                                  -> 2 (3 C Dk + 2 C Dv + 3 Dk Dv)
    backward: dP, P^T dO, T^T dU, dVb U^T (4 C Dv); T^T dW, dKb W^T, dPL K, dPL^T Q, dKK K (5 C Dk);
              Kd dS, V' dS^T, Qd^T dO, W^T dV', dO S^T, dV' S^T (6 Dk Dv)    -> 2 (5 C Dk + 4 C Dv + 6 Dk Dv)
    The C x C triangular inverse (C^2 / 3 per token) and elementwise work are not counted.
    """
    per_token = 3 * chunk * dk + 2 * chunk * dv + 3 * dk * dv
    if backward:
        per_token += 5 * chunk * dk + 4 * chunk * dv + 6 * dk * dv
    return 2.0 * batch * heads * length * per_token


def matmul_peak_gflops(clock: str, size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 GEMM rate at the current thread count (best of a few large square matmuls)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b, clock) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def make_inputs(batch: int, length: int, heads: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, length, heads, dim, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, length, heads, dim, generator=gen), dim=-1)
    v = torch.randn(batch, length, heads, dim, generator=gen)
    # GDN parameterisation: g = -exp(A_log) softplus(a + dt_bias), A in [1, 16], dt in [1e-3, 1e-1]
    a_log = torch.empty(heads).uniform_(1, 16, generator=gen).log()
    dt = torch.exp(torch.rand(heads, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    g = -a_log.exp() * F.softplus(torch.randn(batch, length, heads, generator=gen) + dt_bias)
    beta = torch.sigmoid(torch.randn(batch, length, heads, generator=gen))
    return [q, k, v, g, beta]


def run_ours(inputs, chunk: int):
    return chunk_gated_delta_rule(*inputs, chunk_size=chunk)


def run_hf(inputs):
    return hf_chunk_gated_delta_rule(*inputs, chunk_size=64, output_final_state=True)


def bench_case(batch, heads, length, dim, chunk, repeats, clock) -> dict:
    inputs = make_inputs(batch, length, heads, dim)
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(batch, length, heads, dim, generator=gen)
    w_state = torch.randn(batch, heads, dim, dim, generator=gen)

    def forward(fn):
        def call():
            with torch.no_grad():
                return fn(inputs)

        return call

    def forward_backward(fn):
        def call():
            leaves = [x.detach().requires_grad_() for x in inputs]
            out, state = fn(leaves)
            ((out * w_out).sum() + (state * w_state).sum()).backward()
            return [x.grad for x in leaves]

        return call

    ours_fn, hf_fn = (lambda x: run_ours(x, chunk)), run_hf
    (o1, s1), (o2, s2) = forward(ours_fn)(), forward(hf_fn)()
    out_diff = (o1 - o2).abs().max().item()
    state_diff = (s1 - s2).abs().max().item()
    assert out_diff < 1e-4 and state_diff < 1e-4, f"outputs disagree: {out_diff:.2e} / {state_diff:.2e}"
    grads1, grads2 = forward_backward(ours_fn)(), forward_backward(hf_fn)()  # also the warm-up
    # gradients: max abs difference relative to the largest reference entry, per input (dg sums over many terms)
    grad_diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads1, grads2, strict=True))

    calls = {
        "fwd_ours": forward(ours_fn),
        "fwd_hf": forward(hf_fn),
        "fb_ours": forward_backward(ours_fn),
        "fb_hf": forward_backward(hf_fn),
    }
    times = best_of(calls, repeats, clock)
    fwd_flops = chunk_flops(batch, heads, length, chunk, dim, dim, backward=False)
    fb_flops = chunk_flops(batch, heads, length, chunk, dim, dim, backward=True)
    return {
        "B": batch,
        "H": heads,
        "T": length,
        "D": dim,
        "chunk": chunk,
        **{f"{name}_ms": 1e3 * t for name, t in times.items()},
        "fwd_speedup": times["fwd_hf"] / times["fwd_ours"],
        "fb_speedup": times["fb_hf"] / times["fb_ours"],
        "fwd_gflops": fwd_flops / times["fwd_ours"] / 1e9,
        "fb_gflops": fb_flops / times["fb_ours"] / 1e9,
        "max_abs_diff_out": out_diff,
        "max_abs_diff_state": state_diff,
        "max_rel_diff_grad": grad_diff,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.set_defaults(threads=2, clock="wall")  # the setting: 2 threads, elapsed time
    parser.add_argument("--chunk-size", type=int, default=32, help="our chunk size (transformers always uses 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dims", type=str, default=None, help="comma-separated head dims (Dk = Dv)")
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated sequence lengths")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    dims = [int(x) for x in args.dims.split(",")] if args.dims else ([64] if args.quick else [64, 128])
    lengths = (
        [int(x) for x in args.lengths.split(",")]
        if args.lengths
        else ([256, 512] if args.quick else [512, 1024, 2048, 4096, 8192])
    )
    repeats = args.repeats or (2 if args.quick else 5)
    peak_size = 1024 if args.quick else 2048
    peak = matmul_peak_gflops(args.clock, peak_size)
    info = machine_info(args.threads, args.clock)
    print_header("Chunked gated delta rule: ours vs transformers' torch_chunk_gated_delta_rule", info)
    print(
        f"B={args.batch} H={args.heads}, fp32, ours chunk {args.chunk_size} vs transformers chunk 64, min of "
        f"{repeats} runs; {peak_size}^2 fp32 matmul here: {peak:.1f} GFLOP/s (same threads and clock)\n"
    )
    results = []
    header = (
        "| D | T | fwd ours ms | fwd HF ms | fwd speedup | fwd+bwd ours ms | fwd+bwd HF ms | fwd+bwd speedup "
        "| ours fwd GFLOP/s | ours fwd+bwd GFLOP/s (% peak) | max abs diff o / rel. diff grads |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for dim in dims:
        for length in lengths:
            r = bench_case(args.batch, args.heads, length, dim, args.chunk_size, repeats, args.clock)
            results.append(r)
            print(
                f"| {dim} | {length} | {r['fwd_ours_ms']:.1f} | {r['fwd_hf_ms']:.1f} | {r['fwd_speedup']:.2f}x "
                f"| {r['fb_ours_ms']:.1f} | {r['fb_hf_ms']:.1f} | {r['fb_speedup']:.2f}x | {r['fwd_gflops']:.1f} "
                f"| {r['fb_gflops']:.1f} ({100 * r['fb_gflops'] / peak:.0f}%) "
                f"| {r['max_abs_diff_out']:.1e} / {r['max_rel_diff_grad']:.1e} |",
                flush=True,
            )
    write_json(args.json, {"machine": info, "matmul_peak_gflops": peak, "results": results})
    min_len = 2048 if any(r["T"] >= 2048 for r in results) else min(r["T"] for r in results)
    ratio = min(r["fb_speedup"] for r in results if r["T"] >= min_len)
    print("\n" + ratio_line(f"fwd+bwd transformers time / ours at T>={min_len} (min over cases)", ratio, ">= 2x",
                            ratio >= 2.0))
    # issue 19: our fwd+bwd at >= 50% of this machine's fp32 matmul rate for D=128, T >= 2048
    rated = [r for r in results if r["D"] == 128 and r["T"] >= 2048]
    if rated:
        share = min(r["fb_gflops"] for r in rated) / peak
        print(ratio_line("ours fwd+bwd GFLOP/s / fp32 matmul GFLOP/s at D=128, T>=2048 (min over cases)", share,
                         ">= 0.5x", share >= 0.5))


if __name__ == "__main__":
    main()

"""LSTM block throughput: hybridzoo's `lstm` block against a bare `torch.nn.LSTM` of the same size.

Three candidates on the same input `[B, T, hidden]` (fp32, fresh zero state, no padding: the common case):
- `nn.LSTM(hidden, hidden)`: the bare fused LSTM,
- `nn.LSTM` + `Linear(hidden, hidden)`: the same plus the block's output projection (the block's own extra math),
- the `lstm` block (`HybridLSTM`): `nn.LSTM` -> `o_proj`, with its state handling.
Training = forward + backward (w.r.t. the input and all weights); inference = forward under `no_grad`.

    python benchmarks/bench_lstm.py            # B=8, T in {512, 2048}, hidden 256 and 512
    python benchmarks/bench_lstm.py --quick    # smoke run, < 60 s

Ends with `RATIO lstm block / torch.nn.LSTM ...` (time ratio; the target is <= 1.2x).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import add_common_arguments, best_of, machine_info, markdown_table, print_header, ratio_line, write_json
from torch import nn

from hybridzoo import HybridConfig
from hybridzoo.modeling.block_lstm import HybridLSTM


def candidates(hidden: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Three callables `x -> y` with the same LSTM weights."""
    torch.manual_seed(0)
    config = HybridConfig(hidden_size=hidden, num_hidden_layers=1, block_types=["lstm"], num_attention_heads=1)
    block = HybridLSTM(config)
    bare = nn.LSTM(hidden, hidden, batch_first=True)
    bare.load_state_dict(block.lstm.state_dict())
    projection = nn.Linear(hidden, hidden, bias=False)
    projection.load_state_dict(block.o_proj.state_dict())
    return {
        "torch.nn.LSTM": lambda x: bare(x)[0],
        "nn.LSTM + Linear": lambda x: projection(bare(x)[0]),
        "lstm block": lambda x: block(x)[0],
    }


def train_call(fn: Callable, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        leaf = x.detach().requires_grad_()
        fn(leaf).backward(grad)

    return call


def infer_call(fn: Callable, x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            fn(x)

    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated sequence lengths")
    parser.add_argument("--hiddens", type=str, default=None, help="comma-separated widths (cell = hidden)")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in (args.lengths or ("128" if args.quick else "512,2048")).split(",")]
    hiddens = [int(x) for x in (args.hiddens or ("128" if args.quick else "256,512")).split(",")]
    repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)

    info = machine_info(args.threads, args.clock)
    print_header(f"LSTM block vs torch.nn.LSTM, batch {args.batch}, fp32", info)
    rows, results = [], []
    for hidden in hiddens:
        fns = candidates(hidden)
        for length in lengths:
            gen = torch.Generator().manual_seed(length)
            x = torch.randn(args.batch, length, hidden, generator=gen)
            grad = torch.randn(args.batch, length, hidden, generator=gen)
            for mode in ("train", "inference"):
                calls = {
                    name: train_call(fn, x, grad) if mode == "train" else infer_call(fn, x) for name, fn in fns.items()
                }
                for call in calls.values():  # warm-up
                    call()
                seconds = best_of(calls, repeats, args.clock)
                tokens = args.batch * length
                base = seconds["torch.nn.LSTM"]
                rows.append(
                    [f"H={hidden} T={length} {mode}"]
                    + [f"{tokens / s:,.0f} ({s / base:.2f})" for s in seconds.values()]
                )
                results.append({"hidden": hidden, "length": length, "mode": mode, "seconds": seconds})
    print(markdown_table(["case", *[f"{name} tok/s (time ×nn.LSTM)" for name in fns]], rows))
    print(f"\n{repeats} timed runs per cell after a warm-up, best kept\n")
    write_json(args.json, {"machine": info, "batch": args.batch, "results": results})

    worst = max(r["seconds"]["lstm block"] / r["seconds"]["torch.nn.LSTM"] for r in results)
    print(ratio_line("lstm block / torch.nn.LSTM time, worst case", worst, "<= 1.2x", worst <= 1.2))


if __name__ == "__main__":
    main()

"""Training throughput: tokens/s of one optimizer step (forward + backward + AdamW) per model and context length.

Every model has the same width, depth and parameter count (the MLP width is adjusted to match the
qwen3-next-style hybrid's count), batch 1, fp32, random tokens, loss on all of them:
- the zoo's architectures (`configs/zoo.py`, "small" shape unless overridden: hidden 256, 8 layers, 4 heads / 2 KV),
- `LlamaForCausalLM`, the all-attention baseline,
- transformers' `Qwen3NextForCausalLM` with a dense MLP (`num_experts=0`), 3 linear : 1 full attention and the
  same linear-attention head shapes as ours, running its pure-torch fallback (the model a user would pick instead).

    python benchmarks/bench_training.py             # lengths 512, 2048, 8192 (about 15 min on 2 shared cores)
    python benchmarks/bench_training.py --quick     # smoke run, < 60 s

Ends with one `RATIO ...` line per target (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import (
    add_common_arguments,
    best_of,
    count_parameters,
    machine_info,
    markdown_table,
    matched_intermediate_size,
    print_header,
    ratio_line,
    write_json,
)
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM

from hybridzoo import HybridForCausalLM
from hybridzoo.configs.zoo import ARCHITECTURES, layout, zoo_config

HEADLINE = "qwen3-next-style"


def layout_fits(name: str, depth: int) -> bool:
    """Whether zoo architecture `name` has a layout at `depth` layers (fixed-depth sources such as Bamba do not)."""
    try:
        layout(name, depth)
    except ValueError:
        return False
    return True


def build_models(args: argparse.Namespace) -> dict[str, nn.Module]:
    """Every model under test, all with (nearly) the headline hybrid's parameter count."""
    shape = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.lengths) + 1,
    )
    torch.manual_seed(0)
    headline = HybridForCausalLM(zoo_config(HEADLINE, "small", **shape))
    target = count_parameters(headline)

    def matched(build: Callable[[int], nn.Module]) -> nn.Module:
        return build(matched_intermediate_size(build, target, args.layers, args.hidden))

    models: dict[str, nn.Module] = {}
    for name in args.archs:
        if name == HEADLINE:
            models[name] = headline
        elif not layout_fits(name, args.layers):
            print(f"  skipped {name}: its source's layout does not fit {args.layers} layers (see configs/zoo.py)")
        else:
            models[name] = matched(
                lambda width, n=name: HybridForCausalLM(zoo_config(n, "small", **shape, intermediate_size=width))
            )
    models["llama (transformers)"] = matched(
        lambda width: LlamaForCausalLM(LlamaConfig(**shape, intermediate_size=width, tie_word_embeddings=False))
    )
    linear = headline.config  # our GDN head shapes, so both hybrids run the same recurrence sizes
    models["qwen3-next (transformers)"] = matched(
        lambda width: Qwen3NextForCausalLM(
            Qwen3NextConfig(
                **shape,
                intermediate_size=width,
                head_dim=args.hidden // args.heads,
                num_experts=0,  # every layer a dense Qwen3NextMLP (no MoE)
                full_attention_interval=4,  # layers 3, 7, ...: the same 3 linear : 1 full layout as "GGGA"
                linear_num_key_heads=linear.linear_num_key_heads,
                linear_num_value_heads=linear.linear_num_value_heads,
                linear_key_head_dim=linear.linear_key_head_dim,
                linear_value_head_dim=linear.linear_value_head_dim,
                linear_conv_kernel_dim=linear.linear_conv_kernel_dim,
            )
        )
    )
    return models


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated context lengths")
    parser.add_argument("--archs", type=str, default=None, help="comma-separated zoo architectures (default: all)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab, args.layers = min(args.vocab, 4096), min(args.layers, 4)
    lengths = args.lengths or ("128,512" if args.quick else "512,2048,8192")
    args.lengths = [int(x) for x in lengths.split(",")]
    args.archs = args.archs.split(",") if args.archs else list(ARCHITECTURES)
    if HEADLINE not in args.archs:
        args.archs.insert(0, HEADLINE)
    repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)

    info = machine_info(args.threads, args.clock)
    print_header("Training throughput (forward + backward + AdamW), batch 1, fp32", info)
    models = build_models(args)
    steppers = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steppers[name] = (model, optimizer)
        warm = torch.randint(0, args.vocab, (1, min(args.lengths)))
        training_step(model, optimizer, warm)()  # allocator, optimizer state, lazy inits

    results: dict[str, dict[int, float]] = {name: {} for name in models}
    for length in args.lengths:
        tokens = torch.randint(0, args.vocab, (1, length), generator=torch.Generator().manual_seed(length))
        calls = {name: training_step(model, opt, tokens) for name, (model, opt) in steppers.items()}
        seconds = best_of(calls, repeats, args.clock)
        for name, sec in seconds.items():
            results[name][length] = length / sec
        print(f"  T={length}: " + ", ".join(f"{n} {length / s:,.0f} tok/s" for n, s in seconds.items()), flush=True)

    llama, qwen = "llama (transformers)", "qwen3-next (transformers)"
    headers = ["model", "params"] + [f"T={t} tok/s (×Llama)" for t in args.lengths]
    rows = []
    for name, model in models.items():
        cells = [f"{results[name][t]:,.0f} ({results[name][t] / results[llama][t]:.2f})" for t in args.lengths]
        rows.append([name, f"{count_parameters(model) / 1e6:.2f}M", *cells])
    print()
    print(markdown_table(headers, rows))
    print(
        f"\nshape: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV, "
        f"vocab {args.vocab}; {repeats} timed step(s) per cell after a warm-up, best kept\n"
    )
    write_json(
        args.json,
        {
            "machine": info,
            "shape": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "kv_heads")},
            "parameters": {name: count_parameters(model) for name, model in models.items()},
            "tokens_per_second": results,
        },
    )

    short, long = min(args.lengths), max(args.lengths)
    ours = results[HEADLINE]
    r_long = ours[long] / results[llama][long]
    r_qwen = ours[long] / results[qwen][long]
    r_short = ours[short] / results[llama][short]
    print(ratio_line(f"{HEADLINE} / LlamaForCausalLM tokens/s at T={long}", r_long, ">= 1.3x", r_long >= 1.3))
    print(ratio_line(f"{HEADLINE} / Qwen3NextForCausalLM tokens/s at T={long}", r_qwen, ">= 1.1x", r_qwen >= 1.1))
    print(ratio_line(f"{HEADLINE} / LlamaForCausalLM tokens/s at T={short}", r_short, ">= 0.9x", r_short >= 0.9))


if __name__ == "__main__":
    main()

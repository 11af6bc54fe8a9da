"""Training throughput: tokens/s of one optimizer step (forward + backward + AdamW) per model and context length.

Every model trains with torch's fused AdamW (as `hybridzoo train` does since 1 Dec 2026) and has the same width, depth
and parameter count (the MLP width is adjusted to match the qwen3-next-style hybrid's count), batch 1, fp32, random
tokens, loss on all of them:
- the zoo's architectures (`configs/zoo.py`, "small" shape unless overridden: hidden 256, 8 layers, 4 heads / 2 KV),
- `LlamaForCausalLM`, the all-attention baseline,
- transformers' `Qwen3NextForCausalLM` with a dense MLP (`num_experts=0`), 3 linear : 1 full attention and the
  same linear-attention head shapes as ours, running its pure-torch fallback (the model a user would pick instead).

    python benchmarks/bench_training.py             # lengths 512, 2048, 8192 (about 15 min on 2 shared cores)
    python benchmarks/bench_training.py --quick     # smoke run, < 60 s
    python benchmarks/bench_training.py --size tiny --hidden 64 --vocab 4096 --batch 16 --lengths 256 \
        --archs qwen3-next-style,transformer       # the quickstart's text run (16 x 256 tokens per step)

Our models train with their default loss, the chunked LM head + cross-entropy (`ops_cross_entropy.py`; no full
logits); the row "qwen3-next-style (plain loss)" is the same model with `skip_logits=False` (full logits, then
transformers' `ForCausalLMLoss`, as Llama and Qwen3-Next run), to separate the head from the body. Peak memory: how far
a fresh process's peak resident memory rises above its resident memory during one step at the longest length
(activations, gradients, temporaries; the weights and optimizer states are resident before), with glibc told to
return large blocks to the system at once (`MALLOC_MMAP_THRESHOLD_`), so that the resident size follows the live
tensors; one subprocess per model.

Ends with one `RATIO ...` line per target (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable

import torch
from common import (
    add_common_arguments,
    best_of,
    count_parameters,
    load_average,
    machine_info,
    markdown_table,
    matched_intermediate_size,
    peak_memory_of,
    print_header,
    ratio_line,
    write_json,
)
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM

from hybridzoo import HybridForCausalLM
from hybridzoo.configs.zoo import ARCHITECTURES, layout, zoo_config

HEADLINE = "qwen3-next-style"
PLAIN = f"{HEADLINE} (plain loss)"
LLAMA, QWEN = "llama (transformers)", "qwen3-next (transformers)"
# qwen3-next-style tokens/s / Llama's at these lengths (issue 19), and its peak step memory / Llama's at the longest
SPEED_TARGETS = {512: 1.0, 2048: 1.15, 8192: 1.5}
MEMORY_TARGET = 0.8


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
    headline = HybridForCausalLM(zoo_config(HEADLINE, args.size, **shape))
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
                lambda width, n=name: HybridForCausalLM(zoo_config(n, args.size, **shape, intermediate_size=width))
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


def training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, plain_loss: bool = False
) -> Callable[[], None]:
    extra = {"skip_logits": False} if plain_loss else {}

    def step() -> None:
        loss = model(input_ids=tokens, labels=tokens, use_cache=False, **extra).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_peak_memory(args: argparse.Namespace, name: str, length: int) -> int | None:
    """Peak step memory of model `name` at `length`, measured in a fresh process (see the module docstring)."""
    command = [
        sys.executable, __file__, "--memory-of", name, "--lengths", str(length), "--archs", ",".join(args.archs),
        "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--layers", str(args.layers),
        "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--threads", str(args.threads),
        "--size", args.size, "--batch", str(args.batch),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("PEAK_BYTES "):
            value = line.split()[1]
            return None if value == "None" else int(value)
    print(f"  memory of {name}: measurement failed\n{result.stderr[-2000:]}", flush=True)
    return None


def memory_child(args: argparse.Namespace) -> None:
    """`--memory-of NAME`: one warm-up step (optimizer state), then print the peak memory of one step."""
    models = build_models(args)
    name = args.memory_of
    model = models[HEADLINE if name == PLAIN else name]
    del models
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer runs it
    training_step(model, optimizer, torch.randint(0, args.vocab, (args.batch, 16)), name == PLAIN)()
    tokens = torch.randint(0, args.vocab, (args.batch, max(args.lengths)), generator=torch.Generator().manual_seed(0))
    print(f"PEAK_BYTES {peak_memory_of(training_step(model, optimizer, tokens, name == PLAIN))}", flush=True)


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
    parser.add_argument("--size", type=str, default="small", help="zoo size the shape options override")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--memory-of", type=str, default=None, help=argparse.SUPPRESS)  # internal: one child
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
    if args.memory_of:
        memory_child(args)
        return

    info = machine_info(args.threads, args.clock)
    print_header("Training throughput (forward + backward + AdamW), batch 1, fp32", info)
    models = build_models(args)
    models = {HEADLINE: models[HEADLINE], PLAIN: models[HEADLINE], **models}  # the plain-loss row next to it
    steppers = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer runs it
        steppers[name] = (model, optimizer, name == PLAIN)
        warm = torch.randint(0, args.vocab, (args.batch, min(args.lengths)))
        training_step(model, optimizer, warm, name == PLAIN)()  # allocator, optimizer state, lazy inits

    results: dict[str, dict[int, float]] = {name: {} for name in models}
    peak: dict[str, int | None] = {}
    for length in args.lengths:
        tokens = torch.randint(0, args.vocab, (args.batch, length), generator=torch.Generator().manual_seed(length))
        calls = {name: training_step(model, opt, tokens, plain) for name, (model, opt, plain) in steppers.items()}
        seconds = best_of(calls, repeats, args.clock)
        for name, sec in seconds.items():
            results[name][length] = args.batch * length / sec
        print(f"  T={length}: " + ", ".join(f"{n} {results[n][length]:,.0f} tok/s" for n in seconds), flush=True)

    long = max(args.lengths)
    if not args.no_memory:
        for name in models:
            peak[name] = measure_peak_memory(args, name, long)
            print(f"  peak step memory at T={long}: {name} {(peak[name] or 0) / 2**20:,.0f} MiB", flush=True)

    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"

    headers = ["model", "params"] + [f"T={t} tok/s (×Llama)" for t in args.lengths]
    headers += [f"peak step memory T={long} (×Llama)"]
    rows = []
    for name, model in models.items():
        cells = [f"{results[name][t]:,.0f} ({results[name][t] / results[LLAMA][t]:.2f})" for t in args.lengths]
        memory = mib(peak.get(name))
        if peak.get(name) is not None and peak.get(LLAMA):
            memory += f" ({peak[name] / peak[LLAMA]:.2f})"
        rows.append([name, f"{count_parameters(model) / 1e6:.2f}M", *cells, memory])
    print()
    print(markdown_table(headers, rows))
    print(
        f"\nshape: hidden {args.hidden}, {args.layers} layers, {args.heads} heads / {args.kv_heads} KV, "
        f"vocab {args.vocab}, zoo size {args.size}, batch {args.batch}; {repeats} timed step(s) per cell after a "
        "warm-up, best kept; "
        f"load average at the end {load_average()}\n"
    )
    write_json(
        args.json,
        {
            "machine": info,
            "shape": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "kv_heads")},
            "parameters": {name: count_parameters(model) for name, model in models.items()},
            "tokens_per_second": results,
            "peak_step_memory_bytes": {"length": long, **peak},
        },
    )

    ours = results[HEADLINE]
    for length in args.lengths:
        ratio = ours[length] / results[LLAMA][length]
        target = SPEED_TARGETS.get(length)
        if target is not None:
            name = f"{HEADLINE} / LlamaForCausalLM tokens/s at T={length}"
            print(ratio_line(name, ratio, f">= {target}x", ratio >= target))
    if "transformer" in results:
        ratio = ours[long] / results["transformer"][long]
        print(f"RATIO {HEADLINE} / transformer (zoo) tokens/s at T={long}: {ratio:.2f}x (no target)")
    r_qwen = ours[long] / results[QWEN][long]
    print(ratio_line(f"{HEADLINE} / Qwen3NextForCausalLM tokens/s at T={long}", r_qwen, ">= 1.1x", r_qwen >= 1.1))
    if peak.get(HEADLINE) is not None and peak.get(LLAMA):
        share = peak[HEADLINE] / peak[LLAMA]
        print(ratio_line(f"{HEADLINE} / LlamaForCausalLM peak step memory at T={long}", share,
                         f"<= {MEMORY_TARGET}x", share <= MEMORY_TARGET))


if __name__ == "__main__":
    main()

"""Decoding: ms per generated token and cache bytes after prefilling 256 ... 16k tokens, per zoo architecture.

Each model (the zoo's "small" shape unless `--size`: hidden 256, 8 layers, vocab 32000, fp32, batch 1) and a
`LlamaForCausalLM` of the same width, depth and parameter count is prefilled in chunks (`--prefill-chunk` tokens per
forward, untimed) up to each context length in turn. At every length a copy of the cache decodes `--steps` single
tokens through the model's own forward with the cache (what `generate()` calls each step, without its sampling
bookkeeping); each step is timed and the median is reported (with `--repeats R`, the smallest median of R runs, the
models taking turns). Cache bytes: `HybridCache.state_bytes()` (recurrent states + KV) and the keys and values of
Llama's `DynamicCache`.

    python benchmarks/bench_decode.py            # contexts 256, 1024, 4096, 16384 (several minutes)
    python benchmarks/bench_decode.py --quick    # smoke run, < 60 s
    python benchmarks/bench_decode.py --batch 16 --contexts 8192 --archs qwen3-next-style   # batched decoding
    python benchmarks/bench_decode.py --size tiny --vocab 4096 --archs qwen3-next-style,transformer   # quickstart's

With `--batch N`, N sequences (different random prompts) are prefilled and decoded together; the table then also
gives tokens/s (N tokens per step).

Ends with one `RATIO ...` line per target (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from common import (
    CLOCKS,
    add_common_arguments,
    count_parameters,
    load_average,
    machine_info,
    markdown_table,
    matched_intermediate_size,
    print_header,
    ratio_line,
    write_json,
)
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hybridzoo import HybridForCausalLM
from hybridzoo.configs.zoo import ARCHITECTURES, zoo_config
from hybridzoo.modeling import CACHE_NAME

LLAMA = "llama (transformers)"
CACHE_TARGET_CONTEXT = 16384


def cache_bytes(cache) -> int:
    """Bytes held by a `HybridCache` (recurrent states + KV) or a transformers `DynamicCache` (KV)."""
    if hasattr(cache, "state_bytes"):
        return sum(cache.state_bytes().values())
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def new_cache(model: nn.Module):
    # Llama gets transformers' DynamicCache; our models build their HybridCache on the first forward
    return DynamicCache(config=model.config) if isinstance(model, LlamaForCausalLM) else None


@torch.no_grad()
def prefill(model: nn.Module, cache, tokens: torch.Tensor, chunk: int):
    """Feed `tokens` `[1, T]` through the model in chunks, continuing `cache`; returns the cache."""
    for start in range(0, tokens.shape[1], chunk):
        piece = tokens[:, start : start + chunk]
        cache = getattr(model(input_ids=piece, **{CACHE_NAME: cache}, use_cache=True, logits_to_keep=1), CACHE_NAME)
    return cache


@torch.no_grad()
def decode_ms(model: nn.Module, cache, steps: int, clock: str, batch: int = 1) -> list[float]:
    """Milliseconds of each of `steps` greedy single-token forwards (one token per row) continuing `cache`."""
    now = CLOCKS[clock]
    token = torch.ones(batch, 1, dtype=torch.long)
    times = []
    for _ in range(steps):
        start = now()
        out = model(input_ids=token, **{CACHE_NAME: cache}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        times.append(1e3 * (now() - start))
        cache = getattr(out, CACHE_NAME)
    return times


def build_models(archs: list[str], vocab: int, max_length: int, size: str = "small") -> dict[str, nn.Module]:
    shape = dict(vocab_size=vocab, max_position_embeddings=max_length + 1024)
    torch.manual_seed(0)
    models = {name: HybridForCausalLM(zoo_config(name, size, **shape)).eval() for name in archs}
    small = zoo_config("transformer", size, **shape)
    llama_shape = dict(
        vocab_size=vocab,
        hidden_size=small.hidden_size,
        num_hidden_layers=small.num_hidden_layers,
        num_attention_heads=small.num_attention_heads,
        num_key_value_heads=small.num_key_value_heads,
        max_position_embeddings=max_length + 1024,
    )

    def llama(width: int) -> nn.Module:
        return LlamaForCausalLM(LlamaConfig(**llama_shape, intermediate_size=width))

    # matched to the headline hybrid, the model the cache target compares against
    target = count_parameters(models.get("qwen3-next-style") or next(iter(models.values())))
    models[LLAMA] = llama(matched_intermediate_size(llama, target, small.num_hidden_layers, small.hidden_size)).eval()
    return models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--contexts", type=str, default=None, help="comma-separated prefill lengths")
    parser.add_argument("--archs", type=str, default=None, help="comma-separated zoo architectures (default: all)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--size", type=str, default="small", help="zoo size (quickstart's: tiny, --vocab 4096)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per context (default 32)")
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill forward")
    parser.add_argument("--prefill-threads", type=int, default=None, help="threads for the untimed prefill")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    args = parser.parse_args(argv)
    contexts = [int(x) for x in (args.contexts or ("64,256" if args.quick else "256,1024,4096,16384")).split(",")]
    archs = args.archs.split(",") if args.archs else list(ARCHITECTURES)
    steps = args.steps or (8 if args.quick else 32)
    prefill_threads = args.prefill_threads or args.threads

    info = machine_info(args.threads, args.clock)
    print_header(
        f"Decoding: ms per step and cache bytes after a prefill, zoo size {args.size}, vocab {args.vocab}, "
        f"batch {args.batch}, fp32",
        info,
    )
    models = build_models(archs, args.vocab, max(contexts), args.size)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, args.vocab, (args.batch, max(contexts)), generator=generator)
    repeats = args.repeats or 1
    ms: dict[str, dict[int, float]] = {name: {} for name in models}
    nbytes: dict[str, dict[int, int]] = {name: {} for name in models}
    caches, seen = {name: new_cache(model) for name, model in models.items()}, 0
    for context in contexts:
        torch.set_num_threads(prefill_threads)
        for name, model in models.items():
            caches[name] = prefill(model, caches[name], tokens[:, seen:context], args.prefill_chunk)
            nbytes[name][context] = cache_bytes(caches[name])
        seen = context
        torch.set_num_threads(args.threads)
        for _ in range(repeats):  # models round-robin, so that a slow phase of a shared machine hits all alike
            for name, model in models.items():
                decode_ms(model, copy.deepcopy(caches[name]), 2, args.clock, args.batch)  # warm-up
                times = decode_ms(model, copy.deepcopy(caches[name]), steps, args.clock, args.batch)
                ms[name][context] = min(ms[name].get(context, float("inf")), statistics.median(times))
        print(f"  ctx {context}: " + ", ".join(f"{name} {ms[name][context]:.2f} ms" for name in models), flush=True)

    unit = "ms/token" if args.batch == 1 else f"ms/step ({args.batch} tokens), tok/s"
    headers = ["model", "params"] + [f"ctx {c}: {unit}" for c in contexts] + [f"cache @ {contexts[-1]}"]
    headers += ["cache ×Llama"]
    rows = []
    for name, model in models.items():
        last = nbytes[name][contexts[-1]]
        if args.batch == 1:
            cells = [f"{ms[name][c]:.2f}" for c in contexts]
        else:
            cells = [f"{ms[name][c]:.2f}, {1e3 * args.batch / ms[name][c]:,.0f}" for c in contexts]
        rows.append(
            [name, f"{count_parameters(model) / 1e6:.2f}M", *cells]
            + [f"{last / 2**20:,.2f} MiB", f"{last / nbytes[LLAMA][contexts[-1]]:.3f}"]
        )
    print()
    print(markdown_table(headers, rows))
    print(
        f"\nmedian of {steps} decode steps per cell, best of {repeats} round-robin repeat(s); "
        f"prefill chunk {args.prefill_chunk}; "
        f"load average at the end {load_average()}\n"
    )
    write_json(
        args.json,
        {"machine": info, "batch": args.batch, "ms_per_step": ms, "cache_bytes": nbytes, "steps": steps},
    )

    reference = 1024 if 1024 in contexts else contexts[0]
    last = contexts[-1]
    if args.batch > 1:
        if "qwen3-next-style" in ms:
            speedup = ms[LLAMA][last] / ms["qwen3-next-style"][last]
            name = f"qwen3-next-style / LlamaForCausalLM tokens/s, {args.batch} sequences at ctx {last}"
            print(ratio_line(name, speedup, ">= 2x", speedup >= 2.0))
        return
    for name in ms:
        # the recurrent architectures: a cache that does not grow with the context
        if name != LLAMA and last != reference and nbytes[name][last] == nbytes[name][reference]:
            growth = ms[name][last] / ms[name][reference]
            print(ratio_line(f"{name} ms/token ctx {last} / ctx {reference}", growth, "<= 1.15x", growth <= 1.15))
    if "qwen3-next-style" in ms:
        slower = ms["qwen3-next-style"][reference] / ms[LLAMA][reference]
        name = f"qwen3-next-style / LlamaForCausalLM ms/token at ctx {reference}"
        print(ratio_line(name, slower, "<= 1.0x", slower <= 1.0))
    # the cache target is set at 16k context (issue 7); shorter runs print no verdict on it
    if "qwen3-next-style" in nbytes and last >= CACHE_TARGET_CONTEXT:
        share = nbytes["qwen3-next-style"][last] / nbytes[LLAMA][last]
        print(
            ratio_line(
                f"qwen3-next-style cache / LlamaForCausalLM cache at ctx {last}", share, "<= 0.30x", share <= 0.3
            )
        )


if __name__ == "__main__":
    main()

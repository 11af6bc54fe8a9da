"""Mamba-2 on CPU: our chunked SSD against transformers' pure-torch Mamba-2 path, and decode cost against context.

1. Training: forward + backward of one Mamba-2 layer, ours (`HybridMamba2`, chunked SSD in `ops_mamba2`) against
   transformers' `Mamba2Mixer` with the same weights (on CPU without `mamba_ssm` its forward is the pure-torch path
   that older releases called `torch_forward`), at T >= 2048, batch 1, fp32, each side at its own chunk size
   (transformers: the layer config's `chunk_size`). Two layer shapes: Mamba-2 130M's (hidden 768, 24 heads of 64,
   d_state 128, one group, chunk 256) and a grouped one as NemotronH has (8 groups of B/C, chunk 128). Rows for the
   scan alone (`chunk_ssd` vs `mamba2_chunk_scan`, dt and inputs given) and for the whole layer (projections, conv,
   norm included). Outputs and gradients are asserted equal (1e-4 relative) before timing.
2. Decoding: ms per token of the zoo's `mamba2` (and `bamba-style`) "small" models after prefilling 1k and 16k tokens.

    python benchmarks/bench_mamba2.py            # T = 2048, 4096; contexts 1k / 16k (a few minutes)
    python benchmarks/bench_mamba2.py --quick    # smoke run, < 60 s

Ends with one `RATIO ...` line per target (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import transformers
from bench_decode import decode_ms, prefill
from common import add_common_arguments, best_of, machine_info, markdown_table, print_header, ratio_line, write_json
from transformers import Mamba2Config
from transformers.models.mamba2 import modeling_mamba2

from hybridzoo import HybridConfig, HybridForCausalLM
from hybridzoo.configs.zoo import zoo_config
from hybridzoo.modeling.block_mamba2 import HybridMamba2
from hybridzoo.modeling.ops_mamba2 import chunk_ssd

transformers.logging.set_verbosity_error()  # "mamba_ssm is not installed, falling back" on every call
# the hub-kernel decorator may wrap the function; `__wrapped__` is the plain torch one
hf_chunk_scan = getattr(modeling_mamba2.mamba2_chunk_scan, "__wrapped__", modeling_mamba2.mamba2_chunk_scan)

LAYERS = {
    "Mamba-2 130M layer (G=1, HF chunk 256)": dict(n_groups=1, chunk_size=256),
    "grouped layer (G=8, HF chunk 128)": dict(n_groups=8, chunk_size=128),
}


def layer_pair(n_groups: int, chunk_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    reference = Mamba2Config(
        hidden_size=768,
        num_heads=24,
        head_dim=64,
        expand=2,
        n_groups=n_groups,
        state_size=128,
        conv_kernel=4,
        chunk_size=chunk_size,
        num_hidden_layers=1,
    )
    torch.manual_seed(0)
    theirs = modeling_mamba2.Mamba2Mixer(reference, 0)
    ours = HybridMamba2(
        HybridConfig(
            hidden_size=768,
            num_hidden_layers=1,
            block_pattern="D",
            mamba_num_heads=24,
            mamba_head_dim=64,
            mamba_n_groups=n_groups,
            mamba_d_state=128,
            rms_norm_eps=reference.layer_norm_epsilon,
        )
    )
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> float:
    worst = 0.0
    for a, b in zip(actual, expected, strict=True):
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    assert worst < 1e-4, f"{what}: ours and transformers differ by {worst:.1e} (relative to the largest entry)"
    return worst


def training_rows(lengths: list[int], repeats: int, clock: str) -> list[dict]:
    rows = []
    for label, shape in LAYERS.items():
        theirs, ours = layer_pair(**shape)
        for length in lengths:
            gen = torch.Generator().manual_seed(length)
            x = torch.randn(1, length, 768, generator=gen)
            weight = torch.randn(1, length, 768, generator=gen)
            # the scan's own inputs, as the layer makes them
            heads, groups = 24, shape["n_groups"]
            scan_x = torch.randn(1, length, heads, 64, generator=gen)
            dt = torch.nn.functional.softplus(torch.randn(1, length, heads, generator=gen) - 3)
            A = -torch.arange(1, heads + 1, dtype=torch.float32)
            B = torch.randn(1, length, groups, 128, generator=gen)
            C = torch.randn(1, length, groups, 128, generator=gen)
            scan_weight = torch.randn(1, length, heads, 64, generator=gen)

            def layer_step(module, is_ours, x=x, weight=weight):
                def call():
                    module.zero_grad(set_to_none=True)
                    leaf = x.clone().requires_grad_()
                    y = module(leaf)[0] if is_ours else module(leaf)
                    (y * weight).sum().backward()
                    return [y.detach(), leaf.grad, *(p.grad for _, p in sorted(module.named_parameters()))]

                return call

            def scan_step(is_ours, inputs=(scan_x, dt, B, C), A=A, chunk=shape["chunk_size"], weight=scan_weight):
                def call():
                    leaves = [t.clone().requires_grad_() for t in inputs]
                    if is_ours:
                        y = chunk_ssd(leaves[0], leaves[1], A, leaves[2], leaves[3])[0]
                    else:
                        y = hf_chunk_scan(leaves[0], leaves[1], A, leaves[2], leaves[3], chunk)
                    (y * weight).sum().backward()
                    return [y.detach(), *(t.grad for t in leaves)]

                return call

            calls = {
                "scan_ours": scan_step(True),
                "scan_hf": scan_step(False),
                "layer_ours": layer_step(ours, True),
                "layer_hf": layer_step(theirs, False),
            }
            scan_diff = assert_close(calls["scan_ours"](), calls["scan_hf"](), f"{label} scan T={length}")
            layer_diff = assert_close(calls["layer_ours"](), calls["layer_hf"](), f"{label} layer T={length}")
            times = best_of(calls, repeats, clock)
            row = {"layer": label, "T": length, **{f"{k}_ms": 1e3 * v for k, v in times.items()}}
            row["scan_speedup"] = times["scan_hf"] / times["scan_ours"]
            row["layer_speedup"] = times["layer_hf"] / times["layer_ours"]
            row["max_rel_diff_scan"], row["max_rel_diff_layer"] = scan_diff, layer_diff
            rows.append(row)
            print(
                f"  {label} T={length}: scan {row['scan_ours_ms']:.0f} vs {row['scan_hf_ms']:.0f} ms "
                f"({row['scan_speedup']:.2f}x), layer {row['layer_ours_ms']:.0f} vs {row['layer_hf_ms']:.0f} ms "
                f"({row['layer_speedup']:.2f}x)",
                flush=True,
            )
    return rows


def decode_rows(archs: list[str], contexts: list[int], steps: int, clock: str, vocab: int) -> dict:
    ms = {}
    tokens = torch.randint(2, vocab, (1, max(contexts)), generator=torch.Generator().manual_seed(0))
    for name in archs:
        torch.manual_seed(0)
        model = HybridForCausalLM(zoo_config(name, "small", vocab_size=vocab)).eval()
        cache, seen, ms[name] = None, 0, {}
        for context in contexts:
            cache = prefill(model, cache, tokens[:, seen:context], 2048)
            seen = context
            decode_ms(model, copy.deepcopy(cache), 2, clock)  # warm-up
            ms[name][context] = statistics.median(decode_ms(model, copy.deepcopy(cache), steps, clock))
        print(f"  {name}: " + ", ".join(f"ctx {c}: {ms[name][c]:.2f} ms" for c in contexts), flush=True)
    return ms


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated training lengths")
    parser.add_argument("--contexts", type=str, default=None, help="comma-separated decode contexts")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per context (default 32)")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in (args.lengths or ("512" if args.quick else "2048,4096")).split(",")]
    contexts = [int(x) for x in (args.contexts or ("64,256" if args.quick else "1024,16384")).split(",")]
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (8 if args.quick else 32)
    torch.set_num_threads(args.threads)

    info = machine_info(args.threads, args.clock)
    print_header("Mamba-2: chunked SSD vs transformers' pure-torch path; decode cost vs context", info)
    rows = training_rows(lengths, repeats, args.clock)
    print()
    headers = ["layer", "T", "scan ours ms", "scan HF ms", "scan speedup", "layer ours ms", "layer HF ms"]
    headers += ["layer speedup", "max rel. diff (scan / layer)"]
    table = [
        [
            r["layer"],
            r["T"],
            f"{r['scan_ours_ms']:.0f}",
            f"{r['scan_hf_ms']:.0f}",
            f"{r['scan_speedup']:.2f}x",
            f"{r['layer_ours_ms']:.0f}",
            f"{r['layer_hf_ms']:.0f}",
            f"{r['layer_speedup']:.2f}x",
            f"{r['max_rel_diff_scan']:.1e} / {r['max_rel_diff_layer']:.1e}",
        ]
        for r in rows
    ]
    print(markdown_table(headers, table))
    print(f"\nforward + backward, batch 1, fp32, min of {repeats} runs\n")

    ms = decode_rows(["mamba2", "bamba-style"], contexts, steps, args.clock, vocab=32000)
    print()
    print(
        markdown_table(
            ["model (zoo, small)"] + [f"ctx {c}: ms/token" for c in contexts],
            [[name] + [f"{v[c]:.2f}" for c in contexts] for name, v in ms.items()],
        )
    )
    print(f"\nmedian of {steps} decode steps per cell\n")
    write_json(args.json, {"machine": info, "training": rows, "decode_ms_per_token": ms})

    min_len = min(lengths)
    scan = min(r["scan_speedup"] for r in rows)
    layer = min(r["layer_speedup"] for r in rows)
    print(
        ratio_line(f"SSD scan fwd+bwd transformers / ours at T>={min_len} (min over layers)", scan, ">= 2x", scan >= 2)
    )
    print(
        ratio_line(
            f"Mamba-2 layer fwd+bwd transformers / ours at T>={min_len} (min over layers)", layer, ">= 2x", layer >= 2
        )
    )
    growth = ms["mamba2"][contexts[-1]] / ms["mamba2"][contexts[0]]
    print(ratio_line(f"mamba2 ms/token ctx {contexts[-1]} / ctx {contexts[0]}", growth, "<= 1.15x", growth <= 1.15))


if __name__ == "__main__":
    main()

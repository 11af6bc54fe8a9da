"""Peak memory of `hybridzoo convert` on a zoo-size checkpoint: streaming shard by shard vs loading the whole model.

Writes a random `LlamaForCausalLM` checkpoint of the zoo size (default `large`, ~0.85B parameters, fp32, ~500 MB
shards; written shard by shard, never whole in memory), then measures in fresh processes the peak resident memory
(`VmHWM`) of (a) `convert_checkpoint` and (b) the baseline that holds every tensor in memory at once (`load_file` of
all shards, each tensor materialised: what a converter that builds the whole converted state dict holds). Targets:
the conversion's peak above the imports stays below half the checkpoint size (so a checkpoint larger than RAM/2
converts), and below the baseline's.

    python benchmarks/bench_convert_memory.py [--size large] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import add_common_arguments, machine_info, markdown_table, print_header, ratio_line, write_json
from safetensors.torch import save_file

SHARD_BYTES = 500 * 2**20

# VmHWM (peak resident set of this process image): unlike `ru_maxrss`, it is not inherited across exec from the parent
PEAK = """
import sys
{body}
print("PEAK_KB", [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""
IMPORTS_ONLY = "import torch, transformers, safetensors\nimport hybridzoo.convert"
CONVERT = IMPORTS_ONLY + "\nhybridzoo.convert.convert_checkpoint(sys.argv[1], sys.argv[2], quiet=True)"
LOAD_ALL = IMPORTS_ONLY + """
from pathlib import Path
from safetensors.torch import load_file
state = {}
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    state.update({key: tensor.clone() for key, tensor in load_file(f).items()})  # in memory, as a converted copy
"""


def write_llama_checkpoint(size: str, folder: Path) -> int:
    """A random Llama checkpoint of the zoo size, written shard by shard; returns its bytes on disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hybridzoo.configs.zoo import SIZES

    fields = dict(SIZES[size])
    config = LlamaConfig(**fields, rope_theta=10000.0, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    shard, shard_bytes, weight_map, index, total = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    generator = torch.Generator().manual_seed(0)
    for key, shape in shapes.items():
        tensor = torch.randn(shape, generator=generator) * 0.02
        shard[key] = tensor
        shard_bytes += tensor.numel() * 4
        total += tensor.numel() * 4
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def peak_kb(body: str, *args: str) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", PEAK.format(body=body), *args], capture_output=True, text=True, env=env, check=True
    )
    return int(result.stdout.split("PEAK_KB")[-1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="large", help="zoo size of the checkpoint (default large)")
    add_common_arguments(parser)
    args = parser.parse_args()
    size = "small" if args.quick else args.size
    print_header(f"convert peak memory, zoo size {size}", machine_info(args.threads, "wall"))
    print("load average:", os.getloadavg())
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        source, out = Path(tmp) / "source", Path(tmp) / "converted"
        checkpoint = write_llama_checkpoint(size, source)
        largest_shard = max(f.stat().st_size for f in source.glob("*.safetensors"))
        imports = peak_kb(IMPORTS_ONLY) * 1024
        convert = peak_kb(CONVERT, str(source), str(out)) * 1024
        load_all = peak_kb(LOAD_ALL, str(source)) * 1024
    mib = 2**20
    rows = [
        ["checkpoint on disk", f"{checkpoint / mib:.0f}"],
        ["largest source shard", f"{largest_shard / mib:.0f}"],
        ["python + torch + transformers imported", f"{imports / mib:.0f}"],
        ["convert_checkpoint (streaming) peak RSS", f"{convert / mib:.0f}"],
        ["baseline: every tensor in memory at once, peak RSS", f"{load_all / mib:.0f}"],
    ]
    print(markdown_table(["what", "MiB"], rows))
    print("load average:", os.getloadavg())
    # what the conversion itself adds on top of the interpreter and libraries
    added, added_baseline = convert - imports, load_all - imports
    fraction = added / checkpoint
    target = "< 0.5, so a checkpoint larger than RAM/2 converts"
    print(ratio_line("convert peak above imports / checkpoint size", fraction, target, fraction < 0.5))
    baseline_ratio = added / max(added_baseline, 1)
    print(ratio_line("convert / load-everything baseline (above imports)", baseline_ratio, "< 1", baseline_ratio < 1))
    write_json(args.json, dict(size=size, checkpoint_bytes=checkpoint, largest_shard_bytes=largest_shard,
                               imports_peak_bytes=imports, convert_peak_bytes=convert, load_all_peak_bytes=load_all,
                               load_average=os.getloadavg()))


if __name__ == "__main__":
    main()

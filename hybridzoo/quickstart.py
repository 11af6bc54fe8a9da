"""The main job on built-in defaults: build a zoo hybrid, train it on real text found on this machine, sample from it.

The text is the Python standard library's own source (byte-level tokens, no download, no tokenizer to train), split
into train/validation by file. The trained model is saved with `save_pretrained` and reloaded through
`AutoModelForCausalLM` before sampling, so the run also proves the saved folder is a working transformers model.
"""

from __future__ import annotations

import json
import math
import sysconfig
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from hybridzoo.configs.zoo import zoo_config
from hybridzoo.modeling import HybridForCausalLM

# byte-level vocabulary: 256 byte values, then the special tokens
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259


@dataclass
class QuickstartSettings:
    architecture: str = "qwen3-next-style"
    size: str = "tiny"
    steps: int = 300
    batch_size: int = 16
    context_length: int = 128
    learning_rate: float = 3e-3
    max_corpus_bytes: int = 4_000_000
    seed: int = 0
    output_dir: str = "outputs/quickstart"
    prompt: str = "def "
    new_tokens: int = 120


def stdlib_corpus(max_bytes: int) -> tuple[bytes, bytes]:
    """Train and validation text from the standard library's .py files (every 20th file is validation)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise FileNotFoundError("No Python standard library sources found to train on.")
    train, validation = bytearray(), bytearray()
    for index, path in enumerate(files):
        target = validation if index % 20 == 0 else train
        target += path.read_bytes() + b"\n"
        if len(train) + len(validation) >= max_bytes:
            break
    return bytes(train), bytes(validation)


def random_windows(data: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - length - 1, (batch_size,), generator=generator)
    return torch.stack([data[start : start + length] for start in starts.tolist()])


@torch.no_grad()
def validation_loss(model: HybridForCausalLM, data: torch.Tensor, length: int, batches: int = 8) -> float:
    generator = torch.Generator().manual_seed(1234)
    model.eval()
    losses = [
        model(ids, labels=ids).loss.item()
        for ids in (random_windows(data, 8, length, generator) for _ in range(batches))
    ]
    model.train()
    return sum(losses) / len(losses)


def run_quickstart(settings: QuickstartSettings | None = None) -> dict:
    """Train, save, reload, sample. Returns a summary (also written to `output_dir/summary.json`)."""
    settings = settings or QuickstartSettings()
    torch.manual_seed(settings.seed)
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    train_bytes, validation_bytes = stdlib_corpus(settings.max_corpus_bytes)
    train_data = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    validation_data = torch.frombuffer(bytearray(validation_bytes), dtype=torch.uint8).long()
    config = zoo_config(
        settings.architecture,
        settings.size,
        vocab_size=BYTE_VOCAB_SIZE,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    model = HybridForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"{settings.architecture} ({settings.size}): {parameters / 1e6:.2f}M parameters, blocks "
        f"{''.join(model.config.block_types[i][0].upper() for i in range(config.num_hidden_layers))}; "
        f"corpus: {len(train_bytes) / 1e6:.1f} MB train, {len(validation_bytes) / 1e6:.2f} MB validation "
        "(Python standard library sources)"
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.1)
    warmup = max(1, settings.steps // 20)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    generator = torch.Generator().manual_seed(settings.seed)
    initial_validation = validation_loss(model, validation_data, settings.context_length)
    model.train()
    start, tokens_seen = time.perf_counter(), 0
    progress = tqdm(range(settings.steps), desc="training", unit="step")
    for _ in progress:
        input_ids = random_windows(train_data, settings.batch_size, settings.context_length, generator)
        loss = model(input_ids, labels=input_ids, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        tokens_seen += input_ids.numel()
        progress.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_seen / (time.perf_counter() - start):.0f}")
    train_seconds = time.perf_counter() - start
    final_validation = validation_loss(model, validation_data, settings.context_length)
    print(f"validation loss (nats/byte): {initial_validation:.3f} before, {final_validation:.3f} after training")

    model_dir = output_dir / "model"
    model.save_pretrained(model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    prompt = torch.tensor([list(settings.prompt.encode())])
    sample = reloaded.generate(
        prompt, max_new_tokens=settings.new_tokens, do_sample=True, top_k=20, temperature=0.8, pad_token_id=PAD_ID
    )
    text = bytes(t for t in sample[0].tolist() if t < 256).decode("utf-8", errors="replace")
    print(f"\nsample from the reloaded model ({model_dir}):\n{'-' * 60}\n{text}\n{'-' * 60}")

    summary = {
        "settings": asdict(settings),
        "parameters": parameters,
        "block_types": config.block_types,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_seen / train_seconds, 1),
        "validation_loss_before": round(initial_validation, 4),
        "validation_loss_after": round(final_validation, 4),
        "sample": text,
        "model_dir": str(model_dir),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwritten: {model_dir} (safetensors + config + remote code), {output_dir / 'summary.json'}")
    return summary


def add_subcommand(subparsers) -> None:
    """`hybridzoo quickstart [--steps N ...]`: every `QuickstartSettings` field is a flag."""
    parser = subparsers.add_parser(
        "quickstart", help="train a small zoo hybrid on this machine's Python sources, save, reload and sample"
    )
    for setting in fields(QuickstartSettings):
        parser.add_argument(f"--{setting.name.replace('_', '-')}", type=type(setting.default), default=setting.default)
    parser.set_defaults(
        handler=lambda args: run_quickstart(
            QuickstartSettings(**{f.name: getattr(args, f.name) for f in fields(QuickstartSettings)})
        )
    )

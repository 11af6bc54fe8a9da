"""A small, self-contained training loop for the synthetic tasks (used by `hybridzoo compare` and `eval --train-steps`).

Zoology's recipe: AdamW (weight decay 0.1), linear warm-up then cosine to 0 over a fixed budget of steps, cross-entropy
only at the scored positions. Every architecture gets the same budget, batch size and data stream (batch `i` is
generated from seed `seed * 1_000_003 + i`), so differences come from the architectures alone.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from hybridzoo.modeling import HybridForCausalLM

from .metrics import shifted_logits_and_labels
from .tasks import IGNORE


def cosine_schedule(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up over `warmup` steps, then cosine from 1 to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def task_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits, labels = shifted_logits_and_labels(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE)


def train_on_task(
    config,
    task,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    description: str = "train",
) -> HybridForCausalLM:
    """A fresh `HybridForCausalLM(config)` trained for `steps` AdamW steps on `task` batches; returns it in eval mode
    with `model.training_log` = {"final_loss", "seconds", "steps"}."""
    if config.vocab_size < task.vocab_size:
        raise ValueError(f"config.vocab_size ({config.vocab_size}) is smaller than the task's ({task.vocab_size})")
    torch.manual_seed(seed)
    model = HybridForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, int(warmup_fraction * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_schedule(step, steps, warmup))
    smoothed = None
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=description, disable=not progress, leave=False)
    for step in bar:
        batch = task.batch(batch_size, seed=seed * 1_000_003 + step)
        loss = task_loss(model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{description}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{smoothed:.3f}")
    model.eval()
    model.training_log = {"final_loss": smoothed, "seconds": time.perf_counter() - start, "steps": steps}
    model.training_log.update(newton_summary(model))
    return model


def newton_summary(model) -> dict:
    """Newton iterations seen by the model's ParaRNN blocks (`newton_totals`), or {} when it has none."""
    totals = [m.newton_totals for m in model.modules() if hasattr(m, "newton_totals") and m.newton_totals["solves"]]
    if not totals:
        return {}
    solves = sum(t["solves"] for t in totals)
    return {
        "newton_mean_iterations": sum(t["iterations"] for t in totals) / solves,
        "newton_max_iterations": max(t["max_iterations"] for t in totals),
        "newton_fallbacks": sum(t["fallbacks"] for t in totals),
        "newton_solves": solves,
    }

"""Scoring with Zoology's semantics, and confidence intervals.

A batch from `tasks.make_task(...).batch(...)` has labels in transformers' convention (`labels[t]` is the target of the
output at `t - 1`, -100 elsewhere). `score_batch` runs the model once and returns, per example, the number of scored
tokens, how many of them the argmax over the FULL vocabulary gets right, and their cross-entropy.
- `accuracy` = Zoology's `valid/accuracy`: per example the fraction of scored tokens right, then the mean over
  examples (for MQAR: per query). Its 95% interval is Wilson's on the pooled tokens, n = scored tokens.
- `exact` = an example counts only if every scored token is right (NIAH/passkey/VT: the whole answer; lm-eval's
  `acc`). Its 95% interval is Wilson's with n = examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hybridzoo.data.tasks import IGNORE, batch_seed

Z_95 = 1.959963984540054  # the 97.5% standard normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); well behaved at 0 and 1, unlike the normal
    approximation. Returns (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at p = 0 or 1 the bound is exactly 0 or 1; set it so rounding cannot leave p outside its own interval
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass
class BatchScore:
    scored: torch.Tensor  # [B] number of scored tokens per example
    correct: torch.Tensor  # [B] of them predicted right (argmax over the full vocabulary)
    loss_sum: torch.Tensor  # [B] summed cross-entropy over the scored tokens (nats)


def shifted_logits_and_labels(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align outputs with their targets: the output at t predicts `labels[t + 1]`."""
    return logits[:, :-1].float(), labels[:, 1:]


@torch.no_grad()
def score_batch(model, batch: dict[str, torch.Tensor]) -> BatchScore:
    logits = model(input_ids=batch["input_ids"]).logits
    logits, labels = shifted_logits_and_labels(logits, batch["labels"])
    mask = labels != IGNORE
    safe = labels.clamp_min(0)
    correct = (logits.argmax(-1) == safe) & mask
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), safe, reduction="none") * mask
    return BatchScore(mask.sum(1), correct.sum(1), loss.sum(1))


@torch.no_grad()
def loss_by_position(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy at every position t = 1..T-1 over the batch: `[T - 1]` (nats)."""
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return loss.mean(0)


@dataclass
class Accumulator:
    """Sums of `BatchScore`s over batches, turned into metric rows with intervals at the end."""

    examples: int = 0
    exact: int = 0
    per_example_accuracy_sum: float = 0.0
    tokens: int = 0
    correct_tokens: int = 0
    loss_sum: float = 0.0

    def add(self, score: BatchScore, keep: torch.Tensor | None = None) -> None:
        scored, correct, loss = score.scored, score.correct, score.loss_sum
        if keep is not None:
            scored, correct, loss = scored[keep], correct[keep], loss[keep]
        has = scored > 0  # examples with nothing scored are skipped, as Zoology's mean over an empty mask would be NaN
        self.examples += int(has.sum())
        self.exact += int((correct[has] == scored[has]).sum())
        self.per_example_accuracy_sum += float((correct[has] / scored[has]).sum())
        self.tokens += int(scored.sum())
        self.correct_tokens += int(correct.sum())
        self.loss_sum += float(loss.sum())

    def metrics(self) -> list[dict]:
        """Rows `{metric, value, ci_low, ci_high, n}`: accuracy, exact, loss (mean nats per scored token)."""
        if self.examples == 0:
            return []
        low, high = wilson_interval(self.correct_tokens, self.tokens)
        exact_low, exact_high = wilson_interval(self.exact, self.examples)
        return [
            {"metric": "accuracy", "value": self.per_example_accuracy_sum / self.examples, "ci_low": low,
             "ci_high": high, "n": self.tokens, "correct": self.correct_tokens, "n_examples": self.examples},
            {"metric": "exact", "value": self.exact / self.examples, "ci_low": exact_low, "ci_high": exact_high,
             "n": self.examples, "n_examples": self.examples},
            {"metric": "loss", "value": self.loss_sum / self.tokens, "ci_low": None, "ci_high": None,
             "n": self.tokens, "n_examples": self.examples},
        ]


def evaluate_task(model, task, num_examples: int, seed: int, batch_size: int = 32) -> list[dict]:
    """Score `num_examples` examples of `task` (generated from `seed`, batch by batch) and return metric rows."""
    total = Accumulator()
    model.eval()
    for start in range(0, num_examples, batch_size):
        size = min(batch_size, num_examples - start)
        batch = task.batch(size, seed=batch_seed(seed, start))
        total.add(score_batch(model, batch))
    return total.metrics()

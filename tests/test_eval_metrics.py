"""Metrics against closed forms: Wilson's interval and Zoology's accuracy on hand-built logits."""

import math

import pytest
import torch

from hybridzoo.evaluation.metrics import Accumulator, score_batch, wilson_interval


@pytest.mark.parametrize("successes, n", [(8, 10), (0, 10), (10, 10), (37, 120), (1, 1)])
def test_wilson_interval_matches_its_closed_form(successes, n):
    # the Wilson interval is the set of p with |p_hat - p| <= z sqrt(p (1 - p) / n): the roots of a quadratic in p
    z, p_hat = 1.959963984540054, successes / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    low, high = wilson_interval(successes, n)
    assert low == pytest.approx(max(0.0, (-b - root) / (2 * a)), abs=1e-12)
    assert high == pytest.approx(min(1.0, (-b + root) / (2 * a)), abs=1e-12)


def test_wilson_interval_published_value():
    # Newcombe (1998), Table I: 81/263 -> 0.2553 to 0.3662
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.logits})()


def test_zoology_accuracy_is_per_example_mean_with_full_vocab_argmax():
    vocab, T = 10, 6
    logits = torch.zeros(2, T, vocab)
    labels = torch.full((2, T), -100)
    # example 0: two scored tokens, one right; example 1: one scored token, right
    labels[0, 2], labels[0, 4], labels[1, 5] = 7, 3, 9
    logits[0, 1, 7] = 5.0  # output at t-1 predicts label t
    logits[0, 3, 8] = 5.0  # wrong (argmax 8, target 3)
    logits[1, 4, 9] = 5.0
    score = score_batch(FixedLogits(logits), {"input_ids": torch.zeros(2, T, dtype=torch.long), "labels": labels})
    assert score.scored.tolist() == [2, 1] and score.correct.tolist() == [1, 1]
    total = Accumulator()
    total.add(score)
    metrics = {m["metric"]: m for m in total.metrics()}
    assert metrics["accuracy"]["value"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["accuracy"]["n"] == 3 and metrics["exact"]["value"] == 0.5 and metrics["exact"]["n"] == 2
    expected_loss = (2 * -torch.log_softmax(torch.tensor([5.0] + [0.0] * 9), 0)[0]
                     - torch.log_softmax(torch.tensor([0.0] * 8 + [5.0, 0.0]), 0)[3]) / 3
    assert metrics["loss"]["value"] == pytest.approx(float(expected_loss), rel=1e-5)

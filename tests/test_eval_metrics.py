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


def test_loss_by_position_on_real_documents_matches_a_direct_computation():
    from hybridzoo import HybridForCausalLM
    from hybridzoo.evaluation.harness import model_info, run_loss_by_position
    from tiny_models import tiny_config

    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config("GA")).eval()
    documents = [list(range(3, 40)), [5] * 10, [(7 * i) % 61 + 3 for i in range(50)]]  # 37, 10 and 50 tokens
    rows, curves = run_loss_by_position(model, model_info(model, "tiny"), train_length=16, multiples=(1, 2, 4),
                                        num_examples=5, seed=0, batch_size=1, documents=documents)
    # T=16 and 2T=32: the two documents that long; 4T=64: none is, so the sweep stops there
    assert sorted({r["length"] for r in rows}) == [16, 32]
    for length in (16, 32):
        with torch.no_grad():
            per_document = []
            for doc in (documents[0], documents[2]):
                ids = torch.tensor(doc[:length])
                logits = model(ids[None]).logits[0, :-1]
                per_document.append(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none"))
            per_position = torch.stack(per_document).mean(0)
        loss = next(r for r in rows if r["length"] == length and r["metric"] == "loss")
        assert loss["n"] == 2 and loss["task"] == "text_loss"
        assert loss["value"] == pytest.approx(per_position.mean().item(), rel=1e-5)
        if length == 32:
            beyond = next(r for r in rows if r["length"] == length and r["metric"] == "loss_beyond_train")
            assert beyond["value"] == pytest.approx(per_position[15:].mean().item(), rel=1e-5)
            assert curves["tiny"] == pytest.approx(per_position.tolist(), rel=1e-5)


def test_decode_cost_reports_the_median_step_not_a_stalled_one(monkeypatch):
    """A fake clock gives each decode step a known duration; one step stalls for a second. The reported ms/token is
    the median of the timed steps (the untimed first step excluded), not the mean the stall would dominate."""
    import hybridzoo.evaluation.harness as harness
    from hybridzoo import HybridForCausalLM
    from tiny_models import tiny_config

    model = HybridForCausalLM(tiny_config("GA")).eval()
    # the clock's readings in call order: prefill start / end, the untimed step's start, then each timed step's
    # start / end: 2 ms, a 1 s stall, 3 ms, 4 ms
    readings = iter([0.0, 1.0, 1.0, 10.0, 10.002, 20.0, 21.0, 30.0, 30.003, 40.0, 40.004])
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(readings))
    measured = harness.decode_cost(model, length=8, new_tokens=4)
    assert len(calls) == 1 + 5  # the prefill, one untimed step, four timed steps
    assert measured["ms_per_token"] == pytest.approx(3.5)  # median of 2, 1000, 3, 4 ms; the mean would be 252 ms
    assert measured["prefill_s"] == pytest.approx(1.0)

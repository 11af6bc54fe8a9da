"""State-tracking tasks: every label against an independent computation of the running product (plain Python sums
for the cyclic groups, sympy's permutation composition for S_3 / S_5)."""

import itertools

import pytest
import torch
from sympy.combinatorics import Permutation

from hybridzoo.data.tasks import IGNORE, chance_accuracy, make_task, task_params


def _rows(task, batch_size=16, seed=0):
    batch = task.batch(batch_size, seed=seed)
    assert batch["input_ids"].shape == batch["labels"].shape == (batch_size, task.length + 1)
    return batch["input_ids"].tolist(), batch["labels"].tolist()


@pytest.mark.parametrize(("name", "params", "modulus"), [
    ("parity", {}, 2),
    ("modular_addition", {"order": 3}, 3),
    ("modular_addition", {}, 5),
])
def test_cyclic_labels_are_running_sums(name, params, modulus):
    task = make_task(name, length=40, **params)
    assert task.vocab_size == modulus + 1 and chance_accuracy(task) == pytest.approx(1 / modulus)
    ids, labels = _rows(task, seed=3)
    seen = set()
    for row_ids, row_labels in zip(ids, labels, strict=True):
        assert row_ids[-1] == 0 and row_labels[0] == IGNORE  # the trailing blank; nothing predicts position 0
        values = [i - 1 for i in row_ids[:-1]]  # token id = 1 + element
        seen.update(values)
        total = 0
        for t, value in enumerate(values, start=1):
            total = (total + value) % modulus
            assert row_labels[t] == 1 + total, f"prefix of length {t}"
    assert seen == set(range(modulus))


@pytest.mark.parametrize(("name", "degree"), [("permutation_s3", 3), ("permutation_s5", 5)])
def test_permutation_labels_are_running_compositions(name, degree):
    task = make_task(name, length=25)
    perms = list(itertools.permutations(range(degree)))  # the documented id order: 1 + lexicographic index
    assert task.vocab_size == len(perms) + 1
    ids, labels = _rows(task, seed=1)
    for row_ids, row_labels in zip(ids, labels, strict=True):
        product = Permutation(list(range(degree)))
        for t, token in enumerate(row_ids[:-1], start=1):
            product = product * Permutation(list(perms[token - 1]))  # sympy: apply `product` first, then the new one
            assert perms[row_labels[t] - 1] == tuple(product.array_form), f"prefix of length {t}"


def test_score_last_keeps_only_the_final_product_of_the_same_rows():
    every = make_task("permutation_s5", length=30).batch(8, seed=5)
    last = make_task("permutation_s5", length=30, score="last").batch(8, seed=5)
    assert torch.equal(every["input_ids"], last["input_ids"])
    assert (last["labels"][:, :-1] == IGNORE).all()
    assert torch.equal(last["labels"][:, -1], every["labels"][:, -1])


def test_state_tracking_parameters_are_checked_and_round_trip():
    with pytest.raises(ValueError, match="vocab_size must be >= 121"):
        make_task("permutation_s5", vocab_size=64)
    with pytest.raises(ValueError, match="score must be"):
        make_task("parity", score="first")
    task = make_task("modular_addition", order=3, length=7, vocab_size=32)
    again = make_task("modular_addition", **task_params(task))
    assert torch.equal(task.batch(4, 2)["labels"], again.batch(4, 2)["labels"]) and again.vocab_size == 32

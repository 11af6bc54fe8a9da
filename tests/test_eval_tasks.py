"""Each task generator against an independent check of what it promises, and determinism by seed."""

import numpy as np
import pytest
import torch

from hybridzoo.data.tasks import (
    IGNORE,
    TASKS,
    TaskMixture,
    make_task,
    power_law_gap_probs,
    word_vocabulary,
)


def test_mqar_labels_are_the_values_paired_earlier():
    task = make_task("mqar", vocab_size=512, seq_len=128, num_kv_pairs=16)
    batch = task.batch(64, seed=3)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (64, 128)
    half = task.vocab_size // 2
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist(), strict=True):
        keys, values = row_ids[0:32:2], row_ids[1:32:2]
        assert all(1 <= k < half for k in keys) and len(set(keys)) == 16  # keys: first half, distinct
        assert all(half <= v < task.vocab_size for v in values) and len(set(values)) == 16  # values: second half
        pairs = dict(zip(keys, values, strict=True))
        scored = [t for t, label in enumerate(row_labels) if label != IGNORE]
        assert len(scored) == 16 and all(t > 32 for t in scored)
        for t in scored:  # transformers' convention: the output after the query key (at t - 1) predicts label t
            assert row_ids[t - 1] in pairs and row_labels[t] == pairs[row_ids[t - 1]]
        assert sorted(row_ids[t - 1] for t in scored) == sorted(keys)  # every key queried exactly once


def test_mqar_matches_zoology_layout():
    # Zoology's docstring example (V=12 there, but its own assert needs V > T): kv=2, T=16, no fillers:
    # `k1 v1 k2 v2`, zeros with the keys re-appearing at even offsets, the values as labels at those keys' positions
    # (Zoology's own, unshifted convention)
    task = make_task("mqar", vocab_size=20, seq_len=16, num_kv_pairs=2, random_non_queries=False)
    z = task.zoology_batch(4, seed=0)
    for ids, labels, keys, values in zip(z["input_ids"], z["labels"], z["keys"], z["values"], strict=True):
        assert ids[:4].tolist() == [keys[0], values[0], keys[1], values[1]]
        query_positions = [t for t in range(4, 16) if ids[t] != 0]
        assert all((t - 4) % 2 == 0 for t in query_positions) and len(query_positions) == 2
        for t in query_positions:
            assert labels[t] == values[keys.tolist().index(ids[t])]
        assert (labels != IGNORE).sum() == 2


def test_mqar_gaps_follow_the_power_law():
    task = make_task("mqar", vocab_size=256, seq_len=64, num_kv_pairs=1, power_a=0.3)
    gaps = task.zoology_batch(20_000, seed=1)["gaps"].flatten().numpy()
    expected = power_law_gap_probs(task.space, 0.3)
    observed = np.bincount(gaps, minlength=task.space) / len(gaps)
    assert np.abs(observed - expected).sum() / 2 < 0.02  # total-variation distance
    # with several keys, draws are without replacement: distinct slots per row, first draw still ∝ p
    many = make_task("mqar", vocab_size=256, seq_len=64, num_kv_pairs=8, power_a=0.3).zoology_batch(20_000, 2)
    assert all(len(set(row)) == 8 for row in many["gaps"].tolist()[:200])
    space = (64 - 16) // 2
    first = np.bincount(many["gaps"][:, 0].numpy(), minlength=space) / 20_000
    assert np.abs(first - power_law_gap_probs(space, 0.3)).sum() / 2 < 0.02


def test_forgetting_mqar_answer_is_the_newest_value():
    task = make_task("forgetting_mqar", vocab_size=512, seq_len=96, num_kv_pairs=8, num_updates=4)
    batch = task.batch(32, seed=5)
    for ids, labels, updated in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                    batch["updated"].tolist(), strict=True):
        context = 2 * (8 + 4)
        latest, first = {}, {}
        for i in range(0, context, 2):
            first.setdefault(ids[i], ids[i + 1])
            latest[ids[i]] = ids[i + 1]
        scored = [t for t, label in enumerate(labels) if label != IGNORE]
        assert len(scored) == 8
        for t in scored:
            assert labels[t] == latest[ids[t - 1]]
            assert updated[t] == (latest[ids[t - 1]] != first[ids[t - 1]])
        assert sum(updated) == 4


@pytest.mark.parametrize("name", ["passkey", "niah_single_2", "niah_single_3", "niah_multikey"])
def test_needle_answer_is_in_the_needle(name):
    task = make_task(name, vocab_size=1024, seq_len=300, depth=0.5)
    words = word_vocabulary(1024).words
    batch = task.batch(8, seed=2)
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        start = next(t for t, label in enumerate(labels) if label != IGNORE)
        answer = ids[start:]
        assert labels[start:] == answer and len(ids) == 300
        prompt = [words[i] for i in ids[:start]]
        if name == "passkey":
            key_start = next(i for i in range(len(prompt)) if prompt[i : i + 4] == ["the", "pass", "key", "is"])
            assert ids[key_start + 4 : key_start + 4 + len(answer)] == answer
        else:
            asked = prompt[-7]  # "... for KEY mentioned in the provided text is"
            needle = next(i for i in range(len(prompt) - 20) if prompt[i] == "for" and prompt[i + 1] == asked
                          and prompt[i + 2] == "is")
            assert ids[needle + 4 : needle + 4 + len(answer)] == answer
    rows = task.text_examples(8, seed=2)
    assert all(abs(r["needle_position"] / 300 - 0.5) < 0.15 for r in rows)  # placed at the requested depth


def test_variable_tracking_chain_resolves_to_the_value():
    task = make_task("variable_tracking", vocab_size=1024, seq_len=400, num_chains=2, num_hops=3)
    words = word_vocabulary(1024).words
    batch = task.batch(8, seed=4)
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        start = next(t for t, label in enumerate(labels) if label != IGNORE)
        prompt, answer = [words[i] for i in ids[:start]], [words[i] for i in ids[start:]]
        # follow the assignments in order: a variable holds a number or another variable's value
        value_of = {}
        for i in range(len(prompt) - 3):
            if prompt[i] == "var" and prompt[i + 2] == "=":
                if prompt[i + 3] == "var":
                    value_of[prompt[i + 1]] = value_of[prompt[i + 4]]
                else:
                    value_of[prompt[i + 1]] = "".join(prompt[i + 3 : prompt.index(".", i + 3)])
        asked = "".join(prompt[prompt.index("value", len(prompt) - 12) + 1 : -1])
        assert sorted(answer) == sorted(v for v, x in value_of.items() if x == asked) and len(answer) == 4


def test_copy_and_parity_answers():
    words = word_vocabulary(1024).words
    copy = make_task("copy", vocab_size=1024, length=12).batch(16, seed=0)
    for ids, labels in zip(copy["input_ids"].tolist(), copy["labels"].tolist(), strict=True):
        assert ids[2:14] == ids[15:] == labels[15:]
    parity = make_task("parity_words", vocab_size=1024, length=20).batch(64, seed=0)
    answers = []
    for ids, labels in zip(parity["input_ids"].tolist(), parity["labels"].tolist(), strict=True):
        ones = [words[i] for i in ids[:20]].count("1")
        answers.append(words[labels[-1]])
        assert words[labels[-1]] == ("odd" if ones % 2 else "even")
    assert 10 < answers.count("odd") < 54


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_is_deterministic_in_the_seed(name):
    params = {"vocab_size": 512} if name.endswith("mqar") else {}
    task = make_task(name, **params)
    a, b, c = task.batch(4, seed=7), task.batch(4, seed=7), task.batch(4, seed=8)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].shape == (4, task.seq_len) and int(a["input_ids"].max()) < task.vocab_size
    assert (a["labels"] != IGNORE).any()


def test_text_examples_are_the_token_examples():
    task = make_task("passkey", vocab_size=1024, seq_len=128)
    text = task.text_examples(3, seed=9)
    batch = task.batch(3, seed=9)
    words = word_vocabulary(1024).words
    for row, ids in zip(text, batch["input_ids"].tolist(), strict=True):
        assert row["answer"] == "".join(words[i] for i in ids[-5:])
        assert row["prompt"].lower().endswith("what is the pass key? the pass key is")


def test_make_task_rejects_unknown_names_and_parameters():
    with pytest.raises(ValueError, match="Unknown task"):
        make_task("nope")
    with pytest.raises(ValueError, match="unknown parameters"):
        make_task("mqar", num_pairs=3)
    with pytest.raises(ValueError, match="even"):
        make_task("mqar", seq_len=65)


def test_mixture_cycles_through_its_tasks():
    mixture = TaskMixture([make_task("mqar", vocab_size=512, seq_len=t, num_kv_pairs=4) for t in (64, 128)])
    assert {mixture.batch(2, seed=s)["input_ids"].shape[1] for s in range(4)} == {64, 128}
    assert mixture.vocab_size == 512 and mixture.seq_len == 128

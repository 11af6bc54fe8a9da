"""Packing: documents in one row never see each other, in every block type."""

import pytest
import torch

from hybridzoo import HybridForCausalLM
from hybridzoo.data.documents import split_documents
from hybridzoo.recipes.data import TensorData, pack_documents
from tiny_models import MIXED_PATTERNS, PAD, SINGLE_BLOCK_PATTERNS, tiny_config

EOS = 2


def per_token_losses(model, input_ids, position_ids, labels):
    logits = model(input_ids, position_ids=position_ids, use_cache=False).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                             reduction="none")


@pytest.mark.parametrize("pattern", SINGLE_BLOCK_PATTERNS + MIXED_PATTERNS[-1:])
def test_packed_row_loss_equals_documents_run_one_by_one(pattern):
    model = HybridForCausalLM(tiny_config(pattern)).eval()
    documents = [torch.randint(3, 64, (n,)).tolist() for n in (7, 12, 5)]
    packed = pack_documents(documents, context_length=sum(len(d) + 1 for d in documents), eos_id=EOS, pad_id=PAD)
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        row = per_token_losses(model, packed["input_ids"], packed["position_ids"], packed["labels"])[0]
        start = 0
        for document in documents:
            ids = torch.tensor([document + [EOS]])
            alone = per_token_losses(model, ids, None, ids)[0]
            # inside the row: the document's own predictions; the one across the boundary is ignored (-100 -> 0)
            torch.testing.assert_close(row[start : start + len(alone)], alone, atol=2e-5, rtol=1e-4)
            start += len(document) + 1
            if start - 1 < len(row):
                assert row[start - 1] == 0  # the first token of the next document is not predicted


def test_rows_restart_positions_and_pad_the_tail():
    packed = pack_documents([[5] * 6, [6] * 3], context_length=4, eos_id=EOS, pad_id=PAD)
    assert packed["input_ids"].tolist() == [[5, 5, 5, 5], [5, 5, EOS, 6], [6, 6, EOS, PAD]]
    # a row that starts mid-document starts a fresh segment; the padding tail is its own segment
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 0]]
    assert packed["labels"][2].tolist() == [6, 6, EOS, -100]
    assert packed["labels"][1].tolist() == [5, 5, EOS, -100]


def test_batches_by_position_cover_each_epoch_once_and_split_by_document():
    data = TensorData({"input_ids": torch.arange(10).view(10, 1)}, seed=3)
    epoch = torch.cat([data.batch(p, 2)["input_ids"] for p in range(0, 10, 2)]).flatten()
    assert sorted(epoch.tolist()) == list(range(10))
    assert torch.equal(data.batch(4, 2)["input_ids"], data.batch(4, 2)["input_ids"])
    train, validation = split_documents(list(range(40)), 0.05)
    assert validation == [19, 39] and len(train) == 38


def test_local_files_are_tokenized_once_then_read_from_the_cache(tmp_path):
    from hybridzoo.recipes import load_recipe
    from hybridzoo.recipes.data import prepare_data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    (corpus / "b.jsonl").write_text("".join(f'{{"text": "print({i} * {i})"}}\n' for i in range(30)))
    recipe = load_recipe({"output_dir": str(tmp_path / "out"), "model": {"zoo": "lstm"},
                          "data": {"source": "files", "paths": [str(corpus)], "context_length": 16,
                                   "validation_fraction": 0.1, "cache_dir": str(tmp_path / "cache")},
                          "tokenizer": {"vocab_size": 300}})
    logs = []
    first = prepare_data(recipe, log=logs.append)
    assert "31 documents" not in first.description and first.description.startswith("28 train / 3 validation")
    second = prepare_data(recipe, log=logs.append)
    assert len(logs) == 1 and "from cache" in logs[0]
    for split in ("train", "validation"):  # every field of both splits, as written
        before, after = getattr(first, split).tensors, getattr(second, split).tensors
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the cache is safetensors, which loading never unpickles
    assert [path.suffix for path in (tmp_path / "cache" / "packed").iterdir()] == [".safetensors"]
    # the text survives the round trip through the trained byte-level BPE
    row = first.train.tensors["input_ids"][0].tolist()
    assert first.tokenizer.decode(row).replace("<eos>", "")[:10] in (corpus / "a.txt").read_text() + "".join(
        f"print({i} * {i})" for i in range(30))

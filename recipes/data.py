"""Training data: documents -> tokenizer -> packed rows (or labelled examples, or task batches), cached on disk.

Documents come from `hybridzoo.data.documents` and synthetic tasks from `hybridzoo.data.tasks`, the layer below the
recipes that the eval harness reads too.

Packing. Documents (each followed by EOS) are laid end to end and cut into rows of `context_length` tokens.
`position_ids` restart at 0 at every document start, which is all the model needs to keep documents apart: attention
is masked per document and every recurrent state and short convolution restarts there (see modeling_hybrid.py). The
label of a document's first token is -100, since nothing in its own document predicts it.

Batches are addressed by position rather than drawn from a loader: sample `p` of the training stream is row
`permutation(epoch)[p % rows]`, so a resumed or multi-process run gets its data from a single integer.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hybridzoo.data.documents import read_documents, split_documents
from hybridzoo.data.tasks import TaskMixture, batch_seed, make_task

# ---------------------------------------------------------------------------------------------------------------------
# tokenizer


def cache_root(data) -> Path:
    root = data.cache_dir or os.environ.get("HYBRIDZOO_CACHE") or Path.home() / ".cache" / "hybridzoo"
    return Path(root)


def _digest(*parts: Any) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return hasher.hexdigest()[:16]


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style: no unknown tokens) with <pad>, <bos>, <eos> as ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")


def load_or_train_tokenizer(recipe, train_texts: list[str], texts_digest: str):
    """The recipe's tokenizer: an AutoTokenizer path, the starting model's own, or a BPE trained (and cached)."""
    from transformers import AutoTokenizer

    path = recipe.tokenizer.path
    if path is None and recipe.model.from_pretrained and (Path(recipe.model.from_pretrained) /
                                                          "tokenizer_config.json").exists():
        path = recipe.model.from_pretrained
    if path is not None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        folder = cache_root(recipe.data) / "tokenizers" / _digest(texts_digest, recipe.tokenizer.vocab_size)
        if (folder / "tokenizer.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            tokenizer = train_bpe(train_texts, recipe.tokenizer.vocab_size)
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            tokenizer.save_pretrained(tmp)
            _replace_dir(tmp, folder)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer.path: {path!r} has no EOS token, which packing needs between documents.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; if another process got there first, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# packing and labelled examples


def pack_documents(token_lists: list[list[int]], context_length: int, eos_id: int, pad_id: int) -> dict:
    """Rows of `context_length`: `input_ids`, `position_ids` (0 at every document start), `labels`."""
    ids, positions, labels = [], [], []
    for tokens in token_lists:
        document = list(tokens) + [eos_id]
        ids += document
        positions += range(len(document))
        labels += [-100] + document[1:]
    remainder = len(ids) % context_length
    if remainder or not ids:
        # the tail becomes its own padding "document": positions restart, nothing is predicted
        fill = context_length - remainder
        ids += [pad_id] * fill
        positions += range(fill)
        labels += [-100] * fill
    rows = len(ids) // context_length
    # a row that starts mid-document starts a fresh segment: the model cannot see the previous row anyway
    position_ids = torch.tensor(positions).view(rows, context_length)
    for row in range(rows):
        segment = position_ids[row]
        if segment[0] != 0:
            first_start = int((segment == 0).nonzero()[0]) if (segment == 0).any() else context_length
            segment[:first_start] = torch.arange(first_start)
    return {
        "input_ids": torch.tensor(ids).view(rows, context_length),
        "position_ids": position_ids,
        "labels": torch.tensor(labels).view(rows, context_length),
    }


def classification_examples(texts_and_labels: list, tokenizer, context_length: int) -> dict:
    """Right-padded `input_ids`, `attention_mask` and integer `labels` (one per example)."""
    texts = [text for text, _ in texts_and_labels]
    labels = [label for _, label in texts_and_labels]
    if any(not isinstance(label, int) or isinstance(label, bool) for label in labels):
        raise ValueError("data.label_field: every example needs an integer class label.")
    encoded = tokenizer(texts, truncation=True, max_length=context_length, padding="max_length",
                        add_special_tokens=False, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
            "labels": torch.tensor(labels)}


# ---------------------------------------------------------------------------------------------------------------------
# batches by position


class TensorData:
    """Precomputed rows; the training stream visits them in a fresh seeded permutation every epoch."""

    def __init__(self, tensors: dict[str, torch.Tensor], seed: int) -> None:
        self.tensors = tensors
        self.seed = seed
        self.rows = len(next(iter(tensors.values())))
        self._permutations: dict[int, torch.Tensor] = {}

    def _row(self, position: int) -> int:
        epoch, offset = divmod(position, self.rows)
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._permutations = {epoch: torch.randperm(self.rows, generator=generator)}
        return int(self._permutations[epoch][offset])

    def batch(self, position: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Samples `position .. position + batch_size` of the shuffled stream."""
        index = torch.tensor([self._row(p) for p in range(position, position + batch_size)])
        return {name: tensor[index].long() for name, tensor in self.tensors.items()}

    def fixed_batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """The `index`-th batch of rows in stored order (evaluation)."""
        rows = torch.arange(index * batch_size, (index + 1) * batch_size) % self.rows
        return {name: tensor[rows].long() for name, tensor in self.tensors.items()}


class TaskData:
    """A synthetic task from the eval harness: every batch is generated from its own seed, batch `i` of the training
    stream from `batch_seed(seed, i)` (the rule `hybridzoo eval` scores with too)."""

    def __init__(self, task, seed: int) -> None:
        self.task = task
        self.seed = seed

    def batch(self, position: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Samples `position .. position + batch_size` of the stream: batch number `position // batch_size` (a
        mixture's slices take turns batch by batch)."""
        if position % batch_size:
            raise ValueError(f"task data is generated batch by batch: position {position} is not a multiple of the "
                             f"batch size {batch_size}")
        return self._generate(batch_size, batch_seed(self.seed, position // batch_size))

    def fixed_batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        return self._generate(batch_size, 2**31 - 1 - index)  # seeds far from the training stream

    def _generate(self, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        batch = self.task.batch(batch_size, seed=seed)
        return {"input_ids": torch.as_tensor(batch["input_ids"]).long(),
                "labels": torch.as_tensor(batch["labels"]).long()}


@dataclass
class PreparedData:
    train: TensorData | TaskData
    validation: TensorData | TaskData
    tokenizer: Any  # None for task data
    vocab_size: int
    description: str


def _task_vocab_size(task, params: dict) -> int:
    for source in (task, getattr(task, "config", None)):
        if source is not None and getattr(source, "vocab_size", None):
            return int(source.vocab_size)
    if "vocab_size" in params:
        return int(params["vocab_size"])
    raise ValueError("data.task_params: the task does not report its vocab_size; add data.task_params.vocab_size.")


def prepare_data(recipe, log=print) -> PreparedData:
    """Read, tokenize and pack (or load from cache) the recipe's data."""
    data, seed = recipe.data, recipe.train.seed
    if data.source == "task":
        if data.task_mixture:
            slices = [make_task(data.task, **{**data.task_params, **{k: v for k, v in entry.items() if k != "weight"}})
                      for entry in data.task_mixture]
            weights = [entry.get("weight", 1) for entry in data.task_mixture]
            task = TaskMixture([task for task, weight in zip(slices, weights, strict=True) for _ in range(weight)])
            description = f"task {data.task}, {len(slices)} slices in turn (weights {weights})"
        else:
            task = make_task(data.task, **data.task_params)
            description = f"task {data.task}"
        vocab_size = _task_vocab_size(task, data.task_params)
        return PreparedData(TaskData(task, seed), TaskData(task, seed), None, vocab_size, description)

    documents = read_documents(data.source, paths=data.paths, dataset=data.dataset, split=data.split,
                               text_field=data.text_field, label_field=data.label_field,
                               max_documents=data.max_documents)
    if len(documents) < 2:
        raise ValueError("data: found fewer than 2 documents; add files or raise data.max_documents.")
    train_docs, validation_docs = split_documents(documents, data.validation_fraction)
    texts_digest = _digest(*[text.encode() for text, _ in documents], [label for _, label in documents])
    tokenizer = load_or_train_tokenizer(recipe, [text for text, _ in train_docs], texts_digest)
    classification = recipe.model.head == "sequence_classification"
    key = _digest(texts_digest, tokenizer.backend_tokenizer.to_str(), data.context_length, classification,
                  data.validation_fraction)
    # safetensors, flat "split.field" keys: a cache file is never unpickled
    cache_file = cache_root(data) / "packed" / f"{key}.safetensors"
    if cache_file.exists():
        splits = {}
        for name, tensor in load_file(cache_file).items():
            split, field = name.split(".", 1)
            splits.setdefault(split, {})[field] = tensor
        log(f"data: loaded packed rows from cache {cache_file}")
    else:
        splits = {}
        for name, docs in (("train", train_docs), ("validation", validation_docs)):
            if classification:
                splits[name] = classification_examples(docs, tokenizer, data.context_length)
            else:
                tokens = tokenizer([text for text, _ in docs], add_special_tokens=False)["input_ids"]
                splits[name] = pack_documents(tokens, data.context_length, tokenizer.eos_token_id,
                                              tokenizer.pad_token_id)
            splits[name] = {k: v.to(torch.int32) for k, v in splits[name].items()}  # half the disk of int64
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        flat = {f"{split}.{field}": t.contiguous() for split, fields in splits.items() for field, t in fields.items()}
        save_file(flat, tmp)
        os.replace(tmp, cache_file)
    unit = "examples" if classification else "rows"
    description = (f"{len(train_docs)} train / {len(validation_docs)} validation documents -> "
                   f"{len(splits['train']['input_ids'])} / {len(splits['validation']['input_ids'])} {unit} of "
                   f"{data.context_length} tokens")
    return PreparedData(TensorData(splits["train"], seed), TensorData(splits["validation"], seed), tokenizer,
                        len(tokenizer), description)

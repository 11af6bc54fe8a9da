"""Documents: (text, label-or-None) pairs read from this machine's Python sources, files, or a `datasets` dataset.

The one reader of text data: the recipes tokenize and pack what it returns (recipes/data.py) and the eval harness
scores held-out documents of the same split (`split_documents`), so a model never sees its validation documents.
`read_documents` takes the fields of a recipe's `data` section that name documents, as keyword arguments.
"""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet", ".py", ".md")


# ---------------------------------------------------------------------------------------------------------------------
# documents


def stdlib_files() -> list[Path]:
    """The Python standard library's own top-level .py files: real text found on every machine."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise FileNotFoundError("No Python standard library sources found; use data.source: files instead.")
    return files


def _read_file(path: Path, text_field: str, label_field: str | None) -> list[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ImportError(f"Reading {path} needs pyarrow: pip install pyarrow") from error
        records = pq.read_table(path).to_pylist()
    else:
        return [(path.read_text(errors="replace"), None)]
    for record in records:
        if text_field not in record:
            raise KeyError(f"data.text_field: {path} has no field {text_field!r}; fields are {sorted(record)}.")
    return [(r[text_field], r.get(label_field) if label_field else None) for r in records]


def _expand(paths: list[str]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        files += sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    return files


def _dataset_records(name: str, split: str, text_field: str, label_field: str | None) -> list[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as error:
        message = "data.source: dataset needs the `datasets` package: pip install 'hybridzoo[train]'"
        raise ImportError(message) from error
    saved = Path(name)
    if saved.is_dir() and any((saved / marker).exists() for marker in ("dataset_dict.json", "state.json")):
        dataset = datasets.load_from_disk(name)
        dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
    else:
        dataset = datasets.load_dataset(name, split=split)
    return [(row[text_field], row.get(label_field) if label_field else None) for row in dataset]


def shuffled_lines_examples(snippet_lines: int = 12) -> list[tuple[str, int]]:
    """Built-in classification data: stdlib code snippets, label 1 when their lines were shuffled, else 0."""
    examples = []
    rng = random.Random(0)
    for path in stdlib_files():
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        for start in range(0, len(lines) - snippet_lines, snippet_lines):
            snippet = lines[start : start + snippet_lines]
            label = len(examples) % 2
            if label:
                while snippet == lines[start : start + snippet_lines]:
                    rng.shuffle(snippet)
            examples.append(("\n".join(snippet), label))
    return examples


def read_documents(source: str, *, paths: list[str] = (), dataset: str | None = None, split: str = "train",
                   text_field: str = "text", label_field: str | None = None,
                   max_documents: int | None = None) -> list[tuple[str, Any]]:
    """(text, label-or-None) per document, in a fixed order. `source`: stdlib | files (`paths`) | dataset (`dataset`,
    `split`) | stdlib_shuffled_lines; the other arguments are the recipe's `data.*` fields of the same names."""
    if source == "stdlib":
        documents = [(p.read_text(errors="replace"), None) for p in stdlib_files()]
    elif source == "stdlib_shuffled_lines":
        documents = shuffled_lines_examples()
    elif source == "files":
        documents = [doc for path in _expand(paths) for doc in _read_file(path, text_field, label_field)]
    elif source == "dataset":
        documents = _dataset_records(dataset, split, text_field, label_field)
    else:
        raise ValueError(f"data.source: {source!r} is not a document source (stdlib, files, dataset, "
                         "stdlib_shuffled_lines)")
    if max_documents:
        documents = documents[:max_documents]
    return documents


def split_documents(documents: list, fraction: float) -> tuple[list, list]:
    """Every k-th document (file, for the stdlib corpus) is validation, k = round(1 / fraction)."""
    every = max(2, round(1 / fraction))
    train = [d for i, d in enumerate(documents) if i % every != every - 1]
    validation = [d for i, d in enumerate(documents) if i % every == every - 1]
    if not validation:  # fewer documents than `every`: the last one still validates
        train, validation = documents[:-1], documents[-1:]
    return train, validation

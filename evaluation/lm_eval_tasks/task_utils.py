"""lm-eval `custom_dataset` hooks: our generators, run in-process by lm-evaluation-harness (no dataset download).

Each function receives the task YAML's `metadata` (plus any `--metadata` JSON given to `lm-eval`) as keyword
arguments and returns `{"test": datasets.Dataset}` with the text form of the task: `prompt`, `answer`, `length`,
`depth`. Keys read from the metadata: `lengths` (context lengths in task words), `depths`, `num_examples` (per cell),
`seed`, `vocab_size` (the task vocabulary; only matters for models trained on the token-level task).
"""

from __future__ import annotations

from hybridzoo.data.tasks import make_task


def _rows(name: str, metadata: dict, with_depth: bool) -> dict:
    import datasets  # lm-eval's own dependency

    lengths = metadata.get("lengths", [256])
    depths = metadata.get("depths", [0.0, 0.5, 1.0]) if with_depth else [None]
    rows = []
    for length in lengths:
        for depth in depths:
            params = {"vocab_size": metadata.get("vocab_size", 1024), "seq_len": int(length)}
            if depth is not None:
                params["depth"] = float(depth)
            task = make_task(name, **params)
            for row in task.text_examples(int(metadata.get("num_examples", 20)), int(metadata.get("seed", 0))):
                rows.append({"prompt": row["prompt"], "answer": row["answer"], "length": int(length),
                             "depth": -1.0 if depth is None else float(depth)})
    return {"test": datasets.Dataset.from_list(rows)}


def passkey(**metadata) -> dict:
    return _rows("passkey", metadata, with_depth=True)


def niah_single_2(**metadata) -> dict:
    return _rows("niah_single_2", metadata, with_depth=True)


def niah_multikey(**metadata) -> dict:
    return _rows("niah_multikey", metadata, with_depth=True)


def variable_tracking(**metadata) -> dict:
    return _rows("variable_tracking", metadata, with_depth=False)

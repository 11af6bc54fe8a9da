"""`hybridzoo compare`: train several zoo architectures on the same synthetic task with the same budget, side by side.

Zoology's setting: 2 layers, no MLP (`intermediate_size=0`), the same width, AdamW + cosine, the same number of steps
and the same data stream for every architecture (batch `i` from `batch_seed(seed, i)`, the training slices in turn);
accuracy at the query positions with argmax over the full vocabulary, with a 95% Wilson interval. The default grid
(MQAR (T, kv) = (64, 8), V = 512, d = 64) finishes in a few minutes on 2 CPU cores; `--slices`, `--d-models`,
`--steps` give Zoology-sized grids.

Each (architecture, width) is a recipe trained by the recipes' trainer in `OUTPUT_DIR/runs/ARCH-dWIDTH/` (the saved
model, metrics.jsonl, checkpoints), so a compare that is stopped and started again with the same settings resumes the
cell it was training and reuses the finished ones.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from hybridzoo.configs.settings import add_command, at_least, setting, takes_settings
from hybridzoo.configs.zoo import ARCHITECTURES, task_model_fields
from hybridzoo.data.tasks import chance_accuracy, make_task
from hybridzoo.evaluation.harness import make_rows, model_info, write_outputs
from hybridzoo.evaluation.metrics import evaluate_task
from hybridzoo.recipes.sweep import load_sweep, run_sweep, task_recipe, train_cell

DEFAULT_OUTPUT_DIR = "outputs/compare"


@dataclass
class CompareSettings:
    """What `hybridzoo compare` takes (its options are generated from these fields), `run_compare` too."""

    architectures: list[str] = setting(["transformer", "gated-deltanet", "lstm"], "zoo architectures trained",
                                       choices=tuple(ARCHITECTURES))
    task: str = setting("mqar", "the synthetic task", choices=("mqar", "forgetting_mqar"))
    train_slices: list[tuple[int, int]] = setting([(64, 8)], "training slices seq_len:num_kv_pairs (Zoology grid: "
                                                  "64:4 128:8 256:16 512:64)", flag="--slices", metavar="T:KV")
    test_slices: list[tuple[int, int]] | None = setting(None, "test slices, e.g. 512:128 (default: the training "
                                                        "slices)", metavar="T:KV")
    d_models: list[int] = setting([64], "model widths", check=at_least(1))
    num_heads: int = setting(2, "heads of attention and (Gated) DeltaNet (Zoology's trade-off sweep: 2)",
                             check=at_least(1))
    steps: int = setting(1500, "training steps per model", check=at_least(1))
    batch_size: int = setting(64, "training examples per step", check=at_least(1))
    lr: float = setting(3e-3, "AdamW learning rate (cosine schedule)", check=at_least(0))
    vocab_size: int = setting(512, "task vocabulary size", check=at_least(1))
    random_non_queries: bool = setting(False, "random tokens at the non-query positions (Zoology's Fig. 2 setting: "
                                       "blanks stay 0)")
    test_examples: int = setting(500, "test examples per slice", check=at_least(1))
    seed: int = setting(0, "seed of the data stream and the initialisation")
    threads: int | None = setting(None, "torch intra-op threads (default: torch's)", check=at_least(1))
    output_dir: str | None = setting(None, f"where the results go (default: {DEFAULT_OUTPUT_DIR}, or "
                                     "outputs/sweeps/NAME with --sweep)")
    sweep: str | None = setting(None, "run a sweep given as data instead: a built-in name (zoology, zoology-cpu, "
                                "parity-neg-eigval, ...) or a YAML file (format: sweep.py's docstring); models x "
                                "widths x learning rates, best learning rate per cell, resumable from --output-dir; "
                                "the other options are ignored")
    restart: bool = setting(False, "with --sweep: start over in an output folder that holds another sweep's cells "
                            "(kept as cells.jsonl.bak)")
    summary_only: bool = setting(False, "with --sweep: train nothing; rewrite the table, JSON and plot from the cells "
                                 "finished so far")


def compare_recipe(architecture: str, d_model: int, settings: CompareSettings) -> dict:
    """The training recipe of one cell: the 2-layer, MLP-free `architecture` at width `d_model` (heads as in Zoology's
    trade-off sweep) on the training slices in turn, in its own folder under `output_dir/runs/`."""
    longest = max(t for t, _ in settings.train_slices + (settings.test_slices or []))
    fields = task_model_fields(architecture, d_model, settings.vocab_size, settings.num_heads, longest=longest)
    task_params = {"vocab_size": settings.vocab_size, "random_non_queries": settings.random_non_queries}
    slices = [{"seq_len": t, "num_kv_pairs": kv} for t, kv in settings.train_slices]
    return task_recipe(Path(settings.output_dir) / "runs" / f"{architecture}-d{d_model}", settings.task, task_params,
                       slices, architecture, fields, settings.steps, settings.batch_size, settings.lr, settings.seed)


def _slice_task(settings: CompareSettings, seq_len: int, num_kv_pairs: int):
    return make_task(settings.task, vocab_size=settings.vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs,
                     random_non_queries=settings.random_non_queries)


def run_compare(settings: CompareSettings, log=print) -> tuple[list[dict], dict[str, Path]]:
    """Train every (architecture, width) on the training slices, evaluate on the test slices, write the outputs."""
    settings = replace(settings, output_dir=settings.output_dir or DEFAULT_OUTPUT_DIR)
    for architecture in settings.architectures:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    test_slices = settings.test_slices or settings.train_slices
    rows: list[dict] = []
    for d_model in settings.d_models:
        for architecture in settings.architectures:
            label = f"{architecture} d={d_model}"
            model, record = train_cell(compare_recipe(architecture, d_model, settings), log)
            info = dict(model_info(model, architecture), model=f"{architecture}-d{d_model}")
            seconds = record["seconds"]
            newton = {k: v for k, v in record.items() if k.startswith("newton_")}
            for seq_len, kv in test_slices:
                task = _slice_task(settings, seq_len, kv)
                start = time.perf_counter()
                metrics = evaluate_task(model, task, settings.test_examples, seed=settings.seed + 10_000)
                cell = {"num_kv_pairs": kv, "train_seconds": seconds, "train_steps": settings.steps,
                        "eval_seconds": time.perf_counter() - start, "chance": chance_accuracy(task),
                        "final_train_loss": record["final_loss"], **newton}
                rows += make_rows(info, settings.task, seq_len, settings.seed, metrics, **cell)
                accuracy = next(m for m in metrics if m["metric"] == "accuracy")
                log(f"{label} (T={seq_len}, kv={kv}): accuracy {accuracy['value']:.3f} "
                    f"[{accuracy['ci_low']:.3f}, {accuracy['ci_high']:.3f}] n={accuracy['n']}, "
                    f"trained {seconds:.0f} s"
                    + (f", Newton iterations mean {newton['newton_mean_iterations']:.2f} max "
                       f"{newton['newton_max_iterations']}, fallbacks {newton['newton_fallbacks']}" if newton else ""))
            # rewrite the results after every model, so a long grid that is stopped keeps what it measured
            write_outputs(rows, {}, settings.output_dir, title=f"hybridzoo compare ({settings.task}, partial)")
    out = Path(settings.output_dir)
    written = write_outputs(rows, {}, out, title=f"hybridzoo compare ({settings.task})")
    table = compare_table(rows, settings)
    written["compare"] = out / "compare.md"
    written["compare"].write_text(table + "\n")
    (out / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    return rows, written


def compare_table(rows: list[dict], settings: CompareSettings) -> str:
    """The side-by-side table: one line per (architecture, width), one accuracy column per test slice."""
    slices = sorted({(r["length"], r["num_kv_pairs"]) for r in rows})
    header = ["architecture", "d", "pattern", "state bytes (longest slice)", "train s"]
    header += [f"T={t}, kv={kv}" for t, kv in slices]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    models = []
    for r in rows:
        key = (r["architecture"], r["d_model"])
        if key not in models:
            models.append(key)
    for architecture, d_model in models:
        mine = [r for r in rows if (r["architecture"], r["d_model"]) == (architecture, d_model)
                and r["metric"] == "accuracy"]
        longest = max(mine, key=lambda r: r["length"])
        cells = [architecture, str(d_model), mine[0]["pattern"], f"{longest['state_bytes']:,}",
                 f"{mine[0]['train_seconds']:.0f}"]
        for t, kv in slices:
            match = [r for r in mine if (r["length"], r["num_kv_pairs"]) == (t, kv)]
            cells.append(f"{match[0]['value']:.3f} [{match[0]['ci_low']:.3f}, {match[0]['ci_high']:.3f}]"
                         if match else "")
        lines.append("| " + " | ".join(cells) + " |")
    n = rows[0]["n"] if rows else 0
    chance = rows[0].get("chance", 0) if rows else 0
    lines.append("")
    lines.append(f"Accuracy at the query positions (argmax over all {settings.vocab_size} tokens), 95% Wilson interval "
                 f"over n = {n:,} queries ({settings.test_examples} examples); chance = {chance:.4f}. "
                 f"{settings.steps} steps × batch {settings.batch_size}, AdamW lr {settings.lr}, warm-up + cosine; "
                 f"2 layers, no MLP.")
    return "\n".join(lines)


@takes_settings(CompareSettings)
def compare(settings: CompareSettings) -> dict[str, Path]:
    """`hybridzoo compare` as a function: the side-by-side run (`run_compare`), or with `sweep` that sweep
    (`run_sweep`, into `output_dir` or outputs/sweeps/NAME); returns the paths written. Takes a `CompareSettings`
    or its fields as arguments: `compare(architectures=["lstm"], steps=300)`."""
    if settings.sweep:
        spec = load_sweep(settings.sweep)
        return run_sweep(spec, settings.output_dir or f"outputs/sweeps/{spec.name}", restart=settings.restart,
                         summary_only=settings.summary_only)
    return run_compare(settings)[1]


def add_arguments(parser) -> None:
    """`hybridzoo compare [--architectures ...] [--task ...] ... | --sweep NAME`: the options are
    `CompareSettings`' fields."""
    def run(settings: CompareSettings) -> int:
        written = compare(settings)
        print(written["markdown" if settings.sweep else "compare"].read_text())
        for name, path in written.items():
            print(f"{name}: {path}")
        return 0

    add_command(parser, CompareSettings, run)

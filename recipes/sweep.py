"""Sweeps given as data: models x widths x learning rates (x seeds) trained on one task, tested on several slices.

A sweep is a YAML file (`recipes/sweeps/NAME.yaml` for the built-in ones, or any path):

    name: zoology-cpu
    task: mqar                        # a task of data/tasks.py
    task_params: {vocab_size: 512}    # shared by every train and test slice
    train: [{seq_len: 64, num_kv_pairs: 4, weight: 5}, ...]   # a mixture; `weight` = share of the steps
    test: [{seq_len: 64, num_kv_pairs: 4}, ...]
    models: [transformer, {name: gdn-neg, zoo: gated-deltanet, overrides: {linear_allow_neg_eigval: true}}]
    d_models: [64, 128]               # a model may list its own `d_models`
    learning_rates: {logspace: [-3, -1.5, 4]}   # or a list
    seeds: [0]
    steps: 1000
    batch_size: 64

How it runs (`hybridzoo compare --sweep NAME_OR_PATH`):
- the grid is every (model, width, learning rate, seed) cell; each cell is trained and tested by a *cell runner*
  (`train_and_test` below: the cell as a recipe, trained by the recipes' trainer in `runs/CELL/` of the output
  folder, then scored by the eval harness; any function with its signature can replace it, so the grid, selection,
  resume and plots do not depend on how a cell is trained);
- every finished cell is appended to `cells.jsonl` in the output folder (flushed and fsynced), so a killed sweep
  started again with the same output folder skips what is done and continues, and the cell it was training resumes
  from its newest checkpoint; a different sweep in that folder is refused (the message says how to restart);
- the best learning rate per (model, width) is the one with the highest mean test accuracy over the slices, averaged
  over seeds (Zoology reports the max over its 4 learning rates);
- outputs: `results.jsonl` (every row, `selected` marks the best learning rate's), `sweep.md` (the table at the best
  learning rates, with the published reference numbers that match beside it), `summary.json`, and a plot:
  accuracy vs state bytes for MQAR (the Zoology/Based trade-off, attention's state being its KV cache at the longest
  test slice), accuracy vs test length for the state-tracking tasks (length generalisation).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from hybridzoo.configs.settings import build, did_you_mean
from hybridzoo.configs.zoo import ARCHITECTURES, task_model_fields
from hybridzoo.data.tasks import TASKS, GroupWordTask, chance_accuracy, make_task
from hybridzoo.evaluation import plots
from hybridzoo.evaluation.harness import make_rows, model_info
from hybridzoo.evaluation.metrics import evaluate_task, wilson_interval
from hybridzoo.evaluation.references import matching_references, references_markdown
from hybridzoo.modeling import HybridForCausalLM
from hybridzoo.recipes.recipe import load_recipe
from hybridzoo.recipes.trainer import train

SWEEP_DIR = Path(__file__).parent / "sweeps"
CELLS_FILE = "cells.jsonl"
SPEC_FILE = "sweep.json"


@dataclass
class ModelSpec:
    """One model of a sweep: a zoo architecture with config overrides, under its own name."""

    name: str
    zoo: str
    overrides: dict = field(default_factory=dict)
    d_models: list[int] | None = None  # None: the sweep's


@dataclass
class SweepSpec:
    name: str
    task: str
    train: list[dict]
    test: list[dict]
    models: list[ModelSpec]
    d_models: list[int]
    learning_rates: list[float]
    steps: int
    batch_size: int = 64
    seeds: list[int] = field(default_factory=lambda: [0])
    task_params: dict = field(default_factory=dict)
    num_layers: int = 2
    num_heads: int = 2
    test_examples: int = 500
    description: str = ""

    def cells(self) -> list[Cell]:
        """The grid in run order: seed, model, width, learning rate (a sweep stopped early has every model of the
        first seeds rather than every seed of the first models)."""
        return [Cell(model.name, d, lr, seed) for seed in self.seeds for model in self.models
                for d in (model.d_models or self.d_models) for lr in self.learning_rates]

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def train_tasks(self) -> list[tuple[object, int]]:
        """(task, weight) per training slice."""
        return [(make_task(self.task, **{**self.task_params, **_without(params, "weight")}),
                 int(params.get("weight", 1))) for params in self.train]

    def test_tasks(self) -> list:
        return [make_task(self.task, **{**self.task_params, **params}) for params in self.test]

    def fingerprint(self) -> str:
        """A hash of everything that changes results (not the description)."""
        settings = _without(asdict(self), "description")
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    model: str
    d_model: int
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}|d={self.d_model}|lr={self.lr:.6g}|seed={self.seed}"

    @property
    def folder_name(self) -> str:
        """The cell's training folder under `runs/`."""
        return re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.model}-d{self.d_model}-lr{self.lr:.6g}-seed{self.seed}")


def _without(mapping: dict, *keys: str) -> dict:
    return {k: v for k, v in mapping.items() if k not in keys}


# ---------------------------------------------------------------------------------------------------------------------
# reading a sweep


SPEC_KEYS = {f for f in SweepSpec.__dataclass_fields__}
MODEL_KEYS = {f for f in ModelSpec.__dataclass_fields__}


def builtin_sweeps() -> list[str]:
    return sorted(path.stem for path in SWEEP_DIR.glob("*.yaml"))


def load_sweep(name_or_path: str) -> SweepSpec:
    """A built-in sweep by name (`zoology`, `zoology-cpu`, ...) or a YAML file; every field is checked."""
    path = Path(name_or_path)
    if not path.is_file():
        path = SWEEP_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ValueError(f"--sweep {name_or_path!r} is neither a YAML file nor a built-in sweep "
                         f"({', '.join(builtin_sweeps())})")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a sweep is a YAML mapping")
    return sweep_from_dict(data, source=str(path))


def sweep_from_dict(data: dict, source: str = "sweep") -> SweepSpec:
    def fail(field_name: str, problem: str) -> ValueError:
        return ValueError(f"{source}: `{field_name}` {problem}")

    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        raise fail(unknown[0], f"is not a sweep field; {did_you_mean(unknown[0], sorted(SPEC_KEYS))}")
    for required in ("name", "task", "train", "test", "models", "d_models", "learning_rates", "steps"):
        if required not in data:
            raise fail(required, "is required")
    if data["task"] not in TASKS:
        raise fail("task", f"{data['task']!r} is not a task; choose one of {', '.join(TASKS)}")
    models = []
    for entry in data["models"]:
        entry = {"name": entry, "zoo": entry} if isinstance(entry, str) else dict(entry)
        entry.setdefault("zoo", entry.get("name"))
        bad = sorted(set(entry) - MODEL_KEYS)
        if bad:
            raise fail("models", f"entry {entry} has an unknown key `{bad[0]}`; "
                       f"{did_you_mean(bad[0], sorted(MODEL_KEYS))}")
        if entry["zoo"] not in ARCHITECTURES:
            raise fail("models", f"entry {entry['name']!r}: zoo architecture {entry['zoo']!r} is not one of "
                       f"{', '.join(ARCHITECTURES)}")
        models.append(build(ModelSpec, entry, prefix=f"{source}: models: {entry['name']}: "))
    if len({m.name for m in models}) != len(models):
        raise fail("models", "names must be distinct")
    rates = data["learning_rates"]
    if isinstance(rates, dict):
        if set(rates) != {"logspace"} or len(rates["logspace"]) != 3:
            raise fail("learning_rates", "is a list or {logspace: [start, stop, num]} (powers of 10, as numpy)")
        start, stop, num = rates["logspace"]
        rates = [float(x) for x in np.logspace(start, stop, int(num))]
    data = dict(data, models=models, learning_rates=[float(x) for x in rates])
    spec = build(SweepSpec, data, prefix=f"{source}: ")  # a type check per field, as for recipes
    for name in ("train", "test"):
        if not getattr(spec, name) or not all(isinstance(p, dict) for p in getattr(spec, name)):
            raise fail(name, "is a non-empty list of task-parameter mappings")
    try:  # building every slice checks the task parameters now, not hours into the sweep
        spec.train_tasks()
        spec.test_tasks()
    except ValueError as error:
        raise fail("train/test", f"has a slice the task rejects: {error}") from error
    for name in ("steps", "batch_size", "test_examples", "num_layers"):
        if getattr(spec, name) < 1:
            raise fail(name, "must be >= 1")
    return spec


# ---------------------------------------------------------------------------------------------------------------------
# a cell as a recipe, trained by the recipes' trainer (also `hybridzoo compare`'s cells)


CellRunner = Callable[[SweepSpec, Cell, Path], list[dict]]  # (sweep, cell, the cell's own folder) -> rows
# Zoology's training setting: AdamW (betas 0.9, 0.98; weight decay 0.1 on matrices), linear warm-up over a tenth of
# the steps, then cosine to 0; gradient norm clipped at 1
TASK_TRAINING = {"betas": [0.9, 0.98], "weight_decay": 0.1, "min_lr_ratio": 0.0, "grad_clip": 1.0}
WARMUP_FRACTION = 0.1
CHECKPOINT_EVERY = 100  # steps: a killed cell loses at most this much


def task_recipe(output_dir: str | Path, task: str, task_params: dict, slices: list[dict], zoo: str, model_fields: dict,
                steps: int, batch_size: int, lr: float, seed: int) -> dict:
    """A training recipe for one cell: zoo architecture `zoo` ("tiny" size with `model_fields` over it, see
    `task_model_fields`) trained on `task`'s `slices` in turn (each task parameters over `task_params`, with an optional
    `weight`), Zoology's optimizer setting, batch `i` generated from `batch_seed(seed, i)`."""
    warmup = min(max(1, int(WARMUP_FRACTION * steps)), steps - 1)
    return {
        "output_dir": str(output_dir),
        "description": f"{zoo} on {task}, {steps} steps x batch {batch_size}, lr {lr:.6g}, seed {seed}",
        "model": {"zoo": zoo, "size": "tiny", "overrides": dict(model_fields)},
        "data": {"source": "task", "task": task, "task_params": dict(task_params), "task_mixture": list(slices)},
        "train": {"max_steps": steps, "micro_batch_size": batch_size, "lr": lr, "warmup_steps": warmup, "seed": seed,
                  **TASK_TRAINING},
        "eval": {"every": 0, "batches": 1},
        "checkpoint": {"every": CHECKPOINT_EVERY, "keep": 1},
    }


def smoothed_loss(metrics_path: Path, decay: float = 0.95) -> float | None:
    """The training loss at the end of a run, as an exponential moving average over its steps."""
    smoothed = None
    for line in metrics_path.read_text().splitlines():
        loss = json.loads(line)["loss"]
        smoothed = loss if smoothed is None else decay * smoothed + (1 - decay) * loss
    return smoothed


def train_cell(recipe: dict, log: Callable[[str], None] = print) -> tuple[HybridForCausalLM, dict]:
    """Train one cell's recipe in its folder, resuming a run that was cut short and reusing a finished one (a folder
    holding a run of other settings is started over). Returns the saved model (eval mode) and the training summary
    (`steps`, `seconds`, `newton_*` for ParaRNN blocks) with the smoothed final training loss (`final_loss`)."""
    folder = Path(recipe["output_dir"])
    saved = folder / "recipe.yaml"
    if saved.exists() and yaml.safe_load(saved.read_text()) != load_recipe(recipe).to_dict():
        log(f"{folder} holds a run with other settings: training this cell from the start")
        shutil.rmtree(folder)
    if (folder / "summary.json").exists():
        summary = json.loads((folder / "summary.json").read_text())
    else:
        summary = train(recipe, resume=True)
    model = HybridForCausalLM.from_pretrained(folder).eval()
    return model, {**summary, "final_loss": smoothed_loss(folder / "metrics.jsonl")}


def test_slice_fields(task) -> dict:
    """The fields that name a test slice in the rows: its length and, for MQAR, the number of kv pairs."""
    if isinstance(task, GroupWordTask):
        return {"length": task.length, "num_kv_pairs": None}
    return {"length": task.seq_len, "num_kv_pairs": getattr(task, "num_kv_pairs", None)}


def cell_recipe(spec: SweepSpec, cell: Cell, folder: Path) -> dict:
    """`cell` of `spec` as a training recipe in `folder`: the sweep's training slices, the model's width and overrides,
    the cell's learning rate and seed."""
    model_spec = spec.model(cell.model)
    tasks = [task for task, _ in spec.train_tasks()] + spec.test_tasks()
    longest = max(task.seq_len for task in tasks)
    vocab_size = max(task.vocab_size for task in tasks)
    fields = task_model_fields(model_spec.zoo, cell.d_model, vocab_size=vocab_size, num_heads=spec.num_heads,
                               num_layers=spec.num_layers, longest=longest, **model_spec.overrides)
    return task_recipe(folder, spec.task, spec.task_params, spec.train, model_spec.zoo, fields, spec.steps,
                       spec.batch_size, cell.lr, cell.seed)


def train_and_test(spec: SweepSpec, cell: Cell, folder: Path) -> list[dict]:
    """Train `cell` through the recipes' trainer in `folder`, test it on every test slice; returns the rows."""
    model, record = train_cell(cell_recipe(spec, cell, folder))
    info = dict(model_info(model, spec.model(cell.model).zoo), model=cell.model)
    rows = []
    for task in spec.test_tasks():
        fields = test_slice_fields(task)
        metrics = evaluate_task(model, task, spec.test_examples, seed=cell.seed + 10_000)
        rows += make_rows(info, spec.task, fields["length"], cell.seed, metrics, num_kv_pairs=fields["num_kv_pairs"],
                          lr=cell.lr, cell=cell.key, chance=chance_accuracy(task), train_seconds=record["seconds"],
                          train_steps=spec.steps, final_train_loss=record["final_loss"],
                          **{k: v for k, v in record.items() if k.startswith("newton_")})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# resumable execution


def read_finished_cells(out: Path, fingerprint: str) -> dict[str, dict]:
    """Finished cells recorded in `cells.jsonl`, by key. A line cut short by a kill is dropped (and cut off the file,
    so the next append starts on a fresh line); lines of another sweep are an error."""
    path = out / CELLS_FILE
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as f:  # drop the partial last record
            f.truncate(len(complete))
    finished = {}
    for line in complete.decode().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record["fingerprint"] != fingerprint:
            raise ValueError(f"{path} holds cells of a different sweep; use another --output-dir or --restart")
        finished[record["cell"]] = record
    return finished


def append_cell(out: Path, record: dict) -> None:
    with open(out / CELLS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_output(spec: SweepSpec, out: Path, restart: bool = False) -> None:
    """Create the folder, or check it holds this very sweep. `restart` keeps the old cells as a backup."""
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC_FILE
    if spec_path.exists():
        previous = json.loads(spec_path.read_text())
        if previous.get("fingerprint") != spec.fingerprint() and not restart:
            changed = sorted(k for k, v in previous.get("spec", {}).items()
                             if k != "description" and json.dumps(v, sort_keys=True)
                             != json.dumps(asdict(spec).get(k), sort_keys=True))
            raise ValueError(f"{out} holds sweep {previous.get('spec', {}).get('name')!r} with other settings "
                             f"(changed: {', '.join(changed) or 'unknown'}); use another --output-dir, or --restart "
                             f"to start over (the finished cells are kept as {CELLS_FILE}.bak)")
    if restart and (out / CELLS_FILE).exists():
        os.replace(out / CELLS_FILE, out / f"{CELLS_FILE}.bak")
    _write_atomic(spec_path, json.dumps({"fingerprint": spec.fingerprint(), "spec": asdict(spec)}, indent=2) + "\n")


def _print(message: str) -> None:
    print(message, flush=True)


def run_sweep(spec: SweepSpec, output_dir: str | Path, runner: CellRunner = train_and_test, restart: bool = False,
              log: Callable[[str], None] = _print, summary_only: bool = False) -> dict[str, Path]:
    """Run every unfinished cell of `spec` (resuming from `output_dir`), then write the summary outputs.
    `summary_only`: train nothing, rewrite the outputs from the cells finished so far."""
    out = Path(output_dir)
    prepare_output(spec, out, restart)
    fingerprint = spec.fingerprint()
    finished = read_finished_cells(out, fingerprint)
    cells = spec.cells()
    todo = [] if summary_only else [cell for cell in cells if cell.key not in finished]
    log(f"sweep {spec.name}: {len(cells)} cells ({len(spec.models)} models x widths x {len(spec.learning_rates)} "
        f"learning rates x {len(spec.seeds)} seeds); {len(cells) - len(todo)} already done in {out}")
    started = time.perf_counter()
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"sweep {spec.name}", unit="cell")
    try:
        for done, cell in enumerate(todo, start=1):
            cell_start = time.perf_counter()
            rows = runner(spec, cell, out / "runs" / cell.folder_name)
            seconds = time.perf_counter() - cell_start
            append_cell(out, {"fingerprint": fingerprint, "cell": cell.key, "seconds": seconds, "rows": rows})
            finished[cell.key] = {"rows": rows}
            bar.update(1)
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (len(todo) - done)
            log(f"[{len(cells) - len(todo) + done}/{len(cells)}] {cell.key}: mean accuracy "
                f"{mean_accuracy(rows):.3f} ({seconds:.0f} s); elapsed {_duration(elapsed)}, ETA {_duration(eta)}")
            write_summary(spec, finished, out, plot=False)  # a stopped sweep still has its table
    finally:
        bar.close()
        written = write_summary(spec, finished, out) if finished else {}
    return written


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------------------------------
# best learning rate, confidence intervals, outputs


def mean_accuracy(rows: list[dict]) -> float:
    """Zoology's selection metric: the mean accuracy over the test slices of one cell."""
    values = [r["value"] for r in rows if r["metric"] == "accuracy"]
    return sum(values) / len(values) if values else math.nan


def best_learning_rates(rows_by_cell: dict[str, list[dict]], cells: list[Cell]) -> dict[tuple[str, int], dict]:
    """Per (model, width): the learning rate whose mean accuracy over the test slices, averaged over seeds, is
    highest (ties: the smaller rate), with every rate's score. Cells not yet finished are left out."""
    scores: dict[tuple[str, int], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        if cell.key in rows_by_cell:
            scores[(cell.model, cell.d_model)][cell.lr].append(mean_accuracy(rows_by_cell[cell.key]))
    best = {}
    for key, by_lr in scores.items():
        averaged = {lr: sum(v) / len(v) for lr, v in sorted(by_lr.items())}
        valid = {lr: s for lr, s in averaged.items() if not math.isnan(s)}
        lr = max(valid, key=lambda r: (valid[r], -r)) if valid else min(averaged)
        best[key] = {"lr": lr, "score": averaged[lr], "scores": averaged}
    return best


def pooled_accuracy(rows: list[dict]) -> dict:
    """Accuracy rows of one test slice over seeds: the mean value and a Wilson interval on the pooled counts."""
    rows = sorted(rows, key=lambda r: r["seed"])
    correct = sum(r["correct"] for r in rows)
    n = sum(r["n"] for r in rows)
    low, high = wilson_interval(correct, n)
    return {"value": sum(r["value"] for r in rows) / len(rows), "ci_low": low, "ci_high": high, "n": n,
            "seeds": [r["seed"] for r in rows], "per_seed": [r["value"] for r in rows]}


def mean_over_slices(slices: list[dict]) -> dict:
    """The mean over test slices, its interval from the slices' Wilson half-widths combined in quadrature (the slices
    are independent samples; a normal approximation)."""
    k = len(slices)
    value = sum(s["value"] for s in slices) / k
    low = math.sqrt(sum((s["value"] - s["ci_low"]) ** 2 for s in slices)) / k
    high = math.sqrt(sum((s["ci_high"] - s["value"]) ** 2 for s in slices)) / k
    return {"value": value, "ci_low": max(0.0, value - low), "ci_high": min(1.0, value + high)}


def summarize(spec: SweepSpec, finished: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(every row with `selected` set, one summary point per (model, width) at its best learning rate)."""
    rows_by_cell = {key: record["rows"] for key, record in finished.items()}
    cells = spec.cells()
    best = best_learning_rates(rows_by_cell, cells)
    all_rows, points = [], []
    for cell in cells:
        for row in rows_by_cell.get(cell.key, []):
            all_rows.append(dict(row, selected=best[(cell.model, cell.d_model)]["lr"] == cell.lr))
    for (model, d_model), choice in best.items():
        chosen = [r for r in all_rows if r["selected"] and r["model"] == model and r["d_model"] == d_model
                  and r["metric"] == "accuracy"]
        by_slice: dict[tuple, list[dict]] = defaultdict(list)
        for r in chosen:
            by_slice[(r["length"], r["num_kv_pairs"])].append(r)
        slices = {key: pooled_accuracy(group)
                  for key, group in sorted(by_slice.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))}
        longest = max(chosen, key=lambda r: r["length"])
        points.append({"model": model, "architecture": chosen[0]["architecture"], "pattern": chosen[0]["pattern"],
                       "d_model": d_model, "best_lr": choice["lr"], "lr_scores": choice["scores"],
                       "state_bytes": longest["state_bytes"], "state_bytes_at_length": longest["length"],
                       "chance": chosen[0].get("chance"),
                       "slices": [{"length": k[0], "num_kv_pairs": k[1], **v} for k, v in slices.items()],
                       "mean": mean_over_slices(list(slices.values()))})
    return all_rows, points


def write_summary(spec: SweepSpec, finished: dict[str, dict], out: Path, plot: bool = True) -> dict[str, Path]:
    all_rows, points = summarize(spec, finished)
    written = {"results": out / "results.jsonl", "markdown": out / "sweep.md", "summary": out / "summary.json"}
    _write_atomic(written["results"], "".join(json.dumps(r) + "\n" for r in all_rows))
    references = matching_references(spec.task, spec.test, spec.task_params)
    complete = len(finished) == len(spec.cells())
    table = sweep_table(spec, points, complete, references)
    if references:
        table += "\n\n" + references_markdown(references)
    _write_atomic(written["markdown"], table + "\n")
    summary = {"sweep": asdict(spec), "cells_done": len(finished), "cells_total": len(spec.cells()),
               "points": points, "references": references}
    _write_atomic(written["summary"], json.dumps(summary, indent=2) + "\n")
    if not plot:
        return written
    if spec.task in ("mqar",):
        path = plots.accuracy_vs_state(points, out / "accuracy_vs_state.png", references,
                                       title=f"{spec.name}: MQAR recall vs state size")
    else:
        train_length = max(test_slice_fields(task)["length"] for task, _ in spec.train_tasks())
        path = plots.length_generalisation(points, out / "length_generalisation.png", train_length,
                                           title=f"{spec.name}: {spec.task}")
    if path is not None:
        written["plot"] = path
    return written


def _slice_name(s: dict) -> str:
    return f"T={s['length']}, kv={s['num_kv_pairs']}" if s.get("num_kv_pairs") else f"length {s['length']}"


def nearest_published(point: dict, references: list[dict]) -> str:
    """The published point of the same architecture nearest in state bytes (within a factor of 2), as a cell."""
    candidates = [r for r in references if r["x_kind"] == "state_bytes" and point.get("state_bytes")
                  and r.get("architecture") == point["architecture"] and 0.5 <= r["x"] / point["state_bytes"] <= 2]
    if not candidates:
        return ""
    best = min(candidates, key=lambda r: abs(math.log(r["x"] / point["state_bytes"])))
    return f"{best['value']:.2f} at {best['x']:,} B ({best['source']})"


def sweep_table(spec: SweepSpec, points: list[dict], complete: bool = True,
                references: list[dict] | None = None) -> str:
    """Markdown: one line per (model, width) at its best learning rate, accuracy with 95% interval per test slice,
    and the published number of the same architecture at a similar state size (another scale) where there is one."""
    names = []
    for p in points:
        for s in p["slices"]:
            if _slice_name(s) not in names:
                names.append(_slice_name(s))
    published = {(p["model"], p["d_model"]): nearest_published(p, references or []) for p in points}
    show_published = any(published.values())
    header = ["model", "d", "pattern", "state bytes", "best lr", "seeds", *names, "mean [95% CI]"]
    if show_published:
        header.append("published, other scale (nearest state size)")
    lines = [f"# sweep {spec.name}" + ("" if complete else " (partial: not every cell has finished)"), "",
             spec.description.strip(), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in points:
        cells = {_slice_name(s): s for s in p["slices"]}
        line = [p["model"], str(p["d_model"]), p["pattern"] or "", f"{p['state_bytes']:,}", f"{p['best_lr']:.2g}",
                ", ".join(str(seed) for seed in p["slices"][0]["seeds"])]
        for name in names:
            s = cells.get(name)
            line.append(f"{s['value']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if s else "")
        m = p["mean"]
        line.append(f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]")
        if show_published:
            line.append(published[(p["model"], p["d_model"])])
        lines.append("| " + " | ".join(line) + " |")
    lrs = ", ".join(f"{lr:.3g}" for lr in spec.learning_rates)
    lines += ["", f"Accuracy at the scored positions (argmax over the full vocabulary), {spec.test_examples} test "
              f"examples per slice and seed; 95% Wilson interval on the pooled counts (over the seeds listed); the "
              f"mean's interval combines the slices' in quadrature. Best of learning rates {lrs} by mean accuracy "
              f"over the slices. {spec.steps} steps x batch {spec.batch_size}, AdamW + cosine, {spec.num_layers} "
              f"layers, no MLP. State bytes: recurrent state, plus the KV cache at length "
              f"{max((p['state_bytes_at_length'] for p in points), default=0)} for attention."]
    per_seed = [p for p in points if len(spec.seeds) > 1]
    if per_seed:
        lines += ["", "Per seed, at the best learning rate:", ""]
        for p in per_seed:
            for s in p["slices"]:
                values = ", ".join(f"{v:.3f} (seed {seed})" for seed, v in zip(s["seeds"], s["per_seed"], strict=True))
                lines.append(f"- {p['model']} d={p['d_model']}, {_slice_name(s)}: {values}")
    return "\n".join(lines)

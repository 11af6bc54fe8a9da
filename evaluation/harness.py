"""`hybridzoo eval`: run the retrieval / long-context suites on a saved model or a zoo architecture.

Results are long-format rows, one per measurement (`architecture, pattern, d_model, state_bytes, task, length,
depth, num_kv_pairs, metric, value, ci_low, ci_high, n, seed`), written as `results.jsonl`, a markdown table
`results.md` and PNG plots (recall vs state bytes, a length × depth heatmap per NIAH task, loss by position with the
training length marked, ms/token vs context).

Token-level tasks use the model's own vocabulary size, so a model trained by a recipe on `data.task: passkey` (same
`vocab_size`) sees exactly the token ids it was trained on. A zoo name gives an untrained tiny model: a baseline and a
pipeline check (decode cost is meaningful untrained); use `hybridzoo compare` to train and compare architectures.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hybridzoo.configs.settings import add_command, at_least, setting, takes_settings
from hybridzoo.configs.zoo import ARCHITECTURES, describe, zoo_config
from hybridzoo.data.documents import read_documents, split_documents
from hybridzoo.data.tasks import (
    MQAR_EXTRAPOLATION_SLICES,
    MQAR_STANDARD_SLICES,
    WordVocabulary,
    batch_seed,
    make_task,
)
from hybridzoo.modeling import CACHE_NAME, HybridForCausalLM

from . import plots
from .metrics import Accumulator, evaluate_task, loss_by_position, score_batch, wilson_interval
from .references import beside_ours

SUITES = ("retrieval", "long-context", "state-tracking", "all")
STATE_TRACKING_TASKS = ("parity", "modular_addition", "permutation_s3", "permutation_s5")
STATE_TRACKING_LENGTHS = (32, 64, 128, 256)
# tasks that share a token vocabulary and layout: a model trained on one of them can be tested on the others
WORD_TASKS = ("passkey", "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "variable_tracking",
              "copy", "parity_words", "lm_stream")
TASK_FAMILIES = [("mqar", "forgetting_mqar"), WORD_TASKS, *((name,) for name in STATE_TRACKING_TASKS)]
NIAH_TASKS = ("passkey", "niah_single_2", "niah_single_3", "niah_multikey")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_LENGTHS = (256, 512, 1024)
DECODE_LENGTHS = (256, 1024, 4096, 16384)
TEXT_TASK_VOCABULARY = 1024  # task words drawn for the text level, as in the lm-eval task YAMLs


# ---------------------------------------------------------------------------------------------------------------------
# models and their description


def load_model(spec: str, size: str = "tiny", vocab_size: int | None = None):
    """A saved model folder (loaded with `trust_remote_code`) or a zoo architecture name (untrained, `size`)."""
    if Path(spec).is_dir():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=True, dtype=torch.float32)
        label = Path(spec).name
    elif spec in ARCHITECTURES:
        overrides = {"vocab_size": vocab_size} if vocab_size else {}
        torch.manual_seed(0)
        model = HybridForCausalLM(zoo_config(spec, size, **overrides))
        label = spec
    else:
        known = ", ".join(ARCHITECTURES)
        raise ValueError(f"{spec!r} is neither a saved model folder nor a zoo architecture ({known})")
    model.eval()
    return model, label


def trained_on(spec: str) -> dict | None:
    """What a saved model was trained on, from its folder: `{"kind": "task", "task": NAME}` (a recipe with
    `data.source: task`: token-level tasks of that family fit), `{"kind": "text"}` (a real tokenizer saved with it:
    text-level tasks fit, the tasks' token ids mean nothing to it), or None (a zoo name or an unknown folder: every
    suite runs, as a pipeline check)."""
    folder = Path(spec)
    if not folder.is_dir():
        return None
    data = saved_recipe(folder).get("data") or {}
    if data.get("source") == "task" and data.get("task"):
        return {"kind": "task", "task": data["task"]}
    if any((folder / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        return {"kind": "text"}
    return None


def saved_recipe(folder: Path) -> dict:
    """The resolved recipe a model folder was trained with (`recipe.yaml`), or {}."""
    path = Path(folder) / "recipe.yaml"
    if not path.exists():
        return {}
    import yaml

    recipe = yaml.safe_load(path.read_text())
    return recipe if isinstance(recipe, dict) else {}


def task_fits(name: str, trained: dict | None) -> bool:
    """Whether the token-level task `name` means something to a model trained on `trained` (see `trained_on`)."""
    if trained is None:
        return True
    if trained["kind"] != "task":
        return False
    return any(name in family and trained["task"] in family for family in TASK_FAMILIES)


def model_info(model, label: str) -> dict:
    """Architecture fields shared by every row of this model; state sizes from the zoo's closed forms."""
    config = model.config
    info = {"architecture": label, "pattern": None, "d_model": getattr(config, "hidden_size", None),
            "recurrent_state_bytes": None, "kv_bytes_per_token": None, "sliding_window": None}
    if getattr(config, "block_types", None):
        described = describe(config)
        info.update(pattern=described["pattern"], recurrent_state_bytes=described["recurrent_state_bytes"],
                    kv_bytes_per_token=described["kv_bytes_per_token"], sliding_window=described["sliding_window"])
    return info


def state_bytes_at(info: dict, length: int) -> int | None:
    """Bytes of decoding state after `length` tokens: fixed recurrent state + KV (capped by a sliding window)."""
    if info["recurrent_state_bytes"] is None:
        return None
    kv_tokens = min(length, info["sliding_window"]) if info["sliding_window"] else length
    return info["recurrent_state_bytes"] + info["kv_bytes_per_token"] * kv_tokens


def make_rows(info: dict, task: str, length: int, seed: int, metrics: Iterable[dict], **cell) -> list[dict]:
    base = {"model": info.get("model") or info["architecture"], "architecture": info["architecture"],
            "pattern": info["pattern"], "d_model": info["d_model"],
            "state_bytes": state_bytes_at(info, length), "task": task, "length": length,
            "depth": cell.pop("depth", None), "num_kv_pairs": cell.pop("num_kv_pairs", None), "seed": seed}
    return [{**base, **cell, **metric} for metric in metrics]


# ---------------------------------------------------------------------------------------------------------------------
# the suites


def mqar_slices(vocab_size: int, lengths: Iterable[int] | None) -> list[tuple[int, int]]:
    """Zoology's test slices that this vocabulary allows (V > T), restricted to `lengths` when given."""
    chosen = MQAR_STANDARD_SLICES + MQAR_EXTRAPOLATION_SLICES
    if lengths:
        chosen = [s for s in chosen if s[0] in set(lengths)]
    return [(T, kv) for T, kv in chosen if vocab_size > T]


def run_mqar(model, info: dict, slices: list[tuple[int, int]], num_examples: int, seed: int,
             batch_size: int) -> list[dict]:
    rows = []
    for T, kv in tqdm(slices, desc="mqar slices", leave=False):
        task = make_task("mqar", vocab_size=model.config.vocab_size, seq_len=T, num_kv_pairs=kv)
        metrics = evaluate_task(model, task, num_examples, seed, batch_size)
        rows += make_rows(info, "mqar", T, seed, metrics, num_kv_pairs=kv)
    return rows


def run_forgetting(model, info: dict, lengths: list[int], num_examples: int, seed: int, batch_size: int) -> list[dict]:
    """Forgetting MQAR, scored separately on re-assigned and untouched keys."""
    rows = []
    for T in lengths:
        if model.config.vocab_size <= T or T < 48:
            continue
        task = make_task("forgetting_mqar", vocab_size=model.config.vocab_size, seq_len=T)
        updated, untouched = Accumulator(), Accumulator()
        for start in range(0, num_examples, batch_size):
            size = min(batch_size, num_examples - start)
            batch = task.batch(size, seed=batch_seed(seed, start))
            for accumulator, keep in ((updated, batch["updated"]), (untouched, ~batch["updated"])):
                masked = dict(batch, labels=batch["labels"].masked_fill(~keep, -100))
                accumulator.add(score_batch(model, masked))
        for name, accumulator in (("forgetting_mqar_updated", updated), ("forgetting_mqar_untouched", untouched)):
            rows += make_rows(info, name, T, seed, accumulator.metrics(), num_kv_pairs=task.num_kv_pairs)
    return rows


def run_word_tasks(model, info: dict, names: Iterable[str], lengths: list[int], depths: Iterable[float | None],
                   num_examples: int, seed: int, batch_size: int) -> list[dict]:
    """NIAH-style tasks over the length × depth grid (depth None: a task without a needle depth)."""
    rows = []
    grid = [(name, length, depth) for name in names for length in lengths
            for depth in (depths if name in NIAH_TASKS else [None])]
    too_short: set[tuple[str, int]] = set()
    for name, length, depth in tqdm(grid, desc="needle tasks", leave=False):
        if (name, length) in too_short:
            continue
        params = {"vocab_size": model.config.vocab_size, "seq_len": length}
        if depth is not None:
            params["depth"] = depth
        task = make_task(name, **params)
        try:
            metrics = evaluate_task(model, task, num_examples, seed, batch_size)
        except ValueError as error:  # e.g. a 16-character uuid needle and its question do not fit in 64 tokens
            tqdm.write(f"skipped {name} at length {length}: {error}")
            too_short.add((name, length))  # the same at every depth: say it once
            continue
        rows += make_rows(info, name, length, seed, metrics, depth=depth)
    return rows


@torch.no_grad()
def score_text_example(model, tokenizer, prompt: str, answer: str) -> tuple[float, bool, int]:
    """(log-likelihood of the answer, whether greedy decoding reproduces it token for token, prompt+answer tokens).

    The answer follows the prompt after a space, as lm-eval's `target_delimiter` has it.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([prompt_ids + answer_ids])
    log_probs = model(input_ids=input_ids).logits[0, len(prompt_ids) - 1 : -1].float().log_softmax(-1)
    targets = torch.tensor(answer_ids)
    loglik = log_probs.gather(-1, targets[:, None]).sum().item()
    return loglik, bool((log_probs.argmax(-1) == targets).all()), input_ids.shape[1]


def run_text_tasks(model, tokenizer, info: dict, names: Iterable[str], lengths: list[int],
                   depths: Iterable[float | None], num_examples: int, seed: int) -> list[dict]:
    """The word tasks at the text level, for models with a real tokenizer: each prompt tokenized by the model's own
    tokenizer, scored by the answer's log-likelihood and by exact greedy match (95% Wilson interval). Task names get
    a `_text` suffix; `length` is the task length in words (the tokens per example are in `mean_tokens`)."""
    rows = []
    grid = [(name, length, depth) for name in names for length in lengths
            for depth in (depths if name in NIAH_TASKS else [None])]
    for name, length, depth in tqdm(grid, desc="text tasks", leave=False):
        params = {"vocab_size": TEXT_TASK_VOCABULARY, "seq_len": length}
        if depth is not None:
            params["depth"] = depth
        try:
            examples = make_task(name, **params).text_examples(num_examples, seed)
        except ValueError as error:
            tqdm.write(f"skipped {name} at length {length}: {error}")
            continue
        scores = [score_text_example(model, tokenizer, e["prompt"], e["answer"]) for e in examples]
        correct = sum(exact for _, exact, _ in scores)
        low, high = wilson_interval(correct, len(scores))
        metrics = [{"metric": "exact", "value": correct / len(scores), "ci_low": low, "ci_high": high,
                    "n": len(scores)},
                   {"metric": "answer_loglik", "value": sum(ll for ll, _, _ in scores) / len(scores), "n": len(scores)}]
        mean_tokens = sum(t for _, _, t in scores) / len(scores)
        rows += make_rows(info, f"{name}_text", length, seed, metrics, depth=depth, mean_tokens=mean_tokens)
    return rows


def run_state_tracking(model, info: dict, names: Iterable[str], lengths: Iterable[int], num_examples: int, seed: int,
                       batch_size: int) -> list[dict]:
    """Group word problems (parity, modular addition, S_3/S_5): the final running product at each length (a model
    trained on length L and tested at 2L, 4L, ... gives the length-generalisation curve); `copy` by string length."""
    rows = []
    for name in names:
        for length in lengths:
            params = {"vocab_size": model.config.vocab_size, "length": length}
            if name != "copy":
                params["score"] = "last"
            try:
                task = make_task(name, **params)
            except ValueError as error:  # e.g. S_5 needs 121 token ids
                tqdm.write(f"skipped {name}: {error}")
                break
            rows += make_rows(info, name, length, seed, evaluate_task(model, task, num_examples, seed, batch_size),
                              seq_len=task.seq_len)
    return rows


def held_out_text_documents(source: str, tokenizer, validation_fraction: float = 0.05) -> list[list[int]]:
    """The validation documents of a text source the recipes accept, tokenized with the model's own tokenizer.

    `source` is `stdlib` (this machine's Python sources), a file or folder (.txt / .jsonl / .parquet), or a `datasets`
    name. The split is the recipes' (every k-th document), so a model trained by a recipe on the same source with the
    same `validation_fraction` never saw these documents.
    """
    if source == "stdlib":
        documents = read_documents("stdlib")
    elif Path(source).exists():
        documents = read_documents("files", paths=[source])
    else:
        documents = read_documents("dataset", dataset=source)
    _, validation = split_documents(documents, validation_fraction)
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in validation]


def run_loss_by_position(model, info: dict, train_length: int, multiples: Iterable[int], num_examples: int,
                         seed: int, batch_size: int, documents: list[list[int]] | None = None,
                         ) -> tuple[list[dict], dict[str, list[float]]]:
    """Loss by position at T, 2T, 4T, 8T (T = the training length): the mean over all positions and over the
    positions beyond T, and the per-position curve at the longest length measured.

    With `documents` (token ids of held-out real documents, see `held_out_text_documents`) each example is the first
    L tokens of a document at least L long (fewer than `num_examples` when fewer are that long; `n` says how many);
    without, the synthetic `lm_stream` documents in the model's vocabulary (for models trained on them).
    """
    rows, curve = [], []
    task_name = "lm_stream" if documents is None else "text_loss"
    for multiple in multiples:
        length = train_length * multiple
        if documents is None:
            task = make_task("lm_stream", vocab_size=model.config.vocab_size, seq_len=length)
            batches = [task.batch(min(batch_size, num_examples - start), seed=batch_seed(seed, start))["input_ids"]
                       for start in range(0, num_examples, batch_size)]
        else:
            long_enough = [ids[:length] for ids in documents if len(ids) >= length][:num_examples]
            if not long_enough:
                tqdm.write(f"loss by position: no held-out document has {length} tokens; stopping at {length // 2}")
                break
            batches = [torch.tensor(long_enough[i : i + batch_size]) for i in range(0, len(long_enough), batch_size)]
        n = sum(len(b) for b in batches)
        total = sum(loss_by_position(model, b) * len(b) for b in batches)
        losses = (total / n).tolist()
        metrics = [{"metric": "loss", "value": sum(losses) / len(losses), "n": n}]
        if length > train_length:
            beyond = losses[train_length - 1 :]
            metrics.append({"metric": "loss_beyond_train", "value": sum(beyond) / len(beyond), "n": n})
        rows += make_rows(info, task_name, length, seed, metrics, train_length=train_length)
        curve = losses
    return rows, {info["architecture"]: curve}


class PeakRSS:
    """Peak resident memory of this process while inside the `with` block, sampled from /proc every 2 ms (Linux)."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                import os

                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.start) / 2**20


@torch.no_grad()
def decode_cost(model, length: int, new_tokens: int = 16, seed: int = 0) -> dict:
    """Prefill `length` random tokens (batch 1), then time `new_tokens` greedy steps with the cache, each on its own.

    `ms_per_token` is the median step, after one untimed step: the first step after a long prefill runs on cold
    caches, and with a handful of tokens one stalled step would move a mean by tens of percent."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (1, length), generator=generator)
    with PeakRSS() as memory:
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - start
        cache = getattr(out, CACHE_NAME)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        steps = []
        for step in range(new_tokens + 1):
            start = time.perf_counter()
            out = model(input_ids=token, **{CACHE_NAME: cache}, use_cache=True)
            cache = getattr(out, CACHE_NAME)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            if step:
                steps.append(time.perf_counter() - start)
    sizes = cache.state_bytes() if hasattr(cache, "state_bytes") else {"recurrent": None, "kv": None}
    return {"ms_per_token": 1000 * statistics.median(steps), "prefill_s": prefill,
            "peak_rss_delta_mib": memory.delta_mib, "cache_recurrent_bytes": sizes["recurrent"],
            "cache_kv_bytes": sizes["kv"]}


def run_decode_cost(model, info: dict, lengths: Iterable[int], new_tokens: int, seed: int) -> list[dict]:
    rows = []
    for length in tqdm(list(lengths), desc="decode cost", leave=False):
        measured = decode_cost(model, length, new_tokens, seed)
        metrics = [{"metric": name, "value": value, "n": new_tokens} for name, value in measured.items()]
        rows += make_rows(info, "decode_cost", length, seed, metrics)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# the whole run and its outputs


def evaluate_model(model, label: str, suite: str = "retrieval", lengths: list[int] | None = None,
                   num_examples: int = 100, seed: int = 0, batch_size: int = 16, train_length: int = 256,
                   decode_lengths: list[int] | None = None, decode_tokens: int = 16,
                   depths: Iterable[float] = DEPTHS, text_documents: list[list[int]] | None = None,
                   tokenizer=None, trained: dict | None = None,
                   architecture: str | None = None) -> tuple[list[dict], dict[str, list[float]]]:
    """All rows of `suite` for one model that fit what it was trained on, and its loss-by-position curve.

    `label` names the model in every row (`model`); `architecture` (default: `label`) is its zoo architecture.
    `trained` (see `trained_on`): a task-trained model gets the token-level tasks of its task's family only, a model
    with a real tokenizer none (its text-level tasks come with `tokenizer`), None every task (a pipeline check).
    `text_documents` (held-out real documents in the model's tokenizer, see `held_out_text_documents`): loss by
    position is measured on them instead of the synthetic `lm_stream`.
    `tokenizer` (the model's own): the needle and variable-tracking tasks run at the text level (`run_text_tasks`).
    Decode cost is a property of the architecture and runs for every model.
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")
    info = dict(model_info(model, architecture or label), model=label)
    vocab_size = model.config.vocab_size

    def fits(name: str) -> bool:
        return task_fits(name, trained) and (name not in WORD_TASKS or vocab_size >= WordVocabulary.minimum_size())

    lengths = sorted(lengths) if lengths else list(DEFAULT_LENGTHS)
    rows: list[dict] = []
    curves: dict[str, list[float]] = {}
    if suite in ("retrieval", "all"):
        if fits("mqar"):
            rows += run_mqar(model, info, mqar_slices(vocab_size, None if lengths == list(DEFAULT_LENGTHS) else
                                                      lengths), num_examples, seed, batch_size)
        if fits("forgetting_mqar"):
            rows += run_forgetting(model, info, [length for length in (128, 256) if length <= max(lengths)],
                                   num_examples, seed, batch_size)
        if tokenizer is not None:
            rows += run_text_tasks(model, tokenizer, info, [*NIAH_TASKS, "variable_tracking"], lengths, depths,
                                   num_examples, seed)
        else:
            word_tasks = [name for name in [*NIAH_TASKS, "variable_tracking"] if fits(name)]
            rows += run_word_tasks(model, info, word_tasks, lengths, depths, num_examples, seed, batch_size)
    if suite in ("long-context", "all"):
        if text_documents is not None:
            loss_rows, curves = run_loss_by_position(model, info, train_length, (1, 2, 4, 8), num_examples, seed,
                                                     batch_size, documents=text_documents)
            rows += loss_rows
        elif fits("lm_stream"):
            loss_rows, curves = run_loss_by_position(model, info, train_length, (1, 2, 4, 8), num_examples, seed,
                                                     batch_size)
            rows += loss_rows
        if suite == "long-context":  # passkey over T..8T: retention beyond the training length
            long_lengths = [train_length * m for m in (1, 2, 4, 8)]
            if tokenizer is not None:
                rows += run_text_tasks(model, tokenizer, info, ["passkey"], long_lengths, depths, num_examples, seed)
            elif text_documents is None and fits("passkey"):
                rows += run_word_tasks(model, info, ["passkey"], long_lengths, depths, num_examples, seed, batch_size)
        rows += run_decode_cost(model, info, decode_lengths or DECODE_LENGTHS, decode_tokens, seed)
    if suite in ("state-tracking", "all"):
        names = [name for name in STATE_TRACKING_TASKS if fits(name)]
        rows += run_state_tracking(model, info, names, STATE_TRACKING_LENGTHS, num_examples, seed, batch_size)
        if fits("copy"):
            rows += run_state_tracking(model, info, ["copy"], (16, 64), num_examples, seed, batch_size)
    return rows, curves


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_table(rows: list[dict], metrics: Iterable[str] = ("accuracy", "exact", "loss", "loss_beyond_train",
                                                               "ms_per_token", "cache_kv_bytes")) -> str:
    """One line per measurement of the main metrics, with the 95% interval and n."""
    wanted = set(metrics)
    lines = ["| model | architecture | state bytes | task | length | kv | depth | metric | value | 95% CI | n |",
             "|---|---|---:|---|---:|---:|---:|---|---:|---|---:|"]
    for r in rows:
        if r["metric"] not in wanted:
            continue
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r.get("ci_low") is not None else ""
        lines.append(f"| {r.get('model') or r['architecture']} | {r['architecture']} | {_format(r['state_bytes'])} | "
                     f"{r['task']} | {r['length']} | "
                     f"{_format(r['num_kv_pairs'])} | {_format(r['depth'])} | {r['metric']} | {_format(r['value'])} | "
                     f"{ci} | {_format(r.get('n'))} |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], curves: dict[str, list[float]], out_dir: str | Path,
                  train_length: int | None = None, title: str = "hybridzoo eval") -> dict[str, Path]:
    """results.jsonl, results.md and every plot the rows allow; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"jsonl": out / "results.jsonl", "markdown": out / "results.md"}
    with open(written["jsonl"], "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    published = beside_ours(rows)  # the papers' numbers where a task and length match, marked as another scale
    written["markdown"].write_text(f"# {title}\n\n{markdown_table(rows)}\n" + (f"\n{published}\n" if published else ""))
    if curves:  # the per-position losses behind the (binned) plot
        written["loss_by_position_json"] = out / "loss_by_position.json"
        written["loss_by_position_json"].write_text(json.dumps({"train_length": train_length, "curves": curves}))
    candidates = {"recall_vs_state": plots.recall_vs_state(rows, out / "recall_vs_state.png"),
                  "loss_by_position": plots.loss_by_position(curves, out / "loss_by_position.png", train_length),
                  "decode_cost": plots.decode_cost(rows, out / "decode_cost.png"),
                  "accuracy": plots.accuracy_bars([r for r in rows if r["task"].startswith("mqar")],
                                                  out / "accuracy.png")}
    for task in sorted({r["task"] for r in rows if r.get("depth") is not None}):
        for model in sorted({plots.model_name(r) for r in rows}):
            name = f"heatmap_{task}_{model}".replace("/", "_")
            candidates[name] = plots.niah_heatmap(rows, out / f"{name}.png", task, model)
    written.update({name: path for name, path in candidates.items() if path is not None})
    return written


@dataclass
class EvalSettings:
    """What `hybridzoo eval` and `run_eval` take (the command's options are generated from these fields)."""

    models: list[str] = setting(help="saved model folders or zoo architecture names (untrained)", positional=True,
                                metavar="MODEL")
    suite: str = setting("retrieval", "the eval suite", choices=SUITES)
    out_dir: str | Path = setting("outputs/eval", "where results.jsonl, results.md and the plots go",
                                  flag="--output-dir")
    size: str = setting("tiny", "zoo size for architecture names")
    text: str | None = setting(None, "loss by position on held-out documents of this text source, in each model's "
                               "own tokenizer: stdlib, a .txt/.jsonl/.parquet file or folder, or a datasets name "
                               "(default: synthetic lm_stream documents)")
    level: str = setting("auto", "token: the tasks' token ids (models trained on them); text: prompt + answer in "
                         "each saved model's own tokenizer, scored by the answer's log-likelihood and exact greedy "
                         "match; auto: text for models saved with a real tokenizer, token otherwise",
                         choices=("auto", "token", "text"))
    lengths: list[int] | None = setting(None, "context lengths for the needle tasks and MQAR slices (default: "
                                        f"{' '.join(map(str, DEFAULT_LENGTHS))}, MQAR: its standard slices)",
                                        check=at_least(1))
    num_examples: int = setting(100, "examples per cell", flag="--examples", check=at_least(1))
    seed: int = setting(0, "seed of the generated examples")
    batch_size: int = setting(16, "examples per forward pass", check=at_least(1))
    train_length: int = setting(256, "the models' training length T (loss by position is measured at T, 2T, 4T, 8T)",
                                check=at_least(1))
    decode_lengths: list[int] = setting(list(DECODE_LENGTHS), "context lengths of the decode-cost measurement",
                                        check=at_least(1))
    decode_tokens: int = setting(16, "tokens decoded per decode-cost measurement (each timed; the median is reported)",
                                 check=at_least(1))
    depths: list[float] = setting(list(DEPTHS), "needle depths (0: start of the context, 1: its end)")


@takes_settings(EvalSettings)
def run_eval(settings: EvalSettings) -> dict[str, Path]:
    """`hybridzoo eval` as a function: evaluate every model spec (`eval_rows`) and write the combined outputs. Takes
    an `EvalSettings` or its fields as arguments: `run_eval(["outputs/run"], suite="all", num_examples=20)`."""
    rows, curves = eval_rows(settings.models, settings.suite, settings.size, settings.text, settings.level,
                             lengths=settings.lengths, num_examples=settings.num_examples, seed=settings.seed,
                             batch_size=settings.batch_size, train_length=settings.train_length,
                             decode_lengths=settings.decode_lengths, decode_tokens=settings.decode_tokens,
                             depths=settings.depths)
    return write_outputs(rows, curves, settings.out_dir, settings.train_length,
                         title=f"hybridzoo eval ({settings.suite})")


def eval_rows(models: list[str], suite: str = "retrieval", size: str = "tiny", text: str | None = None,
              level: str = "auto", **kwargs) -> tuple[list[dict], dict[str, list[float]]]:
    """The rows and loss-by-position curves of every model spec on `suite` (`evaluate_model`'s keyword arguments).

    Each model gets what fits what it was trained on (`trained_on`): token-level tasks for a model trained on a task
    by a recipe, text-level tasks for a model saved with a real tokenizer (`level="auto"`); `level="token"` or
    `"text"` forces one. `text`: a text source (`stdlib`, a file or folder, a `datasets` name) for loss by position,
    read with each saved model's own tokenizer. Rows name their model (the folder name, or the zoo name).
    """
    if level not in ("auto", "token", "text"):
        raise ValueError(f"level must be 'auto', 'token' or 'text', got {level!r}")
    rows, curves = [], {}
    for spec in models:
        model, label = load_model(spec, size=size)
        trained = trained_on(spec)
        model_level = level if level != "auto" else ("text" if trained and trained["kind"] == "text" else "token")
        tokenizer = documents = None
        if text is not None or model_level == "text":
            if not Path(spec).is_dir():
                raise ValueError(f"--text and --level text need a saved model folder with a tokenizer; {spec!r} is a "
                                 "zoo name")
            from transformers import AutoTokenizer

            model_tokenizer = AutoTokenizer.from_pretrained(spec)
            documents = held_out_text_documents(text, model_tokenizer) if text is not None else None
            tokenizer = model_tokenizer if model_level == "text" else None
        if level == "token" and trained and trained["kind"] == "text":
            trained = None  # forced: run the token-level tasks anyway
        architecture = (saved_recipe(Path(spec)).get("model") or {}).get("zoo") if Path(spec).is_dir() else None
        model_rows, model_curves = evaluate_model(model, label, suite, text_documents=documents, tokenizer=tokenizer,
                                                  trained=trained, architecture=architecture, **kwargs)
        rows += model_rows
        curves.update(model_curves)
    return rows, curves


def add_arguments(parser) -> None:
    """`hybridzoo eval MODEL... --suite ...`: the options are `EvalSettings`' fields."""
    def run(settings: EvalSettings) -> int:
        written = run_eval(settings)
        print(written["markdown"].read_text())
        for name, path in written.items():
            print(f"{name}: {path}")
        return 0

    add_command(parser, EvalSettings, run)

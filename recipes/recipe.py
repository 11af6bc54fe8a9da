"""The recipe schema: one dataclass per YAML section, loading, `key=value` overrides and validation.

A recipe is checked completely before anything runs. An unknown or mistyped key, a value of the wrong type or an
impossible value raises `RecipeError` naming the dotted key (`train.lr`) and the fix. The key and type checks are the
settings schema's (`hybridzoo.configs.settings.build`); the comment on a key's line is its help in
`hybridzoo train --help`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hybridzoo.configs.settings import SettingsError, build, setting

RECIPE_DIR = Path(__file__).resolve().parent
# names other tools use for our keys, suggested when a recipe uses them
ALIASES = {"learning_rate": "lr", "batch_size": "micro_batch_size", "gradient_accumulation_steps": "grad_accum",
           "steps": "max_steps", "seq_len": "context_length", "mixed_precision": "precision", "rank": "r"}


class RecipeError(SettingsError):
    """A recipe key is unknown, has the wrong type or an impossible value."""


@dataclass
class ModelSection:
    zoo: str | None = None  # zoo architecture name (hybridzoo.configs.zoo.ARCHITECTURES) ...
    size: str = "tiny"  # ... and size
    overrides: dict = field(default_factory=dict)  # any HybridConfig field
    from_pretrained: str | None = None  # ... or a saved model folder to start from
    head: str = "causal_lm"  # causal_lm | sequence_classification
    num_labels: int = 2  # sequence_classification only


@dataclass
class DataSection:
    source: str = "stdlib"  # stdlib | files | dataset | task | stdlib_shuffled_lines
    paths: list = field(default_factory=list)  # files: .txt/.jsonl/.parquet files or folders
    dataset: str | None = None  # dataset: a `datasets` name or local path
    split: str = "train"
    text_field: str = "text"
    label_field: str = "label"  # sequence classification data
    task: str | None = None  # task: a generator name in hybridzoo.data.tasks (e.g. mqar)
    task_params: dict = field(default_factory=dict)
    # task: several slices in turn (batch i from slice i mod n), each task parameters over task_params, with an
    # optional `weight` (the number of turns it gets), e.g. [{seq_len: 64, num_kv_pairs: 4, weight: 2}, ...]
    task_mixture: list = field(default_factory=list)
    context_length: int = 256
    validation_fraction: float = 0.05  # of documents (files for the stdlib corpus)
    max_documents: int | None = None  # use only the first N documents (quick runs)
    cache_dir: str | None = None  # packed-data cache (default: $HYBRIDZOO_CACHE or ~/.cache/hybridzoo)


@dataclass
class TokenizerSection:
    path: str | None = None  # any AutoTokenizer path; None trains a byte-level BPE on the training text
    vocab_size: int = 2048  # of the trained BPE


@dataclass
class TrainSection:
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 8  # rows per process per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16
    gradient_checkpointing: bool = False
    seed: int = 0


@dataclass
class EvalSection:
    every: int = 100  # optimizer steps; 0 evaluates only at the end
    batches: int = 8


@dataclass
class CheckpointSection:
    every: int = 100  # optimizer steps; 0 writes no intermediate checkpoints
    keep: int = 2  # newest checkpoints kept


@dataclass
class PeftSection:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list | None = None  # None: defaults per block type (recipes/peft_utils.py)
    include_mlp: bool = True


@dataclass
class DistillSection:
    """`kind: distill` only: which attention layers of the teacher (`model.from_pretrained`) become Gated DeltaNet or
    Mamba-2 layers, and the two stages (recipes/distillation.py). `train` holds the logit-distillation stage's optimizer
    settings."""

    # which layers are replaced: exactly one of the three
    student_pattern: str | None = None  # e.g. GGGA or DDDA, repeated over the depth: A the teacher's attention kept,
    # G replaced by Gated DeltaNet, D by Mamba-2 (HybridConfig's letters; mixed, e.g. GDGA, is fine)
    replace_layers: list | None = None  # explicit layer indices to replace
    student_block: str | None = None  # replace_layers / select only: gated_deltanet (None: the default) | mamba2
    select: str | None = None  # "kl": align every attention layer, keep the `keep_attention` whose swap costs most KL
    keep_attention: int = 2  # select only
    select_batches: int = 4  # select only: training micro-batches the KL of each swap is measured on
    conv_init: str = "identity"  # identity (the conv starts as a pass-through) | fresh (the block's own init)
    # stage 1: per-layer alignment of each new mixer's output to the teacher attention's (MSE), teacher inputs
    align_steps: int = 100
    align_lr: float = 3.0e-3
    align_warmup_steps: int = 10
    # stage 2: end-to-end logit distillation, KL(teacher || student) at `temperature` (+ `ce_weight` * next-token CE)
    temperature: float = 2.0
    ce_weight: float = 0.0
    freeze: list = field(default_factory=list)  # stage 2 (full, not LoRA): embeddings, mlp, norms, attention
    # the same hybrid trained from scratch on as many tokens as both stages together (the report's baseline)
    scratch: bool = True
    scratch_lr: float = 3.0e-3  # warm-up: a tenth of its steps
    # the report
    report: bool = True
    eval_rows: int = 256  # held-out rows for the losses (at most; all of them when fewer)
    decode_lengths: list = field(default_factory=lambda: [1024, 16384])
    decode_tokens: int = 16
    retrieval_examples: int = 100
    mqar_slices: list = field(default_factory=lambda: [[64, 4], [128, 8], [256, 16]])  # [length, kv pairs]
    needle_lengths: list = field(default_factory=lambda: [128, 256])  # text-level needle tasks, words


@dataclass
class Recipe:
    output_dir: str
    kind: str = "train"  # train (`hybridzoo train`) | distill (`hybridzoo distill`: model.from_pretrained teaches)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    peft: PeftSection = field(default_factory=PeftSection)
    distill: DistillSection = field(default_factory=DistillSection)
    description: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RecipeRun:
    """What `hybridzoo train` / `hybridzoo distill` and `hybridzoo.recipes.train` / `distill` take: the recipe, its
    overrides (the recipe's own keys, above) and whether to resume."""

    recipe: str | Path | dict | Recipe = setting(help="a recipe YAML file, or a shipped recipe name (recipes/*.yaml); "
                                                 "in Python also a dict or a Recipe", positional=True)
    overrides: list[str] | dict | None = setting(None, "dotted key=value overrides of the recipe keys, e.g. "
                                                 "train.max_steps=100 (in Python also a dict)", positional=True,
                                                 metavar="KEY=VALUE")
    resume: bool = setting(False, "continue from the newest complete checkpoint")


def apply_overrides(values: dict, overrides: list[str] | dict | None) -> dict:
    """`["train.lr=3e-4", "model.zoo=lstm"]` (or a dict of dotted keys) applied to a nested dict; values are YAML."""
    if not overrides:
        return values
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        parsed = []
        for text in overrides:
            if "=" not in text:
                raise RecipeError(f"override {text!r}: write it as key=value, e.g. train.max_steps=100.")
            key, raw = text.split("=", 1)
            parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
        items = parsed
    for key, value in items:
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {key}: {part} is not a section.")
        node[parts[-1]] = value
    return values


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe file path, or the name of a shipped recipe (`pretrain_stdlib`)."""
    path = Path(recipe)
    if path.exists():
        return path
    shipped = RECIPE_DIR / f"{Path(recipe).stem}.yaml"
    if shipped.exists():
        return shipped
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
    raise RecipeError(f"recipe {str(recipe)!r} not found; pass a YAML path or one of the shipped recipes: {names}.")


def load_recipe(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None) -> Recipe:
    """Read, override and validate a recipe (a path, a shipped recipe name, a dict or a `Recipe`)."""
    if isinstance(recipe, Recipe):
        values = recipe.to_dict()
    elif isinstance(recipe, dict):
        values = dict(recipe)
    else:
        values = yaml.safe_load(resolve_recipe_path(recipe).read_text()) or {}
    values = apply_overrides(values, overrides)
    result = build(Recipe, values, aliases=ALIASES, error=RecipeError)
    validate(result)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# validation of values and of the combinations of keys


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise RecipeError(f"{key}: {message}")


def validate(recipe: Recipe) -> None:
    """Raise `RecipeError` on the first impossible value."""
    from hybridzoo.configs.zoo import ARCHITECTURES, SIZES  # local: the zoo pulls in the model code

    m, d, t, tr = recipe.model, recipe.data, recipe.tokenizer, recipe.train
    _check(bool(recipe.output_dir), "output_dir", "set an output folder, e.g. output_dir: outputs/my-run.")
    _check((m.zoo is None) != (m.from_pretrained is None), "model.zoo",
           "set exactly one of model.zoo (a zoo architecture) and model.from_pretrained (a saved model folder).")
    if m.zoo is not None:
        _check(m.zoo in ARCHITECTURES, "model.zoo", f"unknown architecture {m.zoo!r}; choose one of "
               f"{', '.join(ARCHITECTURES)}.")
        _check(m.size in SIZES, "model.size", f"unknown size {m.size!r}; choose one of {', '.join(SIZES)}.")
    if m.from_pretrained is not None:
        _check(Path(m.from_pretrained).is_dir(), "model.from_pretrained",
               f"{m.from_pretrained!r} is not a folder; train one first (e.g. the pretrain_stdlib recipe) or fix the "
               "path.")
    _check(m.head in ("causal_lm", "sequence_classification"), "model.head",
           "use causal_lm or sequence_classification.")
    _check(m.num_labels >= 2, "model.num_labels", "a classifier needs at least 2 labels.")

    sources = ("stdlib", "files", "dataset", "task", "stdlib_shuffled_lines")
    _check(d.source in sources, "data.source", f"choose one of {', '.join(sources)}.")
    if d.source == "files":
        _check(bool(d.paths), "data.paths", "list the .txt/.jsonl/.parquet files or folders to read.")
        for path in d.paths:
            _check(Path(path).exists(), "data.paths", f"{path!r} does not exist.")
    _check(d.source != "dataset" or bool(d.dataset), "data.dataset", "name a `datasets` dataset or local path.")
    _check(d.source != "task" or bool(d.task), "data.task", "name a task generator, e.g. data.task: mqar.")
    _check(not d.task_mixture or d.source == "task", "data.task_mixture", "mixes task slices; set data.source: task.")
    _check(all(isinstance(entry, dict) and type(entry.get("weight", 1)) is int and entry.get("weight", 1) >= 1
               for entry in d.task_mixture), "data.task_mixture",
           "list mappings of task parameters, each with an optional integer weight >= 1, e.g. "
           "[{seq_len: 64, num_kv_pairs: 4, weight: 2}].")
    if m.head == "sequence_classification":
        _check(d.source in ("files", "dataset", "stdlib_shuffled_lines"), "data.source",
               "a classifier needs labelled data: files or dataset (with data.label_field), or stdlib_shuffled_lines.")
    _check(d.source != "stdlib_shuffled_lines" or m.head == "sequence_classification", "model.head",
           "stdlib_shuffled_lines is classification data; set model.head: sequence_classification.")
    _check(d.source != "task" or m.head == "causal_lm", "model.head", "task data trains a causal_lm head.")
    _check(d.context_length >= 8, "data.context_length", "use at least 8 tokens.")
    _check(0 < d.validation_fraction < 0.5, "data.validation_fraction", "use a fraction in (0, 0.5), e.g. 0.05.")
    _check(d.max_documents is None or d.max_documents >= 2, "data.max_documents",
           "keep at least 2 documents (train and validation), or null for all.")
    _check(t.vocab_size >= 300, "tokenizer.vocab_size", "a byte-level BPE needs at least 300 (256 bytes + merges).")
    _check(t.path is None or Path(t.path).exists() or "/" in t.path, "tokenizer.path",
           f"{t.path!r} is neither a local folder nor a hub id (org/name).")

    _check(tr.max_steps >= 1, "train.max_steps", "train for at least 1 step.")
    _check(tr.micro_batch_size >= 1, "train.micro_batch_size", "use at least 1.")
    _check(tr.grad_accum >= 1, "train.grad_accum", "use at least 1 (no accumulation).")
    _check(tr.lr > 0, "train.lr", "the learning rate must be positive, e.g. 1e-3.")
    _check(0 <= tr.min_lr_ratio <= 1, "train.min_lr_ratio", "use a ratio in [0, 1].")
    _check(0 <= tr.warmup_steps < tr.max_steps, "train.warmup_steps",
           f"warm-up must be shorter than train.max_steps ({tr.max_steps}).")
    _check(tr.weight_decay >= 0, "train.weight_decay", "use a non-negative value.")
    _check(len(tr.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in tr.betas), "train.betas",
           "give two numbers in [0, 1), e.g. [0.9, 0.95].")
    _check(tr.grad_clip >= 0, "train.grad_clip", "use 0 (off) or a positive norm.")
    _check(tr.precision in ("fp32", "bf16"), "train.precision", "use fp32 or bf16.")
    _check(tr.seed >= 0, "train.seed", "use a non-negative integer.")
    _check(recipe.eval.every >= 0, "eval.every", "use 0 (only at the end) or a positive step interval.")
    _check(recipe.eval.batches >= 1, "eval.batches", "evaluate at least 1 batch.")
    _check(recipe.checkpoint.every >= 0, "checkpoint.every", "use 0 (none) or a positive step interval.")
    _check(recipe.checkpoint.keep >= 1, "checkpoint.keep", "keep at least 1 checkpoint.")
    p = recipe.peft
    _check(p.r >= 1, "peft.r", "the LoRA rank must be at least 1.")
    _check(p.alpha > 0, "peft.alpha", "use a positive LoRA alpha (often 2 * r).")
    _check(0 <= p.dropout < 1, "peft.dropout", "use a dropout in [0, 1).")
    _check(p.target_modules is None or all(isinstance(x, str) for x in p.target_modules), "peft.target_modules",
           "list module name suffixes, e.g. [mixer.q_proj, mlp.up_proj], or null for the per-block defaults.")
    _check(not p.enabled or m.from_pretrained is not None, "peft.enabled",
           "LoRA fine-tunes a saved model: set model.from_pretrained (and drop model.zoo).")
    _check(recipe.kind in ("train", "distill"), "kind", "use train (hybridzoo train) or distill (hybridzoo distill).")
    if recipe.kind == "distill":
        validate_distill(recipe)


FREEZABLE = ("embeddings", "mlp", "norms", "attention")


def validate_distill(recipe: Recipe) -> None:
    """A distill recipe: a saved causal LM teaches on text, one way of choosing layers, sane stage settings."""
    m, d, s = recipe.model, recipe.data, recipe.distill
    _check(m.from_pretrained is not None, "model.from_pretrained",
           "a distill recipe starts from a teacher: set model.from_pretrained to a saved causal LM folder (e.g. "
           "the output of `hybridzoo train pretrain_stdlib model.zoo=transformer`) and drop model.zoo.")
    _check(m.head == "causal_lm", "model.head", "distillation trains a causal_lm student.")
    _check(d.source in ("stdlib", "files", "dataset"), "data.source",
           "distillation reads text: use stdlib, files or dataset (the teacher's tokenizer is used).")
    chosen = [name for name in ("student_pattern", "replace_layers", "select") if getattr(s, name) is not None]
    _check(len(chosen) == 1, "distill.student_pattern",
           f"choose the replaced layers one way, got {chosen or 'none'}: distill.student_pattern (e.g. GGGA), "
           "distill.replace_layers (e.g. [0, 1, 2]) or distill.select: kl (only one of them).")
    if s.student_pattern is not None:
        _check(bool(s.student_pattern) and set(s.student_pattern) <= {"G", "D", "A"}, "distill.student_pattern",
               f"{s.student_pattern!r}: use the letters G (replace by Gated DeltaNet), D (replace by Mamba-2) and A "
               "(keep attention).")
        _check(s.student_block is None, "distill.student_block",
               f"with distill.student_pattern the letters choose the new blocks (G Gated DeltaNet, D Mamba-2); drop "
               f"student_block={s.student_block!r} or write it into the pattern (e.g. DDDA).")
    _check(s.student_block in (None, "gated_deltanet", "mamba2"), "distill.student_block",
           f"{s.student_block!r}: use gated_deltanet or mamba2 (the blocks a teacher's attention weights initialise).")
    if s.replace_layers is not None:
        _check(bool(s.replace_layers) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in s.replace_layers), "distill.replace_layers",
               "list layer indices (0-based), e.g. [0, 1, 2, 4, 5, 6].")
    if s.select is not None:
        _check(s.select == "kl", "distill.select", "the measured criterion is kl (see recipes/distillation.py).")
        _check(s.keep_attention >= 0, "distill.keep_attention", "keep 0 or more attention layers.")
        _check(s.select_batches >= 1, "distill.select_batches", "measure on at least 1 batch.")
    _check(s.conv_init in ("identity", "fresh"), "distill.conv_init", "use identity or fresh.")
    _check(s.align_steps >= 0, "distill.align_steps", "use 0 (no alignment stage) or more steps.")
    _check(s.align_lr > 0, "distill.align_lr", "the learning rate must be positive, e.g. 3e-3.")
    _check(s.align_steps == 0 or 0 <= s.align_warmup_steps < s.align_steps, "distill.align_warmup_steps",
           f"warm-up must be shorter than distill.align_steps ({s.align_steps}).")
    _check(s.temperature > 0, "distill.temperature", "use a positive temperature, e.g. 2.0.")
    _check(s.ce_weight >= 0, "distill.ce_weight", "use a non-negative weight (0: pure distillation).")
    unknown = [name for name in s.freeze if name not in FREEZABLE]
    _check(not unknown, "distill.freeze", f"unknown parts {unknown}; choose from {', '.join(FREEZABLE)}.")
    _check(not (s.freeze and recipe.peft.enabled), "distill.freeze",
           "LoRA (peft.enabled) already freezes every base weight; leave distill.freeze empty.")
    _check(s.scratch_lr > 0, "distill.scratch_lr", "the learning rate must be positive, e.g. 3e-3.")
    _check(s.eval_rows >= 1, "distill.eval_rows", "evaluate at least 1 held-out row.")
    _check(all(isinstance(n, int) and n >= 1 for n in s.decode_lengths), "distill.decode_lengths",
           "list context lengths, e.g. [1024, 16384], or [] to skip decode timing.")
    _check(s.decode_tokens >= 1, "distill.decode_tokens", "time at least 1 decoded token.")
    _check(s.retrieval_examples >= 0, "distill.retrieval_examples", "use 0 (skip retrieval) or more examples.")
    _check(all(isinstance(x, list) and len(x) == 2 and all(isinstance(v, int) and v > 0 for v in x)
               for x in s.mqar_slices), "distill.mqar_slices", "list [length, kv pairs] pairs, e.g. [[64, 4]].")
    _check(all(isinstance(n, int) and n > 0 for n in s.needle_lengths), "distill.needle_lengths",
           "list lengths in words, e.g. [128, 256].")

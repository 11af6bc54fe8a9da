"""The training loop: one recipe, one process or many (`accelerate launch`), checkpoints that survive a kill.

Read top to bottom: build the model, prepare the data, then for every optimizer step run `grad_accum` micro-batches,
clip, step, log, evaluate and checkpoint. What a micro-batch's loss is, and which weights train, comes from an
objective (`LanguageModelLoss` by default: the model's own loss; distillation plugs in its stages, see
recipes/distillation.py). The learning rate follows transformers' `get_cosine_with_min_lr_schedule_with_warmup`: linear
warm-up from 0 (so the first step has lr 0) to `train.lr` over `warmup_steps`, then a cosine down to
`lr * min_lr_ratio` at `max_steps`.

Checkpoints are accelerate's `save_state` (weights in safetensors, optimizer, every rank's RNG, and the objects
registered for checkpointing: the schedule, the loop's progress, ParaRNN Newton counters), written into a temporary
folder that is renamed into place, so a kill at any moment leaves the previous one intact; `resume=True` continues
from the newest complete one (`load_state`) and, on CPU, reaches exactly the weights of an uninterrupted run (same
data positions, RNG states, optimizer and schedule).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from hybridzoo.recipes.data import PreparedData, prepare_data
from hybridzoo.recipes.recipe import Recipe, RecipeError, load_recipe

CHECKPOINT_PREFIX = "step-"
CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the newest checkpoint on disk is the last good state."""


# ---------------------------------------------------------------------------------------------------------------------
# model and schedule


def build_model(recipe: Recipe, vocab_size: int, tokenizer):
    from hybridzoo import HybridForCausalLM, HybridForSequenceClassification  # registers the Auto classes
    from hybridzoo.configs.zoo import zoo_config

    m = recipe.model
    model_class = HybridForSequenceClassification if m.head == "sequence_classification" else HybridForCausalLM
    extra = {"num_labels": m.num_labels} if m.head == "sequence_classification" else {}
    if m.from_pretrained:
        model = model_class.from_pretrained(m.from_pretrained, **extra)
        if model.config.vocab_size < vocab_size:
            raise ValueError(f"model.from_pretrained: the model has {model.config.vocab_size} tokens but the "
                             f"tokenizer has {vocab_size}; use the model's own tokenizer (tokenizer.path: null).")
    else:
        special = {}
        if tokenizer is not None:
            special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
        config = zoo_config(m.zoo, m.size, **{"vocab_size": vocab_size, **special, **extra, **m.overrides})
        model = model_class(config)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_optimizer(trainable: list[torch.nn.Parameter], train, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases, gate parameters).

    `fused`: torch's single-kernel update (CPU and CUDA) instead of a dozen whole-tensor passes with their temporaries
    per step: the same update within float32 rounding, and 0.86x / 0.95x the training step time of the zoo's small
    qwen3-next-style at T = 512 / 2048 on 2 CPU threads (`benchmarks/RESULTS.md`)."""
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=train.lr, betas=tuple(train.betas),
                             fused=fused)


def learning_rate_schedule(optimizer, train) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' warm-up + cosine: lr rises linearly from 0 over `warmup_steps`, then falls as a cosine to
    `lr * min_lr_ratio` at `max_steps`."""
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=train.warmup_steps,
                                                       num_training_steps=train.max_steps,
                                                       min_lr_rate=train.min_lr_ratio)


def model_output(model, batch: dict, head: str):
    """The model's output with its own loss on a micro-batch (labels in transformers' convention: a causal LM shifts
    them itself). In training a causal LM computes it by its fused chunked LM head + cross-entropy and returns no
    logits; in eval mode it returns the logits too."""
    if head == "sequence_classification":
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), labels=batch["labels"],
                 use_cache=False)


def compute_loss(model, batch: dict, head: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, correct predictions, counted predictions) of one micro-batch, for evaluation (`model.eval()`, so
    that the model returns the logits the accuracy is counted from)."""
    out = model_output(model, batch, head)
    if head == "sequence_classification":
        correct = (out.logits.argmax(-1) == batch["labels"]).sum()
        return out.loss, correct, torch.tensor(len(batch["labels"]))
    # the output at t predicts label t + 1
    predictions, labels = out.logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
    counted = labels != -100
    return out.loss, ((predictions == labels) & counted).sum(), counted.sum()


class LanguageModelLoss:
    """The default objective: the model's own next-token (or classification) loss; every weight trains.

    An objective is what the loop asks for a micro-batch's loss. `setup` runs once on the built model (and its LoRA
    wrapper), before the optimizer collects the trainable weights: an objective may freeze weights there, or move
    what it needs (a teacher) to the device. `__call__` returns the mean loss. Objectives hold no state of their own
    that training changes, so checkpoints need nothing from them.
    """

    name = "lm"

    def setup(self, model, accelerator) -> None:
        pass

    def __call__(self, model, batch: dict, head: str) -> torch.Tensor:
        return model_output(model, batch, head).loss


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints


@dataclasses.dataclass
class Progress:
    """Where the run is: optimizer steps, micro-batches per process, tokens over all processes, seconds in the loop
    (over every resume). Saved with each checkpoint (`register_for_checkpointing`)."""

    step: int = 0
    micro_batches: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


class NewtonCounts:
    """The Newton iterations of the model's ParaRNN blocks (their `newton_totals`) during training: saved with each
    checkpoint, so a resumed run reports the whole run's, and set back after evaluation, which is not training."""

    def __init__(self, model) -> None:
        self.blocks = [module for module in model.modules() if hasattr(module, "newton_totals")]

    def state_dict(self) -> dict:
        return {"totals": [dict(block.newton_totals) for block in self.blocks]}

    def load_state_dict(self, state: dict) -> None:
        for block, totals in zip(self.blocks, state["totals"], strict=True):
            block.newton_totals = dict(totals)

    def summary(self) -> dict:
        """Mean and max iterations per solve, fallbacks and solves over every block; {} without ParaRNN blocks."""
        totals = [block.newton_totals for block in self.blocks if block.newton_totals["solves"]]
        if not totals:
            return {}
        solves = sum(t["solves"] for t in totals)
        return {"newton_mean_iterations": sum(t["iterations"] for t in totals) / solves,
                "newton_max_iterations": max(t["max_iterations"] for t in totals),
                "newton_fallbacks": sum(t["fallbacks"] for t in totals),
                "newton_solves": solves}


# the last object registered for checkpointing, so its file is the last one `save_state` writes
PROGRESS_FILE = "custom_checkpoint_2.pkl"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder gets its `step-N` name only once everything is in it (and loses
    it before it is deleted); the progress file, written last, is checked too, so a folder copied or cut short by
    hand is passed over."""
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()
             and (p / PROGRESS_FILE).exists()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def _delete(folder: Path) -> None:
    """Take the folder's checkpoint name away in one rename, then delete it (a kill midway leaves no half folder
    under a checkpoint name)."""
    trash = folder.with_name(f".deleting-{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def save_checkpoint(accelerator, step: int, output_dir: Path, keep: int) -> Path:
    """`accelerator.save_state` into `.tmp-step-N`, renamed to `step-N` once every rank has written its part; then
    only the newest `keep` are kept.

    accelerate's own naming and pruning (`ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=...)`)
    would write straight into the final folder and delete the oldest checkpoint *before* writing the new one, so a
    kill during the save could leave no complete checkpoint (with `keep: 1`) and `load_state()` would pick the
    partial folder; hence the explicit folders here.
    """
    folder = output_dir / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        for stale in folder.glob(".*"):  # left by a run killed while saving or deleting
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)  # every rank: its RNG state (and shards, with FSDP)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            _delete(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            _delete(old)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------------------------
# logging


class MetricsLog:
    """metrics.jsonl, written by the main process only, and the same numbers to accelerate's TensorBoard tracker when
    tensorboard is installed (`output_dir/tensorboard`, set up in `train`)."""

    def __init__(self, accelerator, output_dir: Path, resume_step: int) -> None:
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.path = output_dir / "metrics.jsonl"
        if self.enabled and self.path.exists():  # after a resume, drop lines past the checkpoint: no duplicate points
            lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in lines))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=record["step"])  # a no-op without trackers


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    from hybridzoo.evaluation.plots import plt, save_png  # matplotlib on the Agg backend, imported only to plot

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    validation = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    figure, axis = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train"), (validation, "validation")):
        if points:
            axis.plot(*zip(*points, strict=True), label=label, marker="o" if label == "validation" else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (nats/token)")
    axis.legend()
    save_png(figure, png_path)


# ---------------------------------------------------------------------------------------------------------------------
# the loop


@torch.no_grad()
def evaluate(accelerator, model, data: PreparedData, recipe: Recipe, objective=None, newton=None) -> dict:
    """Held-out loss and accuracy of the model itself; with another objective, also its loss (`val_<name>`).
    `newton`: the run's `NewtonCounts`, set back afterwards so they count training only."""
    model.eval()
    counts = newton.state_dict() if newton is not None else None
    totals = torch.zeros(4)  # loss sum, correct, counted, objective loss sum
    extra = objective is not None and not isinstance(objective, LanguageModelLoss)
    for index in range(accelerator.process_index, recipe.eval.batches, accelerator.num_processes):
        batch = {k: v.to(accelerator.device) for k, v in
                 data.validation.fixed_batch(index, recipe.train.micro_batch_size).items()}
        with accelerator.autocast():
            loss, correct, counted = compute_loss(model, batch, recipe.model.head)
            objective_loss = objective(model, batch, recipe.model.head) if extra else torch.zeros(())
        totals += torch.stack([loss.float().cpu() * counted.cpu(), correct.float().cpu(), counted.float().cpu(),
                               objective_loss.float().cpu() * counted.cpu()])
    totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
    if counts is not None:
        newton.load_state_dict(counts)
    model.train()
    counted = max(float(totals[2]), 1.0)
    result = {"val_loss": float(totals[0]) / counted, "val_accuracy": float(totals[1]) / counted}
    if extra:
        result[f"val_{objective.name}"] = float(totals[3]) / counted
    return result


def train(recipe: str | Path | dict | Recipe, overrides: list[str] | dict | None = None, resume: bool = False,
          objective=None) -> dict:
    """Run a recipe to the end; returns a summary (also in `output_dir/summary.json`).

    `objective` (default `LanguageModelLoss()`) gives each micro-batch's loss and may freeze weights first.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, is_tensorboard_available, set_seed

    recipe = load_recipe(recipe, overrides)
    if recipe.kind != "train":
        raise RecipeError(f"kind: this is a {recipe.kind} recipe; run it with `hybridzoo {recipe.kind}` "
                          f"(Python: hybridzoo.recipes.{recipe.kind}).")
    objective = objective or LanguageModelLoss()
    output_dir = Path(recipe.output_dir)
    precision = {"fp32": "no", "bf16": "bf16"}[recipe.train.precision]
    # cpu=True when there is no GPU: the only way `accelerate launch --multi_gpu` gives real (gloo) DDP on CPU
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                              log_with="tensorboard" if is_tensorboard_available() else None,
                              project_dir=str(output_dir))
    main = accelerator.is_main_process
    log = (lambda message: print(message, flush=True)) if main else (lambda message: None)
    set_seed(recipe.train.seed)

    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / ".recipe.yaml.tmp"
        tmp.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        os.replace(tmp, output_dir / "recipe.yaml")
    # the main process tokenizes and fills the cache first, so the others only read it
    with accelerator.main_process_first():
        data = prepare_data(recipe, log=log)
    log(f"data: {data.description}")

    model = build_model(recipe, data.vocab_size, data.tokenizer)
    if recipe.peft.enabled:
        from hybridzoo.recipes.peft_utils import apply_lora, lora_config

        p = recipe.peft
        task_type = "SEQ_CLS" if recipe.model.head == "sequence_classification" else "CAUSAL_LM"
        modules_to_save = ["score"] if recipe.model.head == "sequence_classification" else None
        config = lora_config(model, p.r, p.alpha, p.dropout, p.target_modules, p.include_mlp, modules_to_save,
                             task_type)
        model = apply_lora(model, config)
    objective.setup(model, accelerator)
    trainable = [param for param in model.parameters() if param.requires_grad]
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"({sum(p.numel() for p in trainable) / 1e6:.3f}M trainable), blocks {model.config.block_types}")

    t = recipe.train
    # FSDP keeps torch's default update: its sharded parameters are not tested with the fused kernel here
    optimizer = build_optimizer(trainable, t, fused=accelerator.distributed_type != DistributedType.FSDP)
    scheduler = learning_rate_schedule(optimizer, t)
    model, optimizer = accelerator.prepare(model, optimizer)
    # the scheduler stays outside `prepare` (accelerate would step it once per process) and is checkpointed as a
    # registered object, with the loop's progress (registered last: see PROGRESS_FILE)
    progress, newton = Progress(), NewtonCounts(model)
    accelerator.register_for_checkpointing(scheduler, newton, progress)

    checkpoints = list_checkpoints(output_dir)
    if resume and checkpoints:
        accelerator.load_state(str(checkpoints[-1]))
        log(f"resumed from {checkpoints[-1]} (step {progress.step})")
    elif resume:
        log("resume: no checkpoint found, starting from scratch")
    if accelerator.log_with:
        accelerator.init_trackers("tensorboard")  # writes to output_dir/tensorboard
    metrics = MetricsLog(accelerator, output_dir, progress.step)

    world, rank, batch_size = accelerator.num_processes, accelerator.process_index, t.micro_batch_size
    model.train()
    # only the main process shows progress; there TQDM_DISABLE=1 still turns it off
    hidden = {} if main else {"disable": True}
    bar = tqdm(total=t.max_steps, initial=progress.step, desc="train", unit="step", **hidden)
    start, start_tokens, start_seconds, last_eval = time.perf_counter(), progress.tokens, progress.seconds, {}
    while progress.step < t.max_steps:
        losses = []
        for micro in range(t.grad_accum):
            # global sample position of this rank's micro-batch: ranks read disjoint slices of the same stream
            position = (progress.micro_batches * world + rank) * batch_size
            batch = {k: v.to(accelerator.device) for k, v in data.train.batch(position, batch_size).items()}
            sync = micro == t.grad_accum - 1
            # no gradient all-reduce until the last micro-batch of the step
            with accelerator.no_sync(model) if not sync else nullcontext(), accelerator.autocast():
                loss = objective(model, batch, recipe.model.head)
                accelerator.backward(loss / t.grad_accum)
            losses.append(loss.detach().float())
            progress.micro_batches += 1
            progress.tokens += batch["input_ids"].numel() * world
        step_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        if not math.isfinite(step_loss):
            newest = list_checkpoints(output_dir)
            kept = f"the last good checkpoint is {newest[-1]}" if newest else "no checkpoint was written yet"
            bar.close()
            raise TrainingDiverged(
                f"loss is {step_loss} at step {progress.step + 1}; stopped before updating the weights ({kept}). "
                "Lower train.lr, raise train.warmup_steps, or use train.precision: fp32.")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 else None
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1

        elapsed = time.perf_counter() - start
        tokens_per_second = (progress.tokens - start_tokens) / max(elapsed, 1e-9)
        record = {"step": progress.step, "loss": step_loss, "lr": lr, "tokens": progress.tokens,
                  "tokens_per_second": round(tokens_per_second, 1)}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        last_step = progress.step == t.max_steps
        if (recipe.eval.every and progress.step % recipe.eval.every == 0) or last_step:
            last_eval = evaluate(accelerator, model, data, recipe, objective, newton)
            record.update(last_eval)
        metrics.write(record)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_second:.0f}")
        bar.update(1)
        progress.seconds = start_seconds + time.perf_counter() - start
        if recipe.checkpoint.every and progress.step % recipe.checkpoint.every == 0 and not last_step:
            save_checkpoint(accelerator, progress.step, output_dir, recipe.checkpoint.keep)
    bar.close()

    summary = save_final(accelerator, model, data, recipe, progress, {**last_eval, **newton.summary()})
    accelerator.end_training()
    return summary


def save_final(accelerator, model, data: PreparedData, recipe: Recipe, progress: Progress, results: dict) -> dict:
    """save_pretrained (safetensors + remote code) and the tokenizer; LoRA runs also keep the adapter alone. The
    weights come from `accelerator.get_state_dict`, called on every rank: it gathers sharded (FSDP, ZeRO-3) weights."""
    output_dir = Path(recipe.output_dir)
    accelerator.wait_for_everyone()
    summary = {"steps": progress.step, "tokens": progress.tokens, "seconds": round(progress.seconds, 3), **results,
               "output_dir": str(output_dir)}
    state_dict = None if recipe.peft.enabled else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if recipe.peft.enabled:
            final.save_pretrained(output_dir / "adapter")
            final = final.merge_and_unload()
        final.save_pretrained(output_dir, state_dict=state_dict)
        if data.tokenizer is not None:
            data.tokenizer.save_pretrained(output_dir)
        plot_loss_curve(output_dir / "metrics.jsonl", output_dir / "loss_curve.png")
        tmp = output_dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, output_dir / "summary.json")
        saved = "model, tokenizer" if data.tokenizer is not None else "model"
        print(f"saved: {output_dir} ({saved}, metrics.jsonl, loss_curve.png)", flush=True)
    accelerator.wait_for_everyone()
    return summary

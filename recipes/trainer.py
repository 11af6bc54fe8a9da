"""The training loop: one recipe, one process or many (`accelerate launch`), checkpoints that survive a kill.

Read top to bottom: build the model, prepare the data, then for every optimizer step run `grad_accum` micro-batches,
clip, step, log, evaluate and checkpoint. What a micro-batch's loss is, and which weights train, comes from an
objective (`LanguageModelLoss` by default; distillation plugs in its stages, see recipes/distill.py).

A checkpoint is written into a temporary folder and renamed into place, so a kill at any moment leaves the previous
one intact; `resume=True` continues from the newest complete one and, on CPU, reaches exactly the weights of an
uninterrupted run (same data positions, RNG states, optimizer and schedule).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from hybridzoo.recipes.data import PreparedData, prepare_data
from hybridzoo.recipes.recipe import Recipe, RecipeError, load_recipe

CHECKPOINT_PREFIX = "step-"


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


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def compute_loss(model, batch: dict, head: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, correct predictions, counted predictions) of one micro-batch."""
    if head == "sequence_classification":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        correct = (out.logits.argmax(-1) == batch["labels"]).sum()
        return out.loss, correct, torch.tensor(len(batch["labels"]))
    logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), use_cache=False).logits
    # labels follow transformers' convention (labels == input_ids): the output at t predicts label t + 1
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100)
    counted = labels != -100
    correct = ((logits.argmax(-1) == labels) & counted).sum()
    return loss, correct, counted.sum()


class LanguageModelLoss:
    """The default objective: the model's own next-token (or classification) loss; every weight trains.

    An objective is what the loop asks for a micro-batch's loss. `setup` runs once on the built model (and its LoRA
    wrapper), before the optimizer collects the trainable weights: an objective may freeze weights there, or move
    what it needs (a teacher) to the device. `__call__` returns (mean loss, correct predictions, counted
    predictions). Objectives hold no state of their own that training changes, so checkpoints need nothing from them.
    """

    name = "lm"

    def setup(self, model, accelerator) -> None:
        pass

    def __call__(self, model, batch: dict, head: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return compute_loss(model, batch, head)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name once everything is in it)."""
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _rng_state() -> dict:
    import random

    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict, output_dir: Path, keep: int) -> Path:
    folder = output_dir / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{state['step']}"
    tmp = folder / f".tmp-{CHECKPOINT_PREFIX}{state['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")  # every rank has its own RNG
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(accelerator.unwrap_model(model).state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(state))  # written last: marks the folder complete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, model, optimizer, scheduler, folder: Path) -> dict:
    accelerator.unwrap_model(model).load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng_file = folder / f"rng-{accelerator.process_index}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((folder / "state.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# logging


class MetricsLog:
    """metrics.jsonl (and TensorBoard when it is installed), written by the main process only."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.tensorboard = None
        if not enabled:
            return
        if self.path.exists():  # after a resume, drop lines past the checkpoint so the curve has no duplicates
            lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in lines))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_loss_curve(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    figure.tight_layout()
    tmp = png_path.with_name(".tmp-" + png_path.name)
    figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    os.replace(tmp, png_path)


# ---------------------------------------------------------------------------------------------------------------------
# the loop


@torch.no_grad()
def evaluate(accelerator, model, data: PreparedData, recipe: Recipe, objective=None) -> dict:
    """Held-out loss and accuracy of the model itself; with another objective, also its loss (`val_<name>`)."""
    model.eval()
    totals = torch.zeros(4)  # loss sum, correct, counted, objective loss sum
    extra = objective is not None and not isinstance(objective, LanguageModelLoss)
    for index in range(accelerator.process_index, recipe.eval.batches, accelerator.num_processes):
        batch = {k: v.to(accelerator.device) for k, v in
                 data.validation.fixed_batch(index, recipe.train.micro_batch_size).items()}
        with accelerator.autocast():
            loss, correct, counted = compute_loss(model, batch, recipe.model.head)
            objective_loss = objective(model, batch, recipe.model.head)[0] if extra else torch.zeros(())
        totals += torch.stack([loss.float() * counted, correct.float(), counted.float(),
                               objective_loss.float().cpu() * counted])
    totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
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
    from accelerate.utils import set_seed

    recipe = load_recipe(recipe, overrides)
    if recipe.kind != "train":
        raise RecipeError(f"kind: this is a {recipe.kind} recipe; run it with `hybridzoo {recipe.kind}` "
                          f"(Python: hybridzoo.recipes.{recipe.kind}).")
    objective = objective or LanguageModelLoss()
    output_dir = Path(recipe.output_dir)
    precision = {"fp32": "no", "bf16": "bf16"}[recipe.train.precision]
    # cpu=True when there is no GPU: the only way `accelerate launch --multi_gpu` gives real (gloo) DDP on CPU
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
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
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # norms, biases, gate parameters
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=tuple(t.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, t.warmup_steps, t.max_steps, t.min_lr_ratio))
    # the scheduler stays outside `prepare`: accelerate would step it once per process
    model, optimizer = accelerator.prepare(model, optimizer)

    state = {"step": 0, "micro_batches": 0, "tokens": 0}
    checkpoints = list_checkpoints(output_dir)
    if resume and checkpoints:
        state = load_checkpoint(accelerator, model, optimizer, scheduler, checkpoints[-1])
        log(f"resumed from {checkpoints[-1]} (step {state['step']})")
    elif resume:
        log("resume: no checkpoint found, starting from scratch")
    metrics = MetricsLog(output_dir, main, state["step"])

    world, rank, batch_size = accelerator.num_processes, accelerator.process_index, t.micro_batch_size
    model.train()
    progress = tqdm(total=t.max_steps, initial=state["step"], desc="train", unit="step", disable=not main)
    start, start_tokens, last_eval = time.perf_counter(), state["tokens"], {}
    while state["step"] < t.max_steps:
        losses = []
        for micro in range(t.grad_accum):
            # global sample position of this rank's micro-batch: ranks read disjoint slices of the same stream
            position = (state["micro_batches"] * world + rank) * batch_size
            batch = {k: v.to(accelerator.device) for k, v in data.train.batch(position, batch_size).items()}
            sync = micro == t.grad_accum - 1
            # no gradient all-reduce until the last micro-batch of the step
            with accelerator.no_sync(model) if not sync else nullcontext(), accelerator.autocast():
                loss, _, _ = objective(model, batch, recipe.model.head)
                accelerator.backward(loss / t.grad_accum)
            losses.append(loss.detach().float())
            state["micro_batches"] += 1
            state["tokens"] += batch["input_ids"].numel() * world
        step_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        if not math.isfinite(step_loss):
            newest = list_checkpoints(output_dir)
            kept = f"the last good checkpoint is {newest[-1]}" if newest else "no checkpoint was written yet"
            progress.close()
            raise TrainingDiverged(
                f"loss is {step_loss} at step {state['step'] + 1}; stopped before updating the weights ({kept}). "
                "Lower train.lr, raise train.warmup_steps, or use train.precision: fp32.")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1

        elapsed = time.perf_counter() - start
        tokens_per_second = (state["tokens"] - start_tokens) / max(elapsed, 1e-9)
        record = {"step": state["step"], "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                  "tokens": state["tokens"], "tokens_per_second": round(tokens_per_second, 1)}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        last_step = state["step"] == t.max_steps
        if (recipe.eval.every and state["step"] % recipe.eval.every == 0) or last_step:
            last_eval = evaluate(accelerator, model, data, recipe, objective)
            record.update(last_eval)
        metrics.write(record)
        progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_second:.0f}")
        progress.update(1)
        if recipe.checkpoint.every and state["step"] % recipe.checkpoint.every == 0 and not last_step:
            save_checkpoint(accelerator, model, optimizer, scheduler, state, output_dir, recipe.checkpoint.keep)
    progress.close()
    metrics.close()

    summary = save_final(accelerator, model, data, recipe, state, last_eval)
    accelerator.end_training()
    return summary


def save_final(accelerator, model, data: PreparedData, recipe: Recipe, state: dict, last_eval: dict) -> dict:
    """save_pretrained (safetensors + remote code) and the tokenizer; LoRA runs also keep the adapter alone."""
    output_dir = Path(recipe.output_dir)
    accelerator.wait_for_everyone()
    summary = {"steps": state["step"], "tokens": state["tokens"], **last_eval, "output_dir": str(output_dir)}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        if recipe.peft.enabled:
            final.save_pretrained(output_dir / "adapter")
            final = final.merge_and_unload()
        final.save_pretrained(output_dir)
        if data.tokenizer is not None:
            data.tokenizer.save_pretrained(output_dir)
        plot_loss_curve(output_dir / "metrics.jsonl", output_dir / "loss_curve.png")
        tmp = output_dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, output_dir / "summary.json")
        print(f"saved: {output_dir} (model, tokenizer, metrics.jsonl, loss_curve.png)", flush=True)
    accelerator.wait_for_everyone()
    return summary

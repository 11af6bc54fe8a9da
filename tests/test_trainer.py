"""The recipes' training loop itself: the model's own loss, transformers' schedule, accelerate checkpoints that survive
an interrupted save, and task data drawn by the one seed rule."""

import json
import math
import shutil
from types import SimpleNamespace

import accelerate.accelerator
import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file

from hybridzoo import HybridForCausalLM
from hybridzoo.configs.zoo import task_model_fields
from hybridzoo.data.tasks import make_task
from hybridzoo.recipes.data import pack_documents, prepare_data
from hybridzoo.recipes.recipe import RecipeError, load_recipe
from hybridzoo.recipes.trainer import (
    PROGRESS_FILE,
    LanguageModelLoss,
    build_model,
    build_optimizer,
    list_checkpoints,
    train,
)
from tiny_models import tiny_config

MQAR = {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4}


def task_recipe(output_dir, architecture: str = "paralstm-attention", **sections) -> dict:
    """A tiny MQAR recipe; the default model has a ParaRNN (Newton-solved) layer and an attention layer."""
    recipe = {
        "output_dir": str(output_dir),
        "model": {"zoo": architecture, "size": "tiny",
                  "overrides": task_model_fields(architecture, 32, vocab_size=64, longest=32)},
        "data": {"source": "task", "task": "mqar", "task_params": MQAR},
        "train": {"max_steps": 8, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 3,
                  "min_lr_ratio": 0.1},
        "eval": {"every": 4, "batches": 1},
        "checkpoint": {"every": 2, "keep": 2},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe[name], **values}
    return recipe


def metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_training_loss_is_the_models_own_and_equals_a_naive_shifted_cross_entropy(tmp_path):
    recipe = task_recipe(tmp_path / "run", "transformer", train={"max_steps": 1, "grad_accum": 1, "warmup_steps": 0},
                         checkpoint={"every": 0})
    train(recipe)
    logged = metrics(tmp_path / "run")[0]["loss"]

    # the same model and first batch, rebuilt; the loss by hand from the full logits (output t predicts label t + 1)
    resolved = load_recipe(recipe)
    set_seed(resolved.train.seed)
    data = prepare_data(resolved, log=lambda message: None)
    model = build_model(resolved, data.vocab_size, None)
    batch = data.train.batch(0, resolved.train.micro_batch_size)
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # only the answers are scored
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"]).logits
        naive = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                ignore_index=-100)
        model.train()
        fused = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
    assert fused.logits is None  # training took the fused LM head + cross-entropy: no logits were built
    assert logged == pytest.approx(naive.item(), rel=1e-5)


def test_language_model_loss_on_packed_documents_equals_a_naive_shift():
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config("GA"))
    documents = [torch.randint(3, 64, (n,)).tolist() for n in (5, 17, 9, 30)]
    batch = pack_documents(documents, 16, eos_id=2, pad_id=0)  # position_ids restart, first tokens unscored
    loss = LanguageModelLoss()(model.train(), batch, "causal_lm")
    with torch.no_grad():
        logits = model.eval()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    naive = F.cross_entropy(logits[:, :-1].reshape(-1, 64), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss.detach(), naive, rtol=1e-5, atol=1e-6)


def closed_form_lr(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up from 0, then a half cosine from lr to lr * min_ratio (transformers' documented schedule)."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / (total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_interrupted_save_leaves_the_previous_checkpoint_and_resume_is_bit_exact(tmp_path, monkeypatch, capsys):
    straight = train(task_recipe(tmp_path / "straight"))
    folder = tmp_path / "straight" / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp_path / "straight")] == ["step-4", "step-6"]  # keep: 2
    saved = {p.name for p in (folder / "step-6").iterdir()}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", PROGRESS_FILE} <= saved
    assert not any(name.endswith((".pt", ".bin")) and "model" in name for name in saved)  # weights: safetensors only
    records = metrics(tmp_path / "straight")
    # the rate each step used: transformers' schedule, against its closed form (step 1 has lr 0)
    assert [r["lr"] for r in records] == pytest.approx([closed_form_lr(s, 3e-3, 3, 8, 0.1) for s in range(8)])
    assert straight["newton_solves"] > 0 and straight["newton_mean_iterations"] >= 1

    # interrupted while saving step 6: the model, optimizer and RNG files are in the temporary folder, the rest not
    real_save = accelerate.accelerator.save_custom_state
    calls = []

    def interrupted(obj, path, index=0, **kwargs):
        calls.append(path)
        if len(calls) == 7:  # 3 registered objects per save: the first of the third save
            raise KeyboardInterrupt
        return real_save(obj, path, index, **kwargs)

    monkeypatch.setattr(accelerate.accelerator, "save_custom_state", interrupted)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(task_recipe(killed))
    monkeypatch.undo()
    partial = killed / "checkpoints" / ".tmp-step-6"
    assert (partial / "model.safetensors").exists() and not (partial / PROGRESS_FILE).exists()
    # and a checkpoint-named folder that is not complete (cut short by hand) is passed over as well
    (killed / "checkpoints" / "step-7").mkdir()
    shutil.copy(partial / "model.safetensors", killed / "checkpoints" / "step-7")
    assert [p.name for p in list_checkpoints(killed)] == ["step-2", "step-4"]

    capsys.readouterr()
    resumed = train(task_recipe(killed), resume=True)
    assert f"resumed from {killed / 'checkpoints' / 'step-4'} (step 4)" in capsys.readouterr().out
    expected, actual = load_file(tmp_path / "straight" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert [r["step"] for r in metrics(killed)] == list(range(1, 9))
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in records]
    # Newton counts are checkpointed with the run and leave evaluation out: the resumed run reports the whole run's
    assert {k: v for k, v in resumed.items() if k.startswith("newton_")} == \
        {k: v for k, v in straight.items() if k.startswith("newton_")}
    assert not partial.exists()  # the next save cleared the leftover


def test_task_mixture_takes_turns_and_batch_i_comes_from_seed_times_1000003_plus_i(tmp_path):
    slices = [{"seq_len": 16, "num_kv_pairs": 2, "weight": 2}, {"seq_len": 32, "num_kv_pairs": 4}]
    recipe = load_recipe(task_recipe(tmp_path, data={"task_params": {"vocab_size": 64}, "task_mixture": slices},
                                     train={"seed": 3}))
    data = prepare_data(recipe, log=lambda message: None)
    tasks = [make_task("mqar", vocab_size=64, seq_len=16, num_kv_pairs=2)] * 2 + \
        [make_task("mqar", vocab_size=64, seq_len=32, num_kv_pairs=4)]
    for i in range(6):
        seed = 3 * 1_000_003 + i
        expected = tasks[seed % 3].batch(4, seed=seed)
        batch = data.train.batch(i * 4, 4)
        assert torch.equal(batch["input_ids"], expected["input_ids"]) and torch.equal(batch["labels"],
                                                                                      expected["labels"])
    with pytest.raises(ValueError, match="not a multiple of the batch size"):
        data.train.batch(2, 4)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"task_mixture": [{"seq_len": 16, "weight": 0}]}, "data.task_mixture: list mappings of task parameters"),
        ({"task_mixture": [[16, 2]]}, "data.task_mixture: list mappings of task parameters"),
        ({"source": "stdlib", "task_mixture": [{"seq_len": 16}]}, "data.task_mixture: mixes task slices"),
    ],
)
def test_task_mixture_mistakes_name_the_key(tmp_path, data, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(task_recipe(tmp_path, data=data))


def test_the_fused_optimizer_takes_the_default_adamw_steps():
    """The trainer's AdamW (fused kernel, decay on matrices only) against torch's default per-tensor AdamW with the
    same two groups: the same weights after a few steps within float32 rounding, and norms untouched by decay."""
    torch.manual_seed(0)
    fused_model = HybridForCausalLM(tiny_config("GA"))
    reference_model = HybridForCausalLM(tiny_config("GA"))
    reference_model.load_state_dict(fused_model.state_dict())
    train = SimpleNamespace(weight_decay=0.1, lr=1e-2, betas=[0.9, 0.95])
    fused = build_optimizer(list(fused_model.parameters()), train, fused=True)
    matrices = [p for p in reference_model.parameters() if p.ndim >= 2]
    vectors = [p for p in reference_model.parameters() if p.ndim < 2]
    reference = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.9, 0.95))
    assert fused.defaults["fused"]
    tokens = torch.randint(3, 64, (2, 12))
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (reference_model, reference)):
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, got), expected in zip(fused_model.named_parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=name)

"""Real training runs of tiny recipes: kill-and-resume, output folder, LoRA and classification fine-tunes, NaN stop."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hybridzoo.recipes import train
from hybridzoo.recipes.trainer import TrainingDiverged
from tiny_models import kill_then_resume, run_cli


def tiny_recipe(output_dir, cache_dir, **sections) -> dict:
    recipe = {
        "output_dir": str(output_dir),
        "model": {"zoo": "lstm-attention", "size": "tiny",
                  "overrides": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
                                "block_types": ["lstm", "attention"]}},
        "data": {"source": "stdlib", "max_documents": 6, "context_length": 32, "validation_fraction": 0.2,
                 "cache_dir": str(cache_dir)},
        "tokenizer": {"vocab_size": 320},
        "train": {"max_steps": 12, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2},
        "eval": {"every": 6, "batches": 2},
        "checkpoint": {"every": 3, "keep": 2},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values} if isinstance(values, dict) else values
    return recipe


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    cache = tmp_path / "cache"
    paths = {}
    for name in ("straight", "killed"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(tiny_recipe(tmp_path / name, cache)))
    straight = run_cli("train", paths["straight"])
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    checkpoint = tmp_path / "killed" / "checkpoints" / "step-6"
    output = kill_then_resume("train", paths["killed"], checkpoint, tmp_path / "killed")
    assert "resumed from" in output
    expected, actual = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "killed"))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_output_folder_reloads_and_lora_and_classification_fine_tunes(tmp_path):
    base_dir = tmp_path / "base"
    summary = train(tiny_recipe(base_dir, tmp_path / "cache", checkpoint={"every": 0}))
    produced = {p.name for p in base_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss_curve.png", "recipe.yaml",
            "modeling_hybrid.py"} <= produced
    records = [yaml.safe_load(line) for line in (base_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13)) and "val_loss" in records[-1]
    assert records[-1]["loss"] < records[0]["loss"]
    assert summary["val_loss"] == records[-1]["val_loss"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True)
    assert model.config.vocab_size == 320

    lora_dir = tmp_path / "lora"
    train(tiny_recipe(lora_dir, tmp_path / "cache", model={"from_pretrained": str(base_dir), "zoo": None},
                      tokenizer={}, peft={"enabled": True, "r": 4, "alpha": 8}, checkpoint={"every": 0},
                      train={"max_steps": 3, "warmup_steps": 1}))
    assert (lora_dir / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForCausalLM.from_pretrained(lora_dir, trust_remote_code=True)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, model.get_parameter(n))]
    assert any("mixer.lstm.weight_hh_l0" in n for n in changed) and any("q_proj" in n for n in changed)
    assert not any("embed_tokens" in n for n in changed)  # LoRA leaves untargeted weights alone

    classify_dir = tmp_path / "classify"
    summary = train(tiny_recipe(classify_dir, tmp_path / "cache", model={"from_pretrained": str(base_dir),
                    "zoo": None, "head": "sequence_classification"},
                    data={"source": "stdlib_shuffled_lines", "max_documents": 64, "validation_fraction": 0.25},
                    train={"max_steps": 3, "warmup_steps": 1}, checkpoint={"every": 0}))
    assert 0 <= summary["val_accuracy"] <= 1
    assert '"HybridForSequenceClassification"' in (classify_dir / "config.json").read_text()


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from hybridzoo.recipes import trainer

    real = trainer.LanguageModelLoss.__call__
    calls = {"n": 0}

    def poisoned(self, model, batch, head):
        calls["n"] += 1
        loss = real(self, model, batch, head)
        return loss * float("nan") if calls["n"] > 8 else loss  # step 5 (2 micro-batches/step)

    monkeypatch.setattr(trainer.LanguageModelLoss, "__call__", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*step-3"):
        train(tiny_recipe(tmp_path / "run", tmp_path / "cache", eval={"every": 0}))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-3"]


def test_retrieval_task_recipe_trains(tmp_path):
    recipe = yaml.safe_load(Path(__file__).parents[1].joinpath("recipes", "retrieval_mqar.yaml").read_text())
    recipe.update(output_dir=str(tmp_path / "mqar"))
    recipe["model"]["overrides"].update(hidden_size=32)
    recipe["train"].update(max_steps=4, micro_batch_size=8, warmup_steps=1)
    recipe["eval"], recipe["checkpoint"] = {"every": 0, "batches": 1}, {"every": 0}
    summary = train(recipe)
    assert 0 <= summary["val_accuracy"] <= 1

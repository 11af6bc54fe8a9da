"""`hybridzoo distill`: weight transfer, the stages' losses, kill-and-resume, selection, report, push and reload."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import repeat_kv

from hybridzoo import HybridForCausalLM
from hybridzoo.recipes import RecipeError, distill, load_recipe, train
from hybridzoo.recipes.distillation import (
    AlignmentLoss,
    assemble_student,
    build_student,
    distillation_kl,
    load_teacher,
    swap_kl,
)
from tiny_models import BLOCK_HYBRIDZOO_IMPORTS, kill_then_resume, run_cli, tiny_config

CPU = SimpleNamespace(num_processes=1, device=torch.device("cpu"))  # what the objectives' setup reads


def data_section(cache: Path) -> dict:
    return {"source": "stdlib", "max_documents": 8, "context_length": 32, "validation_fraction": 0.2,
            "cache_dir": str(cache)}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 4-layer transformer (grouped KV heads) trained for a few steps on stdlib text, with its BPE."""
    root = tmp_path_factory.mktemp("teacher")
    train({"output_dir": str(root / "teacher"), "data": data_section(root / "cache"),
           "model": {"zoo": "transformer", "size": "tiny",
                     "overrides": {"num_hidden_layers": 4, "hidden_size": 32, "intermediate_size": 48}},
           "tokenizer": {"vocab_size": 320}, "train": {"max_steps": 8, "micro_batch_size": 4, "warmup_steps": 2},
           "eval": {"every": 0, "batches": 1}, "checkpoint": {"every": 0}})
    return root / "teacher"


def distill_recipe(output_dir: Path, teacher: Path, cache: Path, **distill_values) -> dict:
    return {
        "kind": "distill", "output_dir": str(output_dir), "model": {"from_pretrained": str(teacher)},
        "data": data_section(cache),
        "train": {"max_steps": 12, "micro_batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2},
        "eval": {"every": 6, "batches": 2}, "checkpoint": {"every": 3, "keep": 2},
        "distill": {"student_pattern": "GGGA", "align_steps": 6, "align_warmup_steps": 1, "scratch": False,
                    "report": False, **distill_values},
    }


# ---------------------------------------------------------------------------------------------------------- transfer


def test_weight_transfer_puts_each_teacher_tensor_where_the_recipe_says():
    teacher = HybridForCausalLM(tiny_config("A", num_layers=4)).eval()  # 4 query heads, 2 KV heads, head_dim 8
    student, mapping = build_student(teacher, [0, 2], "identity", seed=0)
    source, target = teacher.state_dict(), student.state_dict()
    assert student.config.block_types == ["gated_deltanet", "attention", "gated_deltanet", "attention"]
    heads, kv_heads, dim = 4, 2, 8
    for layer in (0, 2):
        t, s = f"model.layers.{layer}.mixer.", f"model.layers.{layer}.mixer."
        assert torch.equal(target[s + "q_proj.weight"], source[t + "q_proj.weight"])
        assert torch.equal(target[s + "o_proj.weight"], source[t + "o_proj.weight"])
        for name in ("k_proj.weight", "v_proj.weight"):  # GDN head h reads KV head h // 2, row block by row block
            for h in range(heads):
                kv = h // (heads // kv_heads)
                rows, teacher_rows = slice(h * dim, (h + 1) * dim), slice(kv * dim, (kv + 1) * dim)
                assert torch.equal(target[s + name][rows], source[t + name][teacher_rows])
        conv = target[s + "conv1d.weight"]
        assert torch.all(conv[:, :, -1] == 1) and torch.all(conv[:, :, :-1] == 0)
        fresh = {k.removeprefix(s) for k, v in mapping.items() if k.startswith(s) and v == "fresh"}
        assert fresh == {"z_proj.weight", "b_proj.weight", "a_proj.weight", "A_log", "dt_bias", "norm.weight"}
    for name, tensor in target.items():  # everything outside the new mixers is the teacher's, under the same name
        if not (name.startswith("model.layers.0.mixer.") or name.startswith("model.layers.2.mixer.")):
            assert torch.equal(tensor, source[name]), name
            assert mapping[name] == name


def test_gdn_projections_see_the_attention_heads_q_k_v():
    """Per head, the new layer's q/k/v projections give what the attention computed before RoPE, with transformers'
    own `repeat_kv` as the reference for which KV head serves which query head."""
    teacher = HybridForCausalLM(tiny_config("A", num_layers=2)).eval()
    student, _ = build_student(teacher, [1], "identity", seed=0)
    attention, gdn = teacher.model.layers[1].mixer, student.model.layers[1].mixer
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        for name in ("k_proj", "v_proj"):
            reference = repeat_kv(getattr(attention, name)(x).view(2, 5, 2, 8).transpose(1, 2), 2).transpose(1, 2)
            torch.testing.assert_close(getattr(gdn, name)(x).view(2, 5, 4, 8), reference)
        torch.testing.assert_close(gdn.q_proj(x), attention.q_proj(x))


def test_llama_teacher_loads_and_transfers(tmp_path):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4)).eval()
    llama.save_pretrained(tmp_path / "llama")
    teacher = load_teacher(tmp_path / "llama")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
    student, _ = build_student(teacher, [0], "identity", seed=0)
    llama_state, target = llama.state_dict(), student.state_dict()
    pairs = (("0.mixer.q_proj", "0.self_attn.q_proj"), ("1.mixer.k_proj", "1.self_attn.k_proj"),
             ("0.mixer.o_proj", "0.self_attn.o_proj"))
    for ours, theirs in pairs:
        assert torch.equal(target[f"model.layers.{ours}.weight"], llama_state[f"model.layers.{theirs}.weight"])
    assert torch.equal(target["model.layers.0.post_mixer_layernorm.weight"],
                       llama_state["model.layers.0.post_attention_layernorm.weight"])
    assert torch.equal(target["lm_head.weight"], llama_state["lm_head.weight"])


# ------------------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("blocks", ["gated_deltanet", "mamba2"])
def test_alignment_loss_falls_and_trains_only_the_new_mixers(blocks):
    torch.manual_seed(0)
    teacher = HybridForCausalLM(tiny_config("A", num_layers=2)).eval()
    student, _ = build_student(teacher, [0, 1], "identity", seed=0, blocks=blocks)
    objective = AlignmentLoss(teacher, [0, 1])
    objective.setup(student, CPU)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".mixer." in name for name in trainable)
    batch = {"input_ids": torch.randint(3, 64, (4, 24))}
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = objective(student, batch, "causal_lm")
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses
    # the per-layer loss is the MSE to the teacher attention's output on the teacher's input, normalised
    with torch.no_grad():
        hidden = teacher.model.layers[0].input_layernorm(teacher.model.embed_tokens(batch["input_ids"]))
        position = teacher.model.rotary_emb(hidden, torch.arange(24)[None])
        mask = torch.full((24, 24), float("-inf")).triu(1)
        target, _ = teacher.model.layers[0].mixer(hidden, position, attention_mask=mask[None, None])
        output, _ = student.model.layers[0].mixer(hidden)
        expected = (output - target).pow(2).mean() / target.pow(2).mean()
        torch.testing.assert_close(objective.per_layer(student, batch)[0], expected, rtol=1e-4, atol=1e-6)


def test_distillation_kl_is_hintons_loss():
    student, teacher = torch.randn(10, 50), torch.randn(10, 50)
    for temperature in (1.0, 2.0):
        expected = torch.nn.functional.kl_div((student / temperature).log_softmax(-1),
                                              (teacher / temperature).log_softmax(-1), log_target=True,
                                              reduction="batchmean") * temperature**2
        torch.testing.assert_close(distillation_kl(student, teacher, temperature), expected)
    assert distillation_kl(teacher, teacher, 2.0).abs() < 1e-6


def test_swap_kl_equals_the_one_layer_student():
    torch.manual_seed(0)
    teacher = HybridForCausalLM(tiny_config("A", num_layers=3)).eval()
    aligned, _ = build_student(teacher, [0, 1, 2], "identity", seed=0)
    batches = [{"input_ids": torch.randint(3, 64, (2, 16)), "labels": torch.randint(3, 64, (2, 16))}]
    measured = swap_kl(teacher, aligned, [0, 2], batches)
    for layer in (0, 2):
        one = assemble_student(teacher, aligned, [layer], "identity", seed=0)
        with torch.no_grad():
            expected = distillation_kl(one(batches[0]["input_ids"]).logits[:, :-1].reshape(-1, 64),
                                       teacher(batches[0]["input_ids"]).logits[:, :-1].reshape(-1, 64), 1.0)
        assert measured[layer] == pytest.approx(float(expected), rel=1e-4)
    assert all(type(layer.mixer).__name__ == "HybridAttention" for layer in teacher.model.layers)  # restored


# ----------------------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"replace_layers": [0, 1]}, "choose the replaced layers one way"),
        ({"student_pattern": "GXA"}, "use the letters G"),
        ({"freeze": ["mlps"]}, "distill.freeze: unknown parts"),
        ({"select": "mse", "student_pattern": None}, "distill.select: the measured criterion is kl"),
        # Mamba-2 students: the block comes from the pattern's letters, or from student_block with replace_layers
        ({"student_block": "mamba2"}, "distill.student_block: with distill.student_pattern the letters"),
        ({"student_pattern": None, "replace_layers": [0], "student_block": "lstm"},
         "distill.student_block: 'lstm': use gated_deltanet or mamba2"),
        ({"student_pattern": "DMA"}, "use the letters G .* D .* and A"),
    ],
)
def test_bad_distill_recipes_name_the_key(tmp_path, change, expected):
    recipe = distill_recipe(tmp_path / "out", tmp_path, tmp_path / "cache")
    recipe["distill"].update(change)
    with pytest.raises(RecipeError, match=expected):
        load_recipe(recipe)


def test_train_refuses_a_distill_recipe(tmp_path):
    with pytest.raises(RecipeError, match="hybridzoo distill"):
        train(distill_recipe(tmp_path / "out", tmp_path, tmp_path / "cache"))


# -------------------------------------------------------------------------------------------------------------- runs


def test_killed_distillation_resumes_to_the_same_weights(tmp_path, teacher_dir):
    cache = teacher_dir.parent / "cache"
    paths = {}
    for name in ("straight", "killed"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(distill_recipe(tmp_path / name, teacher_dir, cache)))
    straight = run_cli("distill", paths["straight"])
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    checkpoint = tmp_path / "killed" / "runs" / "stage2-kl" / "checkpoints" / "step-6"
    output = kill_then_resume("distill", paths["killed"], checkpoint, tmp_path / "killed")
    assert "stage1-align: finished earlier, kept" in output and "resumed from" in output
    expected, actual = (load_file(tmp_path / name / "model.safetensors") for name in ("straight", "killed"))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 19)) and {r["stage"] for r in records} == {"align", "kl"}


def test_selection_by_kl_keeps_the_costliest_layers_then_lora(tmp_path, teacher_dir):
    recipe = distill_recipe(tmp_path / "auto", teacher_dir, teacher_dir.parent / "cache", student_pattern=None,
                            select="kl", keep_attention=1, select_batches=1)
    recipe["train"].update(max_steps=2, warmup_steps=1)
    recipe["checkpoint"] = {"every": 0}
    recipe["peft"] = {"enabled": True, "r": 4, "alpha": 8}
    summary = distill(recipe)
    selection = json.loads((tmp_path / "auto" / "selection.json").read_text())
    kl = {int(k): v for k, v in selection["kl_per_layer"].items()}
    assert sorted(kl) == [0, 1, 2, 3] and selection["kept_attention"] == [max(kl, key=kl.get)]
    assert summary["replaced_layers"] == sorted(set(kl) - set(selection["kept_attention"]))
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert [b == "attention" for b in config["block_types"]] == [i in selection["kept_attention"] for i in range(4)]
    # stage 2 as LoRA: the adapter is kept, the merged student differs from the stage-1 one only where LoRA adapts
    assert (tmp_path / "auto" / "adapter" / "adapter_model.safetensors").exists()
    before = load_file(tmp_path / "auto" / "runs" / "student-stage1" / "model.safetensors")
    after = load_file(tmp_path / "auto" / "model.safetensors")
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    replaced = summary["replaced_layers"][0]
    assert f"model.layers.{replaced}.mixer.z_proj.weight" in changed and "model.embed_tokens.weight" not in changed
    assert all(name.endswith(("proj.weight", "lstm.weight_ih_l0")) for name in changed), changed


RELOAD = BLOCK_HYBRIDZOO_IMPORTS + textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    repo_id, inputs_file = sys.argv[1], sys.argv[2]
    data = torch.load(inputs_file)
    model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
    with torch.no_grad():
        difference = (model(data["input_ids"]).logits - data["logits"]).abs().max().item()
    assert "hybridzoo" not in sys.modules
    print(json.dumps({"difference": difference, "block_types": model.config.block_types}))
    """
)


def test_distilled_student_reports_saves_pushes_and_reloads(tmp_path, teacher_dir, monkeypatch):
    from hybridzoo.hub import push_to_hub
    from hybridzoo.testing.local_hub import LocalHub

    out = tmp_path / "student"
    recipe = distill_recipe(out, teacher_dir, teacher_dir.parent / "cache", scratch=True, report=True,
                            decode_lengths=[64], decode_tokens=2, retrieval_examples=2, mqar_slices=[[64, 4]],
                            needle_lengths=[64], eval_rows=8)
    recipe["train"].update(max_steps=3, warmup_steps=1, grad_accum=1)
    recipe["checkpoint"] = {"every": 2}  # the stages' checkpoints (pickles under runs/) stay local when pushing
    summary = distill(recipe)
    report = json.loads((out / "eval" / "distillation.json").read_text())
    assert set(report["held_out_loss"]) == {"teacher", "student (weight transfer only)",
                                            "student after stage 1 (align)", "student after stage 2 (kl)",
                                            "same hybrid from scratch"}
    assert summary["report"]["held_out_loss"] == {k: v["loss"] for k, v in report["held_out_loss"].items()}
    assert {64} == {int(k) for k in report["decode"]["teacher"]}
    assert {r["task"] for r in report["retention"]} >= {"mqar", "passkey_text", "niah_single_2_text"}
    markdown = (out / "eval" / "distillation.md").read_text()
    assert "### Held-out loss" in markdown and "### Decoding" in markdown and "### Retrieval retention" in markdown

    root = tmp_path / "hub"
    with LocalHub(root) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        result = push_to_hub(out, "local-user/distilled", backoff_seconds=0.01)
        assert {"model.safetensors", "eval/distillation.md", "eval/distillation.png", "README.md"} <= set(result.files)
        assert "## Distillation" in result.card.text and "Held-out loss" in result.card.text
        student = HybridForCausalLM.from_pretrained(out).eval()
        ids = torch.randint(3, 320, (2, 12))
        with torch.no_grad():
            torch.save({"input_ids": ids, "logits": student(ids).logits}, tmp_path / "inputs.pt")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
        loaded = subprocess.run([sys.executable, "-c", RELOAD, "local-user/distilled", str(tmp_path / "inputs.pt")],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    reloaded = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert reloaded["difference"] < 1e-5
    assert reloaded["block_types"] == ["gated_deltanet", "gated_deltanet", "gated_deltanet", "attention"]

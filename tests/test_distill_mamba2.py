"""`hybridzoo distill` into Mamba-2 students: Mamba in the Llama's weight transfer (C <- Q, B <- K, x <- V,
out_proj <- O), its closed form as linear attention, alignment, mixed G/D students, KL selection and the reload."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_distill import CPU, RELOAD, distill_recipe, teacher_dir  # noqa: F401  (teacher_dir: the shared fixture)
from torch.nn import functional as F

from hybridzoo import HybridForCausalLM
from hybridzoo.recipes import RecipeError, load_recipe
from hybridzoo.recipes.distillation import (
    assemble_student,
    build_student,
    chosen_layers,
    distill,
    distillation_kl,
    student_blocks,
    swap_kl,
)
from tiny_models import tiny_config

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 4, 2, 8, 32  # tiny_config's attention: grouped KV heads, 2 query heads per KV head


def head_rows(head: int, offset: int = 0) -> slice:
    return slice(offset + head * HEAD_DIM, offset + (head + 1) * HEAD_DIM)


# ---------------------------------------------------------------------------------------------------------- transfer


@pytest.mark.parametrize("bias", [False, True])
def test_mamba2_transfer_puts_q_k_v_o_into_c_b_x_and_out_proj(bias):
    """Each slice of the student's in_proj / out_proj against the teacher's q/k/v/o rows, the row layout written out
    here from Mamba-2's definition: in_proj = [z (H*P) | x (H*P) | B (G*N) | C (G*N) | dt (H)], head h of x, group h
    of B and C (G = H), and query head h reads KV head h // (H / Hkv)."""
    teacher = HybridForCausalLM(tiny_config("A", num_layers=4, attention_bias=bias)).eval()
    student, mapping = build_student(teacher, [0, 2], "identity", seed=0, blocks="mamba2")
    config = student.config
    assert config.block_types == ["mamba2", "attention", "mamba2", "attention"]
    assert (config.mamba_num_heads, config.mamba_head_dim, config.mamba_d_state, config.mamba_n_groups) == (
        HEADS, HEAD_DIM, HEAD_DIM, HEADS)
    assert config.mamba_proj_bias is bias
    source, target = teacher.state_dict(), student.state_dict()
    inner = HEADS * HEAD_DIM
    z, x, B, C, dt = 0, inner, 2 * inner, 3 * inner, 4 * inner  # where each row block starts (G * N = H * D here)
    for layer in (0, 2):
        t = s = f"model.layers.{layer}.mixer."
        kinds = ("weight", "bias") if bias else ("weight",)
        for kind in kinds:
            in_proj = target[f"{s}in_proj.{kind}"]
            assert in_proj.shape[0] == 4 * inner + HEADS
            for h in range(HEADS):
                kv = h // (HEADS // KV_HEADS)
                assert torch.equal(in_proj[head_rows(h, x)], source[f"{t}v_proj.{kind}"][head_rows(kv)])
                assert torch.equal(in_proj[head_rows(h, B)], source[f"{t}k_proj.{kind}"][head_rows(kv)])
                assert torch.equal(in_proj[head_rows(h, C)], source[f"{t}q_proj.{kind}"][head_rows(h)])
            assert torch.equal(target[f"{s}out_proj.{kind}"], source[f"{t}o_proj.{kind}"])
        if bias:  # no z or dt bias in the teacher: zero (dt's offset is dt_bias)
            assert torch.all(target[f"{s}in_proj.bias"][z:x] == 0) and torch.all(target[f"{s}in_proj.bias"][dt:] == 0)
        assert target[f"{s}in_proj.weight"][z:x].abs().sum() > 0  # the gate is freshly initialised, not zero
        conv = target[f"{s}conv1d.weight"]
        assert torch.all(conv[:, :, -1] == 1) and torch.all(conv[:, :, :-1] == 0)
        assert torch.all(target[f"{s}conv1d.bias"] == 0)
        assert torch.all(target[f"{s}norm.weight"] == 1)
        fresh = {k.removeprefix(s) for k, v in mapping.items() if k.startswith(s) and v == "fresh"}
        assert fresh == {"dt_bias", "A_log", "D"}
        assert "x <- expand_kv_heads" in mapping[f"{s}in_proj.weight"]
    for name, tensor in target.items():  # everything outside the new mixers is the teacher's, under the same name
        if not name.startswith(("model.layers.0.mixer.", "model.layers.2.mixer.")):
            assert torch.equal(tensor, source[name]), name
            assert mapping[name] == name


def test_fresh_conv_keeps_the_blocks_initialisation():
    teacher = HybridForCausalLM(tiny_config("A", num_layers=2)).eval()
    student, mapping = build_student(teacher, [1], "fresh", seed=0, blocks="mamba2")
    conv = student.model.layers[1].mixer.conv1d.weight
    assert mapping["model.layers.1.mixer.conv1d.weight"] == "fresh" and conv[:, :, :-1].abs().sum() > 0


def test_mamba2_student_is_linear_attention_over_the_teachers_projections():
    """With the decay at 1 (A = 0), dt = 1, D = 0 and the identity conv, Mamba-2's scan is causal linear attention
    without softmax, scaling or RoPE: y_t = sum_{s <= t} (silu(q_t) . silu(k_s)) silu(v_s), per query head, on the
    teacher's own projections (a naive loop here); the output is then out_proj(per-head RMSNorm(y * silu(z))) with
    the teacher's o_proj. T = 70 crosses a chunk boundary of the chunked scan (64)."""
    torch.manual_seed(0)
    teacher = HybridForCausalLM(tiny_config("A", num_layers=1)).eval()
    student, _ = build_student(teacher, [0], "identity", seed=0, blocks="mamba2")
    attention, mixer = teacher.model.layers[0].mixer, student.model.layers[0].mixer
    inner = HEADS * HEAD_DIM
    with torch.no_grad():
        mixer.A_log.fill_(-1e4)  # A = -exp(A_log) = 0: no decay
        mixer.in_proj.weight[4 * inner:] = 0  # the dt rows
        mixer.dt_bias.fill_(torch.log(torch.expm1(torch.tensor(1.0))).item())  # softplus(dt_bias) = 1
        mixer.D.zero_()
    captured = {}
    mixer.norm.register_forward_pre_hook(lambda module, args: captured.update(y=args[0], z=args[1]))
    batch, length = 2, 70
    hidden = torch.randn(batch, length, HIDDEN)
    with torch.no_grad():
        output, _ = mixer(hidden)
        q = F.silu(attention.q_proj(hidden)).view(batch, length, HEADS, HEAD_DIM)
        k = F.silu(attention.k_proj(hidden)).view(batch, length, KV_HEADS, HEAD_DIM)
        v = F.silu(attention.v_proj(hidden)).view(batch, length, KV_HEADS, HEAD_DIM)
        expected = torch.zeros(batch, length, HEADS, HEAD_DIM)
        for h in range(HEADS):
            kv = h // (HEADS // KV_HEADS)
            for t in range(length):
                scores = (q[:, t, h, None, :] * k[:, : t + 1, kv]).sum(-1)  # [batch, t + 1]
                expected[:, t, h] = (scores[..., None] * v[:, : t + 1, kv]).sum(1)
        torch.testing.assert_close(captured["y"].view(batch, length, HEADS, HEAD_DIM), expected, rtol=1e-4, atol=1e-4)
        gated = (expected * F.silu(captured["z"]).view(batch, length, HEADS, HEAD_DIM))
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + teacher.config.rms_norm_eps)
        torch.testing.assert_close(output, attention.o_proj(normed.reshape(batch, length, inner)), rtol=1e-4,
                                   atol=1e-4)


@pytest.mark.parametrize(
    ("field", "block"),
    [("attention_qk_norm", "mamba2"), ("attention_output_gate", "mamba2"), ("attention_bias", "gated_deltanet")],
)
def test_untransferable_teacher_names_its_config_field(field, block):
    teacher = HybridForCausalLM(tiny_config("A", num_layers=2, **{field: True})).eval()
    with pytest.raises(RecipeError, match=f"`{field}`"):
        build_student(teacher, [0], "identity", seed=0, blocks=block)


# ------------------------------------------------------------------------------------------- losses and selection


def test_swap_kl_with_mamba2_equals_the_one_layer_student():
    torch.manual_seed(0)
    teacher = HybridForCausalLM(tiny_config("A", num_layers=3)).eval()
    aligned, _ = build_student(teacher, [0, 1, 2], "identity", seed=0, blocks="mamba2")
    batches = [{"input_ids": torch.randint(3, 64, (2, 16)), "labels": torch.randint(3, 64, (2, 16))}]
    measured = swap_kl(teacher, aligned, [0, 2], batches)
    for layer in (0, 2):
        one = assemble_student(teacher, aligned, [layer], "identity", seed=0, blocks="mamba2")
        assert one.config.block_types[layer] == "mamba2"
        with torch.no_grad():
            expected = distillation_kl(one(batches[0]["input_ids"]).logits[:, :-1].reshape(-1, 64),
                                       teacher(batches[0]["input_ids"]).logits[:, :-1].reshape(-1, 64), 1.0)
        assert measured[layer] == pytest.approx(float(expected), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------- recipes


def test_mixed_pattern_builds_both_kinds_from_the_teacher(tmp_path):
    """`student_pattern: DGDA`: layers 0 and 2 Mamba-2, layer 1 Gated DeltaNet, layer 3 the teacher's attention, each
    new layer holding its own attention's weights."""
    recipe = load_recipe(distill_recipe(tmp_path / "out", tmp_path, tmp_path / "cache", student_pattern="DGDA"))
    teacher = HybridForCausalLM(tiny_config("A", num_layers=4)).eval()
    layers = chosen_layers(recipe, teacher.config)
    blocks = student_blocks(recipe, layers)
    assert blocks == {0: "mamba2", 1: "gated_deltanet", 2: "mamba2"}
    student, _ = build_student(teacher, layers, "identity", seed=0, blocks=blocks)
    assert student.config.block_types == ["mamba2", "gated_deltanet", "mamba2", "attention"]
    source, target = teacher.state_dict(), student.state_dict()
    C = 3 * HEADS * HEAD_DIM
    for layer in (0, 2):
        q = source[f"model.layers.{layer}.mixer.q_proj.weight"]
        assert torch.equal(target[f"model.layers.{layer}.mixer.in_proj.weight"][C:C + HEADS * HEAD_DIM], q)
    assert torch.equal(target["model.layers.1.mixer.q_proj.weight"], source["model.layers.1.mixer.q_proj.weight"])
    assert torch.equal(target["model.layers.3.mixer.q_proj.weight"], source["model.layers.3.mixer.q_proj.weight"])


def test_mamba2_selected_by_kl_distils_and_reloads_with_remote_code(tmp_path, teacher_dir):  # noqa: F811
    """`select: kl` with `student_block: mamba2`: every attention layer is aligned as Mamba-2, the costliest swap
    stays attention, both stages run, and the saved student reloads with trust_remote_code in a process that cannot
    import hybridzoo and gives the same logits."""
    out = tmp_path / "student"
    recipe = distill_recipe(out, teacher_dir, teacher_dir.parent / "cache", student_pattern=None, select="kl",
                            keep_attention=1, select_batches=1, student_block="mamba2", align_steps=3)
    recipe["train"].update(max_steps=2, warmup_steps=1, grad_accum=1)
    recipe["checkpoint"] = {"every": 0}
    summary = distill(recipe)
    selection = json.loads((out / "selection.json").read_text())
    kl = {int(k): v for k, v in selection["kl_per_layer"].items()}
    kept = max(kl, key=kl.get)
    assert selection["kept_attention"] == [kept]
    block_types = ["attention" if i == kept else "mamba2" for i in range(4)]
    assert summary["student_block_types"] == block_types
    aligned = json.loads((out / "runs" / "stage1-align" / "config.json").read_text())
    assert aligned["block_types"] == ["mamba2"] * 4
    transfer = json.loads((out / "runs" / "weight_transfer.json").read_text())
    assert "C <- model.layers.0.mixer.q_proj.weight" in transfer["model.layers.0.mixer.in_proj.weight"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == ["align"] * 3 + ["kl"] * 2

    student = HybridForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 320, (2, 12))
    with torch.no_grad():
        torch.save({"input_ids": ids, "logits": student(ids).logits}, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    loaded = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(tmp_path / "inputs.pt")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    reloaded = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert reloaded["difference"] < 1e-5
    assert reloaded["block_types"] == block_types

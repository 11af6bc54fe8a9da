"""`hybridzoo eval` on a tiny saved model writes JSONL, markdown and PNGs; `compare` trains and tabulates."""

import json

import pytest

from hybridzoo.cli import main
from hybridzoo.configs.zoo import zoo_config
from hybridzoo.modeling import HybridForCausalLM


def test_eval_cli_on_a_saved_model(tmp_path):
    config = zoo_config("qwen3-next-style", "tiny", vocab_size=300, hidden_size=32, num_hidden_layers=4,
                        intermediate_size=0, num_attention_heads=2, num_key_value_heads=1)
    HybridForCausalLM(config).save_pretrained(tmp_path / "tiny")
    out = tmp_path / "eval"
    code = main(["eval", str(tmp_path / "tiny"), "--suite", "all", "--lengths", "64", "96", "--depths", "0", "1",
                 "--examples", "4", "--batch-size", "4", "--train-length", "32", "--decode-lengths", "32", "64",
                 "--decode-tokens", "2", "--output-dir", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    tasks = {r["task"] for r in rows}
    assert {"mqar", "passkey", "niah_single_3", "variable_tracking", "lm_stream", "decode_cost", "parity"} <= tasks
    for row in rows:
        assert {"architecture", "state_bytes", "task", "length", "depth", "metric", "value", "seed"} <= set(row)
    accuracy = [r for r in rows if r["metric"] == "accuracy"]
    assert all(r["ci_low"] <= r["value"] <= r["ci_high"] and r["n"] > 0 for r in accuracy)
    kv = [r for r in rows if r["metric"] == "cache_kv_bytes"]
    assert kv[1]["value"] > kv[0]["value"] > 0  # the attention layer's KV grows with the context
    assert "| tiny |" in (out / "results.md").read_text()
    for png in ("recall_vs_state", "loss_by_position", "decode_cost", "heatmap_passkey_tiny"):
        assert (out / f"{png}.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_cli_trains_and_tabulates(tmp_path):
    out = tmp_path / "compare"
    code = main(["compare", "--architectures", "transformer", "lstm", "--slices", "16:2", "--steps", "3",
                 "--batch-size", "4", "--vocab-size", "64", "--test-examples", "8", "--d-models", "16",
                 "--output-dir", str(out)])
    assert code == 0
    table = (out / "compare.md").read_text()
    assert "| transformer | 16 | AA |" in table and "| lstm | 16 | LL |" in table and "T=16, kv=2" in table
    assert (out / "accuracy.png").exists() and (out / "recall_vs_state.png").exists()


def test_text_level_scores_equal_token_level_scores_under_the_task_tokenizer(tmp_path):
    """With the word-level tokenizer whose ids are the task's token ids, the text form of an example tokenizes to the
    token form, so the text-level answer log-likelihood and exact match must equal those computed from `batch`."""
    import torch

    from hybridzoo.data.tasks import make_task
    from hybridzoo.evaluation.harness import TEXT_TASK_VOCABULARY, score_text_example
    from hybridzoo.evaluation.text_tokenizer import task_tokenizer

    torch.manual_seed(0)
    config = zoo_config("lstm-attention", "tiny", vocab_size=TEXT_TASK_VOCABULARY, hidden_size=32,
                        num_hidden_layers=2, block_pattern="LA", intermediate_size=0, num_attention_heads=2,
                        num_key_value_heads=1)
    model = HybridForCausalLM(config).eval()
    tokenizer = task_tokenizer(TEXT_TASK_VOCABULARY)
    task = make_task("passkey", vocab_size=TEXT_TASK_VOCABULARY, seq_len=64, depth=0.5)
    batch = task.batch(3, seed=7)
    texts = task.text_examples(3, seed=7)
    with torch.no_grad():
        log_probs = model(input_ids=batch["input_ids"]).logits.log_softmax(-1)
    for row, example in enumerate(texts):
        scored = (batch["labels"][row] != -100).nonzero().flatten()
        targets = batch["labels"][row, scored]
        expected_loglik = log_probs[row, scored - 1].gather(-1, targets[:, None]).sum().item()
        expected_exact = bool((log_probs[row, scored - 1].argmax(-1) == targets).all())
        loglik, exact, _ = score_text_example(model, tokenizer, example["prompt"], example["answer"])
        assert loglik == pytest.approx(expected_loglik, abs=1e-3)
        assert exact == expected_exact

    tokenizer.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "m"), "--level", "text", "--lengths", "64", "--depths", "0.5",
                 "--examples", "2", "--output-dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {"passkey_text", "niah_single_2_text", "variable_tracking_text"} <= {r["task"] for r in rows}
    assert all(r["n"] == 2 for r in rows if r["metric"] == "exact")


def test_each_model_gets_only_what_fits_its_training(tmp_path):
    """A model trained on MQAR by a recipe gets the MQAR family (no word-level needles sitting at chance), a model
    trained on parity gets parity, and every row names its model (the folder) and its zoo architecture."""
    import yaml

    from hybridzoo.evaluation.harness import run_eval, task_fits, trained_on

    config = zoo_config("qwen3-next-style", "tiny", vocab_size=300, hidden_size=32, num_hidden_layers=2,
                        intermediate_size=0, num_attention_heads=2, num_key_value_heads=1, block_pattern="GA")
    for name, task in (("mqar-model", "mqar"), ("parity-model", "parity")):
        HybridForCausalLM(config).save_pretrained(tmp_path / name)
        recipe = {"model": {"zoo": "qwen3-next-style"}, "data": {"source": "task", "task": task}}
        (tmp_path / name / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert trained_on(str(tmp_path / "mqar-model")) == {"kind": "task", "task": "mqar"}
    assert trained_on("transformer") is None
    assert task_fits("forgetting_mqar", {"kind": "task", "task": "mqar"})
    assert not task_fits("passkey", {"kind": "task", "task": "mqar"})
    assert not task_fits("mqar", {"kind": "text"})

    out = tmp_path / "eval"
    run_eval([str(tmp_path / "mqar-model"), str(tmp_path / "parity-model")], suite="all", out_dir=str(out),
             lengths=[64, 128], num_examples=2, batch_size=2, decode_lengths=[16], decode_tokens=1, depths=[0.5])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    tasks = {model: {r["task"] for r in rows if r["model"] == model} for model in ("mqar-model", "parity-model")}
    assert tasks["mqar-model"] == {"mqar", "forgetting_mqar_updated", "forgetting_mqar_untouched", "decode_cost"}
    assert tasks["parity-model"] == {"parity", "decode_cost"}
    assert {r["architecture"] for r in rows} == {"qwen3-next-style"}
    parity_lengths = sorted(r["length"] for r in rows if r["task"] == "parity" and r["metric"] == "accuracy")
    assert parity_lengths == [32, 64, 128, 256]  # the length-generalisation curve
    assert "| mqar-model | qwen3-next-style |" in (out / "results.md").read_text()


def test_model_card_keeps_its_own_rows_of_a_comparison():
    from hybridzoo.model_card import rows_of_model

    rows = [{"model": "text-a", "task": "t"}, {"model": "text-b", "task": "t"}]
    assert rows_of_model(rows, "text-a") == rows[:1]
    assert rows_of_model(rows, "other") == rows  # no row names it: keep the old architecture-based selection
    assert rows_of_model([{"task": "t"}], "text-a") == [{"task": "t"}]

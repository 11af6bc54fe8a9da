"""`hybridzoo eval` on a tiny saved model writes JSONL, markdown and PNGs; `compare` trains and tabulates."""

import json

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

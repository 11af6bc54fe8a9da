"""The main job's chain (train -> eval -> card + push -> reload in a fresh process) at tiny size."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from hybridzoo.model_card import validate_card_metadata
from hybridzoo.quickstart import QuickstartSettings, matched_mlp_width, run_quickstart
from hybridzoo.testing.local_hub import RepoStore


def test_matched_baseline_has_the_hybrids_parameter_count():
    from hybridzoo import HybridForCausalLM
    from hybridzoo.configs.zoo import zoo_config

    width = matched_mlp_width("qwen3-next-style", "transformer", "tiny", 4096)
    hybrid = HybridForCausalLM(zoo_config("qwen3-next-style", "tiny", vocab_size=4096)).num_parameters()
    baseline = HybridForCausalLM(zoo_config("transformer", "tiny", vocab_size=4096, intermediate_size=width))
    # one MLP unit is 3 * hidden * layers parameters: the closest match is within half of that
    assert abs(baseline.num_parameters() - hybrid) <= 3 * 64 * 8 / 2


def test_quickstart_chain_at_tiny_size(tmp_path, monkeypatch, capsys):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HYBRIDZOO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "quickstart"
    settings = QuickstartSettings(text_steps=3, mqar_steps=3, eval_examples=2, output_dir=str(out), new_tokens=4)
    summary = run_quickstart(settings)

    # 1. four trained models, each a loadable folder with its training record
    for kind in ("text", "mqar"):
        for name in ("qwen3-next-style", "transformer"):
            folder = out / "runs" / f"{kind}-{name}"
            assert summary["trained"][kind][name] == str(folder)
            assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
            steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                     if '"loss"' in line]
            assert max(steps) == 3

    # 2. both architectures evaluated on both suites; table and plots written
    rows = [json.loads(line) for line in (out / "eval" / "results.jsonl").read_text().splitlines()]
    tasks_by_model = {}
    for row in rows:
        tasks_by_model.setdefault(row["model"], set()).add(row["task"])
    for name in ("qwen3-next-style", "transformer"):
        # only what fits each model's training: the MQAR family (no word-level needles) and real text
        assert "mqar" in tasks_by_model[f"mqar-{name}"] <= {"mqar", "forgetting_mqar_updated",
                                                             "forgetting_mqar_untouched"}
        assert {"text_loss", "decode_cost"} == tasks_by_model[f"text-{name}"]
    assert {row["architecture"] for row in rows if row["model"].endswith("qwen3-next-style")} == {"qwen3-next-style"}
    assert (out / "eval" / "results.md").exists() and list((out / "eval").glob("*.png"))
    assert "| model |" in capsys.readouterr().out  # the comparison table was printed

    # 3. published with a card that carries the eval results and passes the Hub's metadata checks
    repo = RepoStore(out / "hub" / "models" / "local" / "hybridzoo-quickstart")
    files = repo.commit(repo.resolve("main"))["files"]
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    assert any(path.endswith("modeling_hybrid.py") for path in files)  # remote code travels with the weights
    card_text = repo.blob(files["README.md"]["oid"]).decode()
    assert validate_card_metadata(card_text) == []
    card = ModelCard(card_text)
    assert card.data.eval_results, "the card's model-index holds the eval results"
    assert {result.task_name for result in card.data.eval_results} == {"text_loss", "decode_cost"}  # its own rows
    # the comparison was pushed as written by the eval, not edited for the card
    assert repo.blob(files["eval/results.jsonl"]["oid"]) == (out / "eval" / "results.jsonl").read_bytes()
    trained = (out / "runs" / "text-qwen3-next-style" / "model.safetensors").read_bytes()
    assert repo.blob(files["model.safetensors"]["oid"]) == trained

    # 4. reloaded in a fresh process from the endpoint, from the repo's own code, same logits as the trained model
    assert summary["reloaded"]["class"].startswith("transformers_modules.")
    assert summary["reloaded"]["max_logit_difference"] < 1e-4
    assert summary["reloaded"]["sample"].startswith(settings.prompt)

    # 5. the summary says where everything is
    assert json.loads((out / "summary.json").read_text())["published"]["repo_id"] == settings.repo_id

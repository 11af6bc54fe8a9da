"""Publishing: cards, pushes to a local Hub-compatible server, and loading back where hybridzoo is not installed.

Every request goes to `hybridzoo.testing.local_hub.LocalHub` on 127.0.0.1 (HF_ENDPOINT points at it); nothing leaves the
machine. Loads run in fresh processes with an empty cache and the hybridzoo package blocked from import.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from peft import LoraConfig, get_peft_model

from hybridzoo import HybridForCausalLM
from hybridzoo.cli import main as cli_main
from hybridzoo.hub import HubPushError, push_to_hub
from hybridzoo.model_card import ModelCardError, build_model_card, validate_card_metadata
from hybridzoo.testing.local_hub import LocalHub
from tiny_models import BLOCK_HYBRIDZOO_IMPORTS, tiny_config

FAKE_TOKEN = "hf_testTOKENdoNotLeak0123456789"
FAST = dict(backoff_seconds=0.01)  # retries without real waiting
PNG = b"\x89PNG\r\n\x1a\n stand-in plot"  # uploaded as opaque bytes; only the name matters to the card


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with LocalHub(tmp_path_factory.mktemp("hub")) as server:
        yield server


@pytest.fixture(autouse=True)
def hub_env(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # they block a local endpoint too
        monkeypatch.delenv(name, raising=False)


def write_run_folder(folder: Path, model: HybridForCausalLM) -> Path:
    """A model folder as a training run leaves it: weights + code, recipe, metrics, plots, eval results, checkpoints."""
    model.save_pretrained(folder)
    (folder / "recipe.yaml").write_text(
        "description: tiny test hybrid\nmodel: {zoo: qwen3-next-style, size: tiny}\n"
        "data: {source: stdlib, context_length: 32}\ntrain: {max_steps: 3, lr: 0.01, seed: 0, precision: fp32}\n"
    )
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 4.0 - s}) + "\n" for s in (1, 2, 3)))
    (folder / "loss_curve.png").write_bytes(PNG)
    (folder / "eval").mkdir()
    rows = [
        dict(architecture="qwen3-next-style", state_bytes=1024, task="mqar", length=length, depth=4, metric="accuracy",
             value=value, seed=seed, ci_low=value - 0.05, ci_high=value + 0.05, n=64)
        for length, base in ((64, 0.9), (128, 0.7)) for seed, value in ((0, base), (1, base + 0.02))
    ]
    (folder / "eval" / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "eval" / "results.md").write_text("# results\n")
    (folder / "eval" / "mqar.png").write_bytes(PNG)
    (folder / "checkpoints" / "step-3").mkdir(parents=True)
    torch.save({"step": 3}, folder / "checkpoints" / "step-3" / "optimizer.pt")  # local only: never uploaded
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GLSA hybrid after a few optimizer steps, saved as a run folder; returns (folder, model)."""
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config("GLSA"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        ids = torch.randint(3, 64, (2, 12))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = write_run_folder(tmp_path_factory.mktemp("run") / "tiny-glsa", model.eval())
    return folder, model


@pytest.fixture(scope="module")
def pushed(trained, hub):
    """The trained model pushed once to `local-user/tiny-glsa` (module-wide, so loading tests share it)."""
    folder, model = trained
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", hub.endpoint)
        patch.setenv("HF_TOKEN", FAKE_TOKEN)
        result = push_to_hub(folder, "local-user/tiny-glsa", **FAST)
    return result, model


LOAD_IN_FRESH_PROCESS = BLOCK_HYBRIDZOO_IMPORTS + textwrap.dedent(
    """
    import json, sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    repo_id, adapter_repo, inputs_file = sys.argv[1], sys.argv[2], sys.argv[3]
    data = torch.load(inputs_file)
    report = {}
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True).eval()
        report["model"] = [type(model).__name__, (model(data["input_ids"]).logits - data["logits"]).abs().max().item()]
        adapted = PeftModel.from_pretrained(model, adapter_repo).eval()
        diff = (adapted(data["input_ids"]).logits - data["adapted_logits"]).abs().max().item()
        report["adapter"] = [type(adapted).__name__, diff]
    assert "hybridzoo" not in sys.modules
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def adapter(pushed, hub, tmp_path_factory):
    """A LoRA on the pushed model, saved with a local base path and pushed with `base_model=` the Hub id."""
    _, base = pushed
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "k_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(base), lora).eval()  # a copy: get_peft_model edits its model
    adapter_dir = tmp_path_factory.mktemp("adapter") / "tiny-glsa-lora"
    peft_model.save_pretrained(adapter_dir)  # base_model_name_or_path is None or local: base_model= fixes it
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", hub.endpoint)
        patch.setenv("HF_TOKEN", FAKE_TOKEN)
        result = push_to_hub(adapter_dir, "local-user/tiny-glsa-lora", base_model="local-user/tiny-glsa", **FAST)
    return result, peft_model


@pytest.fixture(scope="module")
def fresh_process_report(pushed, adapter, hub, tmp_path_factory):
    """Load the pushed model, then the pushed adapter onto it, in one fresh process (one start-up, not two)."""
    (_, model), (_, peft_model) = pushed, adapter
    folder = tmp_path_factory.mktemp("fresh")
    input_ids = torch.randint(3, 64, (2, 10))
    with torch.no_grad():
        logits, adapted_logits = model(input_ids).logits, peft_model(input_ids).logits
    assert not torch.equal(logits, adapted_logits)  # the adapter really changes the model
    torch.save({"input_ids": input_ids, "logits": logits, "adapted_logits": adapted_logits}, folder / "inputs.pt")
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(folder / "empty_hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, "local-user/tiny-glsa", "local-user/tiny-glsa-lora",
         str(folder / "inputs.pt")],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- cards


def test_model_card_metadata_and_body(trained):
    folder, _ = trained
    card = build_model_card(folder, repo_id="local-user/tiny-glsa")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license, data.language) == (
        "transformers", "text-generation", "apache-2.0", "code")
    assert {"gated-deltanet", "lstm", "sliding-attention", "attention", "custom_code"} <= set(data.tags)
    # model-index: one entry per (task, length, depth, metric), the mean over the two seeds
    values = {result.dataset_config: result.metric_value for result in data.eval_results}
    assert values == {"length=64,depth=4": pytest.approx(0.91), "length=128,depth=4": pytest.approx(0.71)}
    # the text survives huggingface_hub's own parser and the Hub's metadata checks
    reparsed = ModelCard(str(card))
    assert len(reparsed.data.eval_results) == 2 and reparsed.data.model_name == "tiny-glsa"
    assert validate_card_metadata(str(card)) == []
    text = card.text
    for expected in ("Layer pattern `G L S A`", "| 1 | `lstm` | L |", "recurrent state per sequence",
                     "trust_remote_code=True", "pip install hybridzoo", "## Training", "![loss curve](loss_curve.png)",
                     "| mqar | 64 | 4 | accuracy | 0.9100 |", "![mqar](eval/mqar.png)", "## Limitations"):
        assert expected in text, expected


def test_invalid_card_metadata_is_refused(trained):
    folder, _ = trained
    with pytest.raises(ModelCardError, match="license"):
        build_model_card(folder, repo_id="local-user/x", license="not-a-licence")
    assert validate_card_metadata("---\nmodel-index: [{name: x, results: [{}]}]\n---\n") != []


# ---------------------------------------------------------------- folder checks and dry run


def test_dry_run_lists_files_and_prints_the_card(trained, hub, capsys):
    folder, _ = trained
    requests_before = len(hub.request_log)
    assert cli_main(["push", str(folder), "--repo-id", "local-user/dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "generation_config.json", "modeling_hybrid.py", "README.md",
                 "recipe.yaml", "metrics.jsonl", "loss_curve.png", "eval/results.jsonl", "eval/mqar.png"):
        assert f"  {name}  (" in out, name
    assert "checkpoints" not in out and "optimizer.pt" not in out
    assert "library_name: transformers" in out and "model-index:" in out
    assert len(hub.request_log) == requests_before  # a dry run talks to nobody


def test_pickle_weights_are_refused(trained, tmp_path, hub):
    folder, model = trained
    model.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(HubPushError, match="only safetensors"):
        push_to_hub(tmp_path, "local-user/pickled")
    assert hub.head("local-user/pickled") is None


# ---------------------------------------------------------------- push and load


def test_pushed_model_loads_without_hybridzoo_with_identical_logits(pushed, hub, fresh_process_report):
    result, _ = pushed
    assert result.commit_oid == hub.head("local-user/tiny-glsa")
    remote = hub.files("local-user/tiny-glsa")
    assert set(remote) == set(result.files)
    assert {"README.md", "model.safetensors", "modeling_hybrid.py", "eval/results.jsonl"} <= set(remote)
    info = HfApi(endpoint=hub.endpoint).model_info("local-user/tiny-glsa")
    assert info.card_data.library_name == "transformers" and "gated-deltanet" in info.card_data.tags
    assert fresh_process_report["model"] == ["HybridForCausalLM", 0.0]


def test_adapter_push_names_base_model_and_loads_onto_it(adapter, hub, fresh_process_report):
    result, _ = adapter
    card = result.card.data
    assert card.library_name == "peft" and card.base_model == "local-user/tiny-glsa"
    assert "base_model:adapter:local-user/tiny-glsa" in card.tags
    uploaded = json.loads(hub.files("local-user/tiny-glsa-lora")["adapter_config.json"])
    assert uploaded["base_model_name_or_path"] == "local-user/tiny-glsa"
    assert fresh_process_report["adapter"] == ["PeftModelForCausalLM", 0.0]


def test_adapter_without_a_hub_base_model_is_refused(pushed, tmp_path):
    _, base = pushed
    peft_model = get_peft_model(HybridForCausalLM(base.config), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(HubPushError, match="--base-model"):
        push_to_hub(tmp_path / "adapter", "local-user/orphan-lora", dry_run=True)


def test_branch_and_pull_request_leave_main_alone(trained, hub):
    folder, _ = trained
    first = push_to_hub(folder, "local-user/branches", **FAST)
    on_dev = push_to_hub(folder, "local-user/branches", revision="dev", commit_message="to dev", **FAST)
    assert hub.head("local-user/branches", "dev") == on_dev.commit_oid == first.commit_oid  # nothing changed: no-op
    (folder / "eval" / "results.md").write_text("# results, revised\n")
    try:
        pr = push_to_hub(folder, "local-user/branches", create_pr=True, **FAST)
    finally:
        (folder / "eval" / "results.md").write_text("# results\n")
    assert pr.pull_request_url and pr.pull_request_url.endswith("/discussions/1")
    assert hub.head("local-user/branches", "refs/pr/1") == pr.commit_oid != first.commit_oid
    assert hub.head("local-user/branches") == first.commit_oid


# ---------------------------------------------------------------- failures


def test_transient_errors_are_retried_with_backoff(trained, hub, caplog):
    folder, _ = trained
    hub.fail_next("create", times=1, status=503)
    hub.fail_next("commit", times=1, status=500)
    hub.fail_next("commit", times=1, status=None)  # the connection drops with no answer
    with caplog.at_level(logging.WARNING, logger="hybridzoo.hub"):
        result = push_to_hub(folder, "local-user/flaky", max_attempts=4, **FAST)
    assert result.attempts == {"creating the repo": 2, "uploading the files": 3}
    assert result.commit_oid == hub.head("local-user/flaky")
    assert set(hub.files("local-user/flaky")) == set(result.files)
    assert caplog.text.count("retrying in") == 3


def test_failed_commit_leaves_the_repo_as_it_was(trained, hub):
    folder, _ = trained
    first = push_to_hub(folder, "local-user/atomic", **FAST)
    before = hub.files("local-user/atomic")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 0.5}) + "\n")
    hub.fail_next("commit", times=3, status=502)  # every attempt dies mid-commit
    try:
        with pytest.raises(HubPushError) as failure:
            push_to_hub(folder, "local-user/atomic", max_attempts=3, **FAST)
    finally:
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 4.0 - s}) + "\n"
                                                      for s in (1, 2, 3)))
    message = str(failure.value)
    assert "uploading the files failed" in message and "gave up after 3 attempts" in message
    assert "run the same command again" in message
    assert hub.head("local-user/atomic") == first.commit_oid
    assert hub.files("local-user/atomic") == before


def test_token_never_appears_in_errors_or_logs(trained, hub, caplog, capsys):
    folder, _ = trained
    # a server that echoes the credentials back in its error text: the message must still come out clean
    hub.fail_next("commit", times=2, status=500, message=f"backend trouble with Bearer {FAKE_TOKEN}")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(HubPushError) as failure:
            push_to_hub(folder, "local-user/secret", token=FAKE_TOKEN, max_attempts=2, **FAST)
        hub.fail_next("commit", times=1, status=400, message=f"bad request from Bearer {FAKE_TOKEN}")
        code = cli_main(["push", str(folder), "--repo-id", "local-user/secret", "--token", FAKE_TOKEN])
    out = capsys.readouterr()
    assert code == 1 and "hybridzoo push:" in out.out
    assert "hf_***" in str(failure.value)  # the echo was there, redacted
    for text in (str(failure.value), repr(failure.value), caplog.text, out.out, out.err):
        assert FAKE_TOKEN not in text


def test_rejected_token_says_what_to_do(trained, tmp_path, monkeypatch):
    folder, _ = trained
    with LocalHub(tmp_path / "strict-hub", token="hf_theRightToken") as strict:
        monkeypatch.setenv("HF_ENDPOINT", strict.endpoint)
        with pytest.raises(HubPushError) as failure:
            push_to_hub(folder, "local-user/strict", token=FAKE_TOKEN, **FAST)
        assert strict.head("local-user/strict") is None
    message = str(failure.value)
    assert "hf auth login" in message and "HF_TOKEN" in message and FAKE_TOKEN not in message

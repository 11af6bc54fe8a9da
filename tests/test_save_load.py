"""Saving writes safetensors plus the model code; the folder loads via the Auto classes with or without hybridzoo."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from hybridzoo import HybridConfig, HybridForCausalLM, HybridForSequenceClassification, HybridModel
from tiny_models import BLOCK_HYBRIDZOO_IMPORTS, tiny_config


def test_auto_classes_know_the_model():
    config = tiny_config("GLSA")
    assert isinstance(
        AutoConfig.for_model("hybridzoo", block_pattern="GLSA", num_hidden_layers=4, sliding_window=4), HybridConfig
    )
    assert type(AutoModel.from_config(config)) is HybridModel
    assert type(AutoModelForCausalLM.from_config(config)) is HybridForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is HybridForSequenceClassification


def test_save_pretrained_writes_safetensors_and_remote_code(tmp_path):
    model = HybridForCausalLM(tiny_config("GLSA", tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert {"configuration_hybrid.py", "modeling_hybrid.py", "blocks.py", "cache_hybrid.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is HybridForCausalLM
    input_ids = torch.randint(3, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


REMOTE_LOAD = BLOCK_HYBRIDZOO_IMPORTS + textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    folder, inputs_file = sys.argv[1], sys.argv[2]
    data = torch.load(inputs_file)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "hybridzoo" not in sys.modules
    with torch.no_grad():
        diff = (model(data["input_ids"]).logits - data["logits"]).abs().max().item()
    generated = model.generate(data["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    classifier = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    print(json.dumps({"diff": diff, "generated": generated.tolist(), "class": type(model).__name__,
                      "base": type(base).__name__, "classifier": type(classifier).__name__}))
    """
)


def test_remote_code_loads_where_hybridzoo_is_not_installed(tmp_path):
    model = HybridForCausalLM(tiny_config("GLSA")).eval()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    input_ids = torch.randint(3, 64, (2, 7))
    with torch.no_grad():
        logits = model(input_ids).logits
    expected_generation = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.save({"input_ids": input_ids, "logits": logits}, tmp_path / "inputs.pt")

    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH",)}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder), str(tmp_path / "inputs.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["diff"] == 0.0
    assert report["generated"] == expected_generation.tolist()
    assert (report["class"], report["base"], report["classifier"]) == (
        "HybridForCausalLM",
        "HybridModel",
        "HybridForSequenceClassification",
    )


def test_block_initialisation_runs_and_loading_keeps_the_saved_values(tmp_path):
    model = HybridForCausalLM(tiny_config("LG"))
    lstm = model.model.layers[0].mixer.lstm
    size = lstm.hidden_size
    assert torch.all(lstm.bias_ih_l0[size : 2 * size] == 1.0)  # forget-gate bias 1, set by the block's own init
    gdn = model.model.layers[1].mixer
    assert torch.all((gdn.A_log.exp() >= 1) & (gdn.A_log.exp() <= 16))
    with torch.no_grad():
        lstm.bias_ih_l0.fill_(0.25)
        gdn.A_log.fill_(0.5)
    model.save_pretrained(tmp_path)
    loaded = HybridForCausalLM.from_pretrained(tmp_path)
    assert torch.all(loaded.model.layers[0].mixer.lstm.bias_ih_l0 == 0.25)
    assert torch.all(loaded.model.layers[1].mixer.A_log == 0.5)

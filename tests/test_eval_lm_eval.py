"""lm-evaluation-harness runs our task YAMLs on a saved hybridzoo model, fully offline, with `trust_remote_code`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridzoo.configs.zoo import zoo_config
from hybridzoo.evaluation.text_tokenizer import task_tokenizer
from hybridzoo.modeling import HybridForCausalLM

pytest.importorskip("lm_eval", reason="lm-eval is in the `eval` extra: pip install -e '.[eval]'")
TASKS_DIR = Path(__file__).resolve().parents[1] / "evaluation" / "lm_eval_tasks"


def test_lm_eval_scores_a_saved_model_offline(tmp_path):
    model_dir = tmp_path / "tiny"
    config = zoo_config("lstm-attention", "tiny", vocab_size=1024, hidden_size=32, num_hidden_layers=4,
                        intermediate_size=0, num_attention_heads=2, num_key_value_heads=1, eos_token_id=0,
                        bos_token_id=None, pad_token_id=0)
    HybridForCausalLM(config).save_pretrained(model_dir)
    task_tokenizer(1024).save_pretrained(model_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="2")
    metadata = {"lengths": [64], "depths": [0.5], "num_examples": 4, "seed": 0, "vocab_size": 1024}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
               f"pretrained={model_dir},trust_remote_code=True,dtype=float32", "--device", "cpu",
               "--batch_size", "4", "--include_path", str(TASKS_DIR), "--tasks", "hybridzoo_passkey",
               "--metadata", json.dumps(metadata), "--output_path", str(tmp_path / "out")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results_files = list((tmp_path / "out").rglob("results*.json"))
    assert results_files, result.stdout[-2000:]
    scores = json.loads(results_files[0].read_text())["results"]["hybridzoo_passkey"]
    assert 0.0 <= scores["acc,none"] <= 1.0 and scores["perplexity,none"] > 1.0
    assert json.loads(results_files[0].read_text())["n-samples"]["hybridzoo_passkey"]["effective"] == 4

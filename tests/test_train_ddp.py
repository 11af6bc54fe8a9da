"""Two-process CPU DDP with `accelerate launch` (gloo): both ranks end with the same weights, on different data."""

import json
import os
import subprocess
import sys
import textwrap

import torch
import yaml

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from accelerate import PartialState
    from hybridzoo.recipes import data, train, trainer

    seen = []
    real_batch = data.TensorData.batch
    def logged(self, position, batch_size):
        seen.append(position)
        return real_batch(self, position, batch_size)
    data.TensorData.batch = logged

    captured = {}
    real_save = trainer.save_final
    def save_final(accelerator, model, *args):
        captured["weights"] = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        captured["type"] = accelerator.distributed_type.value
        return real_save(accelerator, model, *args)
    trainer.save_final = save_final

    train(sys.argv[1])
    rank = PartialState().process_index
    torch.save(captured["weights"], f"{sys.argv[2]}/weights-{rank}.pt")
    json.dump({"positions": seen, "type": captured["type"]}, open(f"{sys.argv[2]}/rank-{rank}.json", "w"))
    """
)


def test_two_process_cpu_launch_trains_one_model(tmp_path):
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "model": {"zoo": "qwen3-next-style", "size": "tiny",
                  "overrides": {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 48,
                                "block_types": ["gated_deltanet", "attention"]}},
        "data": {"source": "stdlib", "max_documents": 6, "context_length": 32, "validation_fraction": 0.2,
                 "cache_dir": str(tmp_path / "cache")},
        "tokenizer": {"vocab_size": 320},
        "train": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "warmup_steps": 1},
        "eval": {"every": 0, "batches": 2},
        "checkpoint": {"every": 2},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29533", str(tmp_path / "script.py"), str(tmp_path / "recipe.yaml"), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["type"] == "MULTI_CPU" for r in ranks)  # real DDP, not two independent runs
    # 3 steps x 2 micro-batches per rank; positions interleave so the ranks read disjoint rows of one stream
    assert ranks[0]["positions"] == [0, 4, 8, 12, 16, 20] and ranks[1]["positions"] == [2, 6, 10, 14, 18, 22]
    weights = [torch.load(tmp_path / f"weights-{r}.pt") for r in (0, 1)]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-2"]
    # accelerate's save_state: the weights in safetensors, each rank's own RNG state
    saved = {p.name for p in (tmp_path / "out" / "checkpoints" / "step-2").iterdir()}
    assert {"model.safetensors", "random_states_0.pkl", "random_states_1.pkl"} <= saved

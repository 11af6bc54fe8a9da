"""Shared test helpers: tiny model configs (a few thousand parameters each, so the suite is fast on 2 CPU cores)
and two comparisons used by the op tests."""

from __future__ import annotations

from hybridzoo import HybridConfig
from hybridzoo.modeling.blocks import BLOCK_LETTERS

PAD, BOS, EOS = 0, 1, 2


def tiny_config(pattern: str = "GGGA", num_layers: int | None = None, **overrides) -> HybridConfig:
    """A tiny model of the given block pattern; grouped KV heads and GVA on so those paths are exercised."""
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers or len(pattern or "A"),
        block_pattern=pattern,
        num_attention_heads=4,
        num_key_value_heads=2,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        sliding_window=4,
        lstm_hidden_size=24,
        mamba_head_dim=6,  # 10 heads of 6 sharing B, C in 2 groups: head_dim != 64 and G > 1
        mamba_num_heads=10,
        mamba_n_groups=2,
        mamba_d_state=8,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    fields.update(overrides)
    return HybridConfig(**fields)


# every registered block alone, plus mixes; a newly registered block is tested automatically
SINGLE_BLOCK_PATTERNS = sorted(BLOCK_LETTERS)
MIXED_PATTERNS = ["GGGA", "LA", "GLSA", "".join(sorted(BLOCK_LETTERS))]
ALL_PATTERNS = SINGLE_BLOCK_PATTERNS + MIXED_PATTERNS


def random_linear_grads(outputs, inputs, seed: int = 1):
    """Gradients of a fixed random linear function of all `outputs` w.r.t. `inputs` (compares backward passes)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=generator, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def assert_all_close(actual, expected) -> None:
    """`torch.testing.assert_close` over two equally long sequences of tensors."""
    import torch

    for x, y in zip(actual, expected, strict=True):
        torch.testing.assert_close(x, y)


# Prepended to the scripts that load a saved or pushed model in a fresh process: the folder's own remote code must be
# what runs, so importing the installed package (or the repo's top-level folders) fails there.
BLOCK_HYBRIDZOO_IMPORTS = """
import importlib.abc, sys
class BlockHybridzoo(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hybridzoo", "modeling"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, BlockHybridzoo())
"""


def run_cli(command: str, recipe_path, *args: str):
    """`hybridzoo COMMAND RECIPE ARGS` in a fresh process (one thread, no progress bars), output captured."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "hybridzoo.cli", command, str(recipe_path), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_then_resume(command: str, recipe_path, checkpoint, output_dir) -> str:
    """Start a run, kill -9 it once `checkpoint` exists, check it left no final weights, resume it to the end.

    Returns the resumed run's output."""
    import signal
    import time

    killed = run_cli(command, recipe_path)
    deadline = time.time() + 300
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before it could be killed; make it longer"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (output_dir / "model.safetensors").exists()
    resumed = run_cli(command, recipe_path, "--resume")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    return output

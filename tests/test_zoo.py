"""The zoo: every preset builds, and its closed-form sizes match a real model and a filled cache."""

import pytest
import torch

from hybridzoo import HybridForCausalLM
from hybridzoo.cli import main
from hybridzoo.configs.zoo import ARCHITECTURES, SIZES, describe, zoo_config
from hybridzoo.modeling import CACHE_NAME

EXPECTED_MILLIONS = {"small": (15, 35), "base": (95, 180), "large": (700, 1500)}


def _available(name: str) -> bool:
    from hybridzoo.modeling.blocks import BLOCK_LETTERS

    return all(letter in BLOCK_LETTERS for letter in ARCHITECTURES[name].pattern)


ARCHITECTURE_NAMES = [name for name in ARCHITECTURES if _available(name)]


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
@pytest.mark.parametrize("size", list(SIZES))
def test_parameter_formula_matches_the_instantiated_model(name, size):
    config = zoo_config(name, size)
    device = "cpu" if size == "tiny" else "meta"  # large presets are shape-only on a CPU
    with torch.device(device):
        model = HybridForCausalLM(config)
    counted = sum(p.numel() for p in model.parameters())
    assert describe(config)["parameters"] == counted
    if size in EXPECTED_MILLIONS:
        low, high = EXPECTED_MILLIONS[size]
        assert low <= counted / 1e6 <= high, f"{name} {size}: {counted / 1e6:.1f}M"


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_state_and_kv_formulas_match_the_cache_after_prefill(name):
    config = zoo_config(name, "tiny")
    model = HybridForCausalLM(config).eval()
    length = 96  # longer than the tiny sliding window, to see it capped
    with torch.no_grad():
        cache = getattr(model(torch.randint(0, config.vocab_size, (1, length)), use_cache=True), CACHE_NAME)
    info = describe(config, dtype_bytes=4)
    measured = cache.state_bytes()
    assert measured["recurrent"] == info["recurrent_state_bytes"]
    expected_kv = 0
    for layer_idx, block_name in enumerate(config.block_types):
        block = model.model.layers[layer_idx].mixer
        if not block.is_recurrent:
            # transformers' sliding layer keeps the last window - 1 tokens between calls
            tokens = min(length, config.sliding_window - 1) if block_name == "sliding_attention" else length
            expected_kv += tokens * block.kv_bytes_per_token(config, 4)
    assert measured["kv"] == expected_kv
    if "sliding_attention" not in config.block_types:
        assert measured["kv"] == length * info["kv_bytes_per_token"]


def test_overrides_and_unknown_names():
    config = zoo_config("qwen3-next-style", "tiny", hidden_size=96, num_attention_heads=6)
    assert config.hidden_size == 96 and config.block_types[:4] == ["gated_deltanet"] * 3 + ["attention"]
    with pytest.raises(ValueError, match="qwen3-next-style"):
        zoo_config("qwen3-nxt", "tiny")
    with pytest.raises(ValueError, match="small"):
        zoo_config("transformer", "medium")


def test_cli_lists_the_zoo_and_shows_a_config(capsys):
    main(["zoo", "--size", "tiny"])
    table = capsys.readouterr().out
    for name in ARCHITECTURE_NAMES:
        assert f"| {name} |" in table
    main(["zoo", "show", "lstm-attention", "--size", "tiny"])
    shown = capsys.readouterr().out
    assert '"block_types"' in shown and '"lstm"' in shown


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_has_the_sources_layout(name, size):
    """Count the layers: the pattern repeated whole (xLSTM[7:1] is 7:1 at every size), or cycled where the source
    itself cycles it (RecurrentGemma's (R, R, A) over 26 layers)."""
    from hybridzoo.modeling.blocks import BLOCK_CLASSES

    architecture = ARCHITECTURES[name]
    config = zoo_config(name, size)
    letters = "".join(BLOCK_CLASSES[block].pattern_letter for block in config.block_types)
    depth, period = config.num_hidden_layers, len(architecture.pattern)
    if not architecture.cycle:
        assert depth % period == 0, f"{name} {size}: {depth} layers cut the pattern {architecture.pattern!r}"
    assert letters == (architecture.pattern * (depth // period + 1))[:depth]




def test_a_depth_that_cuts_a_repeating_pattern_is_rejected():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        zoo_config("xlstm", "tiny", num_hidden_layers=12)
    assert len(zoo_config("griffin-style", "tiny", num_hidden_layers=7).block_types) == 7  # the source cycles

"""`HybridConfig`: the pattern shorthand, the derived `layer_types`, and an error naming the field for bad input."""

import pytest

from hybridzoo import HybridConfig
from tiny_models import tiny_config


def test_pattern_is_repeated_over_the_depth():
    config = tiny_config("GGGA", num_layers=8)
    assert config.block_types == ["gated_deltanet"] * 3 + ["attention"] + ["gated_deltanet"] * 3 + ["attention"]
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + [
        "full_attention"
    ]


def test_block_types_and_transformers_layer_types():
    config = tiny_config(None, num_layers=4, block_types=["lstm", "sliding_attention", "gated_deltanet", "attention"])
    assert config.layer_types == ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]


def test_round_trip_through_json(tmp_path):
    config = tiny_config("GLSA", num_layers=8)
    config.save_pretrained(tmp_path)
    loaded = HybridConfig.from_pretrained(tmp_path)
    assert loaded.block_types == config.block_types
    assert loaded.layer_types == config.layer_types
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(block_pattern="GQA"), "block_pattern"),
        (dict(block_pattern="GGA", num_hidden_layers=4), "num_hidden_layers"),
        (dict(block_pattern=None, block_types=["attention", "mamba"], num_hidden_layers=2), "block_types"),
        (dict(block_pattern=None, block_types=["attention"], num_hidden_layers=2), "block_types"),
        (dict(block_pattern="GA", block_types=["attention", "attention"], num_hidden_layers=2), "block_types"),
        (dict(layer_types=["full_attention"] * 4), "layer_types"),
        (dict(hidden_size=30, head_dim=None), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(linear_num_value_heads=3), "linear_num_value_heads"),
        (dict(hidden_size=-32), "hidden_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(intermediate_size=-1), "intermediate_size"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(block_pattern="S", num_hidden_layers=1, sliding_window=None), "sliding_window"),
        (dict(linear_chunk_size=0), "linear_chunk_size"),
        (dict(block_pattern="A", num_hidden_layers=1, linear_num_key_heads="x"), "linear_num_key_heads"),  # unused
    ],
)
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(Exception, match=field):
        tiny_config(
            **({"pattern": overrides.pop("block_pattern")} if "block_pattern" in overrides else {}), **overrides
        )


def test_unknown_letter_error_lists_the_allowed_letters():
    with pytest.raises(Exception) as error:
        tiny_config("GQA", num_layers=3)
    assert "A (attention)" in str(error.value) and "G (gated_deltanet)" in str(error.value)

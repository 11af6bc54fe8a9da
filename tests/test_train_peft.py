"""LoRA on every block type: adapters change every targeted block, save, reload and merge to the same logits."""

import pytest
import torch

from hybridzoo import HybridForCausalLM
from hybridzoo.modeling.block_gated_deltanet import HybridGatedDeltaNet
from hybridzoo.recipes.peft_utils import apply_lora, block_lora_targets, default_lora_targets, load_lora, lora_config
from tiny_models import MIXED_PATTERNS, tiny_config

PACKED_POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]] * 2)  # packed rows take the LSTM's step loop


def outputs(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits, model(input_ids, position_ids=PACKED_POSITIONS).logits


@pytest.mark.parametrize("pattern", MIXED_PATTERNS[-1:])  # every registered block in one model
def test_lora_covers_every_block_and_round_trips(pattern, tmp_path):
    # float64: merging rounds differently from the adapter's separate product, and ten layers of random adapters
    # amplify fp32 rounding to ~1e-4 in the logits; in float64 the merge must agree to 1e-10
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(pattern)).double().eval()
    input_ids = torch.randint(3, 64, (2, 10))
    base = outputs(model, input_ids)
    config = lora_config(model, r=4)
    config.init_lora_weights = False  # random B, so every adapter changes the output
    peft_model = apply_lora(model, config)
    targeted = set(peft_model.targeted_module_names)
    for index, layer in enumerate(model.model.layers):
        for suffix in block_lora_targets(type(layer.mixer)):
            assert f"model.layers.{index}.{suffix}" in targeted
    assert not any("conv1d" in name or "lm_head" in name for name in targeted)
    adapted = outputs(peft_model, input_ids)
    for before, after in zip(base, adapted, strict=True):
        assert (before - after).abs().max() > 1e-3

    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = load_lora(HybridForCausalLM(tiny_config(pattern)).double().eval(), tmp_path)
    for expected, actual in zip(adapted, outputs(reloaded, input_ids), strict=True):
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    merged = reloaded.merge_and_unload()
    assert type(merged) is HybridForCausalLM
    for expected, actual in zip(adapted, outputs(merged, input_ids), strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)


def test_lstm_adapter_alone_reaches_both_lstm_code_paths():
    model = HybridForCausalLM(tiny_config("LA")).eval()
    input_ids = torch.randint(3, 64, (2, 10))
    base = outputs(model, input_ids)
    config = lora_config(model, r=2, target_modules=["mixer.lstm"])
    config.init_lora_weights = False
    peft_model = apply_lora(model, config)
    assert peft_model.targeted_module_names == ["model.layers.0.mixer.lstm"]
    fused, looped = outputs(peft_model, input_ids)
    assert (fused - base[0]).abs().max() > 1e-3 and (looped - base[1]).abs().max() > 1e-3
    # the LoRA update of the fused path equals an nn.LSTM with the adapted weights (independent reference)
    lstm = peft_model.base_model.model.model.layers[0].mixer.lstm
    reference = torch.nn.LSTM(lstm.get_base_layer().input_size, lstm.get_base_layer().hidden_size, batch_first=True)
    with torch.no_grad():
        reference.load_state_dict({**lstm.get_base_layer().state_dict(), "weight_ih_l0": lstm.weight_ih_l0,
                                   "weight_hh_l0": lstm.weight_hh_l0})
        x = torch.randn(2, 5, lstm.get_base_layer().input_size)
        torch.testing.assert_close(lstm(x)[0], reference(x)[0])


def test_a_target_that_matches_nothing_is_an_error():
    model = HybridForCausalLM(tiny_config("GA"))
    with pytest.raises(ValueError, match=r"'mixer\.qkv' matches no module .* silent no-op"):
        lora_config(model, target_modules=["mixer.q_proj", "mixer.qkv"])


def test_an_unknown_block_type_asks_for_explicit_targets(monkeypatch):
    model = HybridForCausalLM(tiny_config("GA"))
    monkeypatch.setattr(HybridGatedDeltaNet, "lora_targets", ())
    with pytest.raises(ValueError, match=r"No default LoRA targets for block type\(s\) \['gated_deltanet'\].*q_proj"):
        lora_config(model)


def test_a_plain_lora_config_works_as_for_llama():
    """`import hybridzoo` registers PEFT defaults: no `target_modules` needed; the targets are the blocks' own, except
    the LSTM cell, which needs hybridzoo's own LoRA layer (`lora_config`)."""
    from peft import LoraConfig, get_peft_model

    pattern = MIXED_PATTERNS[-1]
    model = HybridForCausalLM(tiny_config(pattern))
    expected = {name for name in default_lora_targets(model) if not name.endswith("mixer.lstm")}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
    assert set(peft_model.targeted_module_names) == expected
    assert any(name.endswith("mixer.b_proj") for name in expected) and any("mlp.up_proj" in n for n in expected)

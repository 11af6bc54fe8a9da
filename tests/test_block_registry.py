"""A block defined outside the package (tests/toy_block_plugin: an ops file and a block file) plus one registration
line gets everything a built-in block gets: config fields with validation, the zoo listing, training, LoRA with a
plain `LoraConfig`, caching, save/load, and remote-code loading where neither hybridzoo nor the plugin is installed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, get_peft_model
from toy_block_plugin.block_toy import HybridToy
from transformers import AutoModelForCausalLM

from hybridzoo import HybridConfig, HybridForCausalLM, register_block
from hybridzoo.configs.zoo import describe, zoo_table
from hybridzoo.modeling import CACHE_NAME
from hybridzoo.modeling.blocks import BLOCK_CLASSES, unregister_block
from tiny_models import BLOCK_HYBRIDZOO_IMPORTS, PAD, tiny_config


@pytest.fixture(autouse=True)
def toy_registered():
    register_block(HybridToy)  # the one registration line
    yield
    unregister_block("toy")


def toy_model(**overrides) -> HybridForCausalLM:
    return HybridForCausalLM(tiny_config("TA", num_layers=4, toy_width=16, **overrides))


def test_config_fills_checks_and_saves_the_blocks_own_fields(tmp_path):
    config = tiny_config("TA", num_layers=2)
    assert config.block_types == ["toy", "attention"] and config.layer_types == ["linear_attention", "full_attention"]
    assert (config.toy_width, config.toy_max_decay) == (config.hidden_size, 0.99)  # default_from and default
    with pytest.raises(Exception, match=r"`toy_max_decay` must be a number in \(0, 1\), got 1.5"):
        tiny_config("TA", num_layers=2, toy_max_decay=1.5)
    with pytest.raises(Exception, match="`toy_width` must be a positive integer for toy blocks"):
        tiny_config("TA", num_layers=2, toy_width=0)
    tiny_config("GA", num_layers=2, toy_width=0)  # cross-field checks only for blocks the model has
    config = tiny_config("TA", num_layers=2, toy_max_decay=0.5)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["toy_max_decay"] == 0.5
    assert HybridConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_registration_refuses_clashes():
    class Clash(HybridToy):
        block_type = "toy2"

    with pytest.raises(ValueError, match="letter 'T' is already used by block type 'toy'"):
        register_block(Clash)
    Clash.pattern_letter = "Q"
    with pytest.raises(ValueError, match="toy_width"):  # same field name, declared again by another block
        Clash.config_fields = (HybridToy.config_fields[0].__class__("toy_width", 1, "again"),)
        register_block(Clash)
    assert "toy2" not in BLOCK_CLASSES


def test_zoo_lists_the_block_and_its_formulas_match_a_real_model():
    table = zoo_table("tiny")
    assert "| T | toy |" in table and "4·W (fp32 h)" in table and "in_proj, out_proj" in table
    config = tiny_config("TA", num_layers=4, toy_width=16)
    model = HybridForCausalLM(config).eval()
    info = describe(config)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        cache = getattr(model(torch.randint(3, 64, (1, 12)), use_cache=True), CACHE_NAME)
    assert cache.state_bytes()["recurrent"] == info["recurrent_state_bytes"] == 2 * 4 * 16


def test_training_lowers_the_loss():
    model = toy_model()
    batch = torch.randint(3, 64, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_plain_lora_config_adapts_the_blocks_targets():
    model = toy_model()
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
    targeted = set(peft_model.targeted_module_names)
    for index in (0, 2):  # the toy layers
        assert {f"model.layers.{index}.mixer.in_proj", f"model.layers.{index}.mixer.out_proj"} <= targeted


def greedy(model, input_ids, steps: int, use_cache: bool) -> torch.Tensor:
    """Greedy decoding by hand: one new token per forward with the cache, or the whole sequence again without it."""
    tokens, cache, step_input = input_ids, None, input_ids
    with torch.no_grad():
        for _ in range(steps):
            if use_cache:
                out = model(step_input, **{CACHE_NAME: cache}, use_cache=True)
                cache = getattr(out, CACHE_NAME)
            else:
                out = model(tokens, use_cache=False)
            step_input = out.logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, step_input], dim=1)
    return tokens


def test_cached_generation_equals_recomputing_and_padding_is_honoured():
    model = toy_model().eval()
    input_ids = torch.randint(3, 64, (2, 7))
    uncached = greedy(model, input_ids, 6, use_cache=False)
    assert torch.equal(greedy(model, input_ids, 6, use_cache=True), uncached)
    generated = model.generate(input_ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=PAD)
    assert torch.equal(generated, uncached)
    with torch.no_grad():
        full = model(input_ids).logits
        first = model(input_ids[:, :4], use_cache=True)
        rest = model(input_ids[:, 4:], **{CACHE_NAME: getattr(first, CACHE_NAME)}, use_cache=True).logits
        torch.testing.assert_close(torch.cat([first.logits, rest], dim=1), full, atol=1e-5, rtol=1e-5)
        padded = torch.cat([torch.full((2, 3), PAD), input_ids], dim=1)
        mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(input_ids)], dim=1)
        torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], full, atol=1e-5, rtol=1e-5)


# neither hybridzoo nor the plugin may be imported there: the saved folder's own copies must run
REMOTE_LOAD = BLOCK_HYBRIDZOO_IMPORTS.replace('"modeling")', '"modeling", "toy_block_plugin")')
REMOTE_LOAD += textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    folder, inputs_file = sys.argv[1], sys.argv[2]
    data = torch.load(inputs_file)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert "hybridzoo" not in sys.modules and "toy_block_plugin" not in sys.modules
    with torch.no_grad():
        diff = (model(data["input_ids"]).logits - data["logits"]).abs().max().item()
    generated = model.generate(data["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixer = type(model.model.layers[0].mixer)
    print(json.dumps({"diff": diff, "generated": generated.tolist(), "mixer": mixer.__name__,
                      "module": mixer.__module__}))
    """
)


def test_save_load_and_remote_code_carry_the_block(tmp_path):
    model = toy_model(toy_max_decay=0.9).eval()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    files = set(os.listdir(folder))
    assert {"block_toy.py", "ops_toy.py", "blocks_external.py", "block_base.py"} <= files
    assert "from .block_base import" in (folder / "block_toy.py").read_text()  # made self-contained
    input_ids = torch.randint(3, 64, (2, 7))
    with torch.no_grad():
        logits = model(input_ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # installed package, block registered
    assert type(loaded.model.layers[0].mixer) is HybridToy and loaded.config.toy_max_decay == 0.9
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, logits, atol=0, rtol=0)

    expected_generation = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.save({"input_ids": input_ids, "logits": logits}, tmp_path / "inputs.pt")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD, str(folder), str(tmp_path / "inputs.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["diff"] == 0.0 and report["generated"] == expected_generation.tolist()
    assert report["mixer"] == "HybridToy" and report["module"].startswith("transformers_modules.")


def test_a_model_without_external_blocks_ships_the_empty_list(tmp_path):
    HybridForCausalLM(tiny_config("GA", num_layers=2)).save_pretrained(tmp_path)
    assert "block_toy.py" not in os.listdir(tmp_path)
    assert "EXTERNAL_BLOCKS: list = []" in (tmp_path / "blocks_external.py").read_text()

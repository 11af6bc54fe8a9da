"""`hybridzoo convert`: tiny random models of each supported transformers class, saved with `save_pretrained` and
converted, give the source's logits (fp32 and fp64), its logits when decoding token by token, its greedy tokens and its
gradients. The reference is always transformers' own model: its uncached full forward where its cache is known to be
wrong (RecurrentGemma restarts the conv window on multi-token continuations; xLSTM's cache rounds head dims up).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    BambaConfig,
    BambaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
    RecurrentGemmaConfig,
    RecurrentGemmaForCausalLM,
    xLSTMConfig,
    xLSTMForCausalLM,
)
from transformers.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5TextConfig

from hybridzoo import HybridForCausalLM
from hybridzoo.cli import main as cli_main
from hybridzoo.convert import (
    ConversionError,
    UnsupportedCheckpoint,
    convert_checkpoint,
    convert_state_dict,
    export_checkpoint,
)
from hybridzoo.modeling import CACHE_NAME
from tiny_models import BLOCK_HYBRIDZOO_IMPORTS, random_linear_grads

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _qwen_fields() -> dict:
    return dict(
        **COMMON, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, max_position_embeddings=128,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    )


SOURCES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, attention_bias=True, mlp_bias=True,
    )),
    "qwen3_next": lambda: Qwen3NextForCausalLM(Qwen3NextConfig(**_qwen_fields(), num_experts=0)),
    "qwen3_5": lambda: Qwen3_5ForCausalLM(Qwen3_5TextConfig(**_qwen_fields())),
    "recurrent_gemma": lambda: RecurrentGemmaForCausalLM(RecurrentGemmaConfig(
        **COMMON, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        lru_width=32, attention_window_size=6, conv1d_width=4, logits_soft_cap=30.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )),
    "xlstm": lambda: xLSTMForCausalLM(xLSTMConfig(
        **COMMON, num_blocks=2, num_heads=4, ffn_proj_factor=1.5, ffn_round_up_to_multiple_of=16, chunk_size=4,
        mode="inference", max_inference_chunksize=1024, tie_word_embeddings=False,
    )),
    # saved with weight_mode="fused" (see `save_source`); transformers cannot build a fused model itself (its init
    # slices the fused gate bias with the wrong length), so the reference is the same weights in single mode
    "xlstm_fused_bias": lambda: xLSTMForCausalLM(xLSTMConfig(
        **COMMON, num_blocks=2, num_heads=4, ffn_proj_factor=1.5, ffn_round_up_to_multiple_of=16, chunk_size=4,
        mode="inference", max_inference_chunksize=1024, use_bias=True, eps=1e-4,
    )),
    # grouped B/C and head_dim 8 (!= 64): where Mamba-2 implementations have had bugs
    "mamba2": lambda: Mamba2ForCausalLM(Mamba2Config(
        **COMMON, num_hidden_layers=2, num_heads=8, head_dim=8, expand=2, n_groups=2, state_size=16, chunk_size=8,
        tie_word_embeddings=True,
    )),
    "bamba": lambda: BambaForCausalLM(BambaConfig(
        **COMMON, intermediate_size=48, num_hidden_layers=4, attn_layer_indices=[2], num_attention_heads=4,
        num_key_value_heads=2, mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=16,
        mamba_chunk_size=8, max_position_embeddings=128,
    )),
}
FUSED_XLSTM = {
    "mlstm_layer.qkv_opreact": ("mlstm_layer.q", "mlstm_layer.k", "mlstm_layer.v", "mlstm_layer.ogate_preact"),
    "mlstm_layer.ifgate_preact": ("mlstm_layer.igate_preact", "mlstm_layer.fgate_preact"),
    "ffn.proj_up_gate_z": ("ffn.proj_up_gate", "ffn.proj_up"),
}
# sources whose forward runs in float64 end to end; the others cast to float32 inside (Qwen3-Next / Qwen3.5 run the
# delta rule in float32, RecurrentGemma accumulates its scan in float32, xLSTM's native kernels return float32), so
# in float64 they agree only to float32 precision
FULL_FP64 = {"llama"}
# whose own cache gives the full forward's answers (otherwise decode is compared with their uncached forward)
# (Bamba's own cached decode drifts from its full forward by ~1e-2 from the first decoded token in transformers 5.24)
CACHE_OK = {"llama", "qwen3_next", "qwen3_5", "mamba2"}


def random_source(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny source model with every parameter moved off its init (zero-centred norms then matter)."""
    torch.manual_seed(seed)
    model = SOURCES[name]().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def save_source(name: str, model: torch.nn.Module, folder: Path) -> None:
    """`save_pretrained`, and for the fused xLSTM the same weights rewritten in xLSTM's fused layout."""
    model.save_pretrained(folder)
    if name != "xlstm_fused_bias":
        return
    weights = load_file(folder / "model.safetensors")
    for block in range(model.config.num_blocks):
        prefix = f"backbone.blocks.{block}."
        for fused, parts in FUSED_XLSTM.items():
            for kind in ("weight", "bias"):
                weights[f"{prefix}{fused}.{kind}"] = torch.cat([weights.pop(f"{prefix}{p}.{kind}") for p in parts])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "weight_mode": "fused"}))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (source model, converted folder); built once per source."""
    cache = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            source = random_source(name)
            save_source(name, source, folder / "source")
            cache[name] = (source, convert_checkpoint(folder / "source", folder / "converted", quiet=True))
        return cache[name]

    return get


def _source_logits(source, input_ids):
    return source(input_ids, use_cache=False).logits


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_logits_match_source_fp32_and_fp64(converted, name):
    source, folder = converted(name)
    model = HybridForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _relative(model(input_ids).logits, _source_logits(source, input_ids)) < 1e-4
        source64, model64 = source.double(), model.double()
        tolerance = 1e-10 if name in FULL_FP64 else 1e-5
        assert _relative(model64(input_ids).logits, _source_logits(source64, input_ids)) < tolerance
    source.float()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_prefill_then_token_by_token_decode_matches_source(converted, name):
    source, folder = converted(name)
    model = HybridForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _source_logits(source, input_ids)
        out = model(input_ids[:, :5], use_cache=True)
        pieces, cache = [out.logits], getattr(out, CACHE_NAME)
        for t in range(5, 12):
            out = model(input_ids[:, t : t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
            cache = getattr(out, CACHE_NAME)
        assert _relative(torch.cat(pieces, dim=1), expected) < 1e-4
        if name in CACHE_OK:  # their own cached decode agrees too
            # the installed transformers' name for the cache (`cache` since 5.24; Mamba-2 never took
            # `past_key_values`, and silently decodes from an empty cache when given it)
            out = source(input_ids[:, :5], use_cache=True)
            theirs, their_cache = [out.logits], getattr(out, CACHE_NAME)
            for t in range(5, 12):
                out = source(input_ids[:, t : t + 1], **{CACHE_NAME: their_cache}, use_cache=True)
                theirs.append(out.logits)
                their_cache = getattr(out, CACHE_NAME)
            assert _relative(torch.cat(pieces, dim=1), torch.cat(theirs, dim=1)) < 1e-4


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_greedy_generate_32_tokens_matches_source(converted, name):
    source, folder = converted(name)
    model = HybridForCausalLM.from_pretrained(folder).eval()
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    generated = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    if name in CACHE_OK:
        expected = source.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert torch.equal(generated, expected)
        return
    # reference where their cache is wrong: greedy decoding with their full uncached forward, one token at a time
    tokens = prompt
    with torch.no_grad():
        for _ in range(32):
            logits = _source_logits(source, tokens)[:, -1]
            logits[:, 2] = float("-inf")  # min_new_tokens: EOS suppressed
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_gradients_match_source(converted, name):
    source, folder = converted(name)
    model = HybridForCausalLM.from_pretrained(folder, dtype=torch.float64).train()
    source = source.double().train()
    if name.startswith("xlstm"):  # its "inference" kernels are not for backprop; "train" needs T % chunk_size == 0
        source.config.mode = "train"
    input_ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    source_params = dict(source.named_parameters())
    theirs = random_linear_grads([source(input_ids, use_cache=False).logits.double()], list(source_params.values()))
    ours_params = dict(model.named_parameters())
    ours = random_linear_grads([model(input_ids, use_cache=False).logits], list(ours_params.values()))
    source.float().eval()
    source.config.mode = "inference" if name.startswith("xlstm") else getattr(source.config, "mode", None)
    # their gradients go through the same map as their weights (a split weight's gradient is the split gradient)
    their_grads = dict(zip(source_params, theirs, strict=True))
    if source.config.tie_word_embeddings:
        their_grads.pop("lm_head.weight", None)
    _, mapped = convert_state_dict(source.config, their_grads)
    our_grads = dict(zip(ours_params, ours, strict=True))
    assert set(mapped) == set(our_grads) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    tolerance = 1e-10 if name in FULL_FP64 else 1e-4
    worst = max((_relative(our_grads[key], grad), key) for key, grad in mapped.items())
    assert worst[0] < tolerance, worst


def test_output_folder_loads_without_hybridzoo(converted, tmp_path):
    """The folder (weights, config, remote code, card) loads with trust_remote_code where hybridzoo is not installed."""
    source, folder = converted("qwen3_next")
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "modeling_hybrid.py", "README.md"} <= files
    card = (folder / "README.md").read_text()
    assert "Qwen3NextForCausalLM" in card and str((folder.parent / "source").resolve()) in card
    input_ids = [[5, 9, 17, 33, 4, 8]]
    with torch.no_grad():
        expected = _source_logits(source, torch.tensor(input_ids))
    torch.save(expected, tmp_path / "expected.pt")
    script = BLOCK_HYBRIDZOO_IMPORTS + textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(torch.tensor({input_ids})).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-4
        print("OK")
    """)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
    # and with hybridzoo installed, without remote code
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is HybridForCausalLM


def test_tokenizer_and_generation_config_are_copied(tmp_path):
    source = random_source("llama")
    source.generation_config.temperature = 0.7
    source.generation_config.do_sample = True
    source.save_pretrained(tmp_path / "source")
    (tmp_path / "source" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    folder = convert_checkpoint(tmp_path / "source", tmp_path / "out", quiet=True)
    assert json.loads((folder / "tokenizer_config.json").read_text()) == {"model_max_length": 128}
    assert json.loads((folder / "generation_config.json").read_text())["temperature"] == 0.7


def test_unknown_and_missing_keys_stop_with_the_list_and_write_nothing(tmp_path):
    source = random_source("llama")
    source.save_pretrained(tmp_path / "source")
    weights = load_file(tmp_path / "source" / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_extra.weight"] = torch.zeros(2)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "source" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(tmp_path / "source", tmp_path / "out", quiet=True)
    message = str(error.value)
    assert "model.layers.0.self_attn.rotary_extra.weight" in message
    assert "model.layers.1.mlp.up_proj.weight" in message
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]  # no temporary folder left behind


def test_moe_checkpoint_is_rejected(tmp_path):
    fields = _qwen_fields()
    config = Qwen3NextConfig(**fields, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=16)
    Qwen3NextForCausalLM(config).save_pretrained(tmp_path / "source")
    with pytest.raises(UnsupportedCheckpoint, match="MoE"):
        convert_checkpoint(tmp_path / "source", tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_pickled_weights_are_refused(tmp_path):
    random_source("llama").save_pretrained(tmp_path / "source")
    (tmp_path / "source" / "model.safetensors").rename(tmp_path / "source" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights are never loaded"):
        convert_checkpoint(tmp_path / "source", tmp_path / "out", quiet=True)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    random_source("llama").save_pretrained(tmp_path / "source")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_checkpoint(tmp_path / "source", tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert_checkpoint(tmp_path / "source", tmp_path / "out", overwrite=True, quiet=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()


def test_sharded_source_converts_shard_by_shard(tmp_path):
    source = random_source("llama")
    source.save_pretrained(tmp_path / "source", max_shard_size="20KB")
    shards = sorted((tmp_path / "source").glob("*.safetensors"))
    assert len(shards) > 2
    folder = convert_checkpoint(tmp_path / "source", tmp_path / "out", quiet=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(shards)
    model = HybridForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        assert _relative(model(input_ids).logits, _source_logits(source, input_ids)) < 1e-5


def test_cli_converts(tmp_path, capsys):
    random_source("xlstm").save_pretrained(tmp_path / "source")
    assert cli_main(["convert", str(tmp_path / "source"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert "converted" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["llama", "qwen3_next"])
def test_export_round_trip_is_bit_exact(converted, tmp_path, target):
    name = {"llama": "llama", "qwen3_next": "qwen3_next"}[target]
    source, folder = converted(name)
    exported = export_checkpoint(folder, tmp_path / "exported", target)
    original = load_file(folder.parent / "source" / "model.safetensors")
    back = load_file(exported / "model.safetensors")
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(reloaded) is type(source)
    input_ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids, use_cache=False).logits, _source_logits(source, input_ids))
    again = convert_checkpoint(exported, tmp_path / "again", quiet=True)
    ours, twice = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert set(ours) == set(twice) and all(torch.equal(ours[k], twice[k]) for k in ours)


def test_export_refuses_a_model_that_does_not_fit(tmp_path):
    from tiny_models import tiny_config

    HybridForCausalLM(tiny_config("GA")).save_pretrained(tmp_path / "hybrid")
    with pytest.raises(UnsupportedCheckpoint, match="block_types"):
        export_checkpoint(tmp_path / "hybrid", tmp_path / "out", "llama")
    assert not (tmp_path / "out").exists()


def test_hub_repo_id_source(tmp_path, monkeypatch):
    """SOURCE as a Hub repo id, downloaded through huggingface_hub from the project's local Hub-compatible server."""
    from huggingface_hub import HfApi

    from hybridzoo.testing.local_hub import LocalHub

    with LocalHub(tmp_path / "hub") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_testTOKENforLocalHub0123456789")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        source = random_source("recurrent_gemma")
        source.save_pretrained(tmp_path / "source")
        api = HfApi(endpoint=hub.endpoint)
        api.create_repo("local-user/tiny-recurrentgemma")
        api.upload_folder(folder_path=tmp_path / "source", repo_id="local-user/tiny-recurrentgemma")
        folder = convert_checkpoint("local-user/tiny-recurrentgemma", tmp_path / "out", quiet=True)
    assert "base_model: local-user/tiny-recurrentgemma" in (folder / "README.md").read_text()
    model = HybridForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        assert _relative(model(input_ids).logits, _source_logits(source, input_ids)) < 1e-4


def test_qwen3_5_vision_language_checkpoint_converts_its_language_model(tmp_path):
    """The released Qwen3.5 checkpoints are `Qwen3_5ForConditionalGeneration`: the text model converts, the vision
    tower is dropped, and text-only logits equal the vision-language model's."""
    from transformers.models.qwen3_5 import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = {k: v for k, v in _qwen_fields().items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config = Qwen3_5Config(
        text_config=text,
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
    )
    torch.manual_seed(0)
    source = Qwen3_5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    source.save_pretrained(tmp_path / "source")
    folder = convert_checkpoint(tmp_path / "source", tmp_path / "out", quiet=True)
    assert "model.visual" in (folder / "README.md").read_text()  # the dropped keys are named in the card
    model = HybridForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _relative(model(input_ids).logits, source(input_ids=input_ids, use_cache=False).logits) < 1e-4


def test_bf16_checkpoint_keeps_its_bits_and_zero_centred_norms(tmp_path):
    """A bf16 RecurrentGemma converts without any rounding: every tensor keeps its dtype and bits (zero-centred norm
    weights are stored as `w`, not as a rounded `1 + w`), and the bf16 model's logits stay with the source's."""
    source = random_source("recurrent_gemma").to(torch.bfloat16)
    source.save_pretrained(tmp_path / "source")
    folder = convert_checkpoint(tmp_path / "source", tmp_path / "out", quiet=True)
    theirs, ours = load_file(tmp_path / "source" / "model.safetensors"), load_file(folder / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert torch.equal(ours["model.norm.weight"], theirs["model.final_norm.weight"])  # w as stored, not 1 + w
    lambda_key = "model.layers.0.temporal_block.rg_lru.recurrent_param"
    assert torch.equal(ours["model.layers.0.mixer.a_param"], theirs[lambda_key])
    _, mapped = convert_state_dict(source.config, theirs)
    assert set(mapped) == set(ours) and all(torch.equal(mapped[k], ours[k]) for k in ours)
    model = HybridForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.bfloat16
    input_ids = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        assert _relative(model(input_ids).logits.float(), _source_logits(source, input_ids).float()) < 2e-2


@pytest.mark.parametrize(
    "name, field, value, match",
    [
        ("qwen3_next", "hidden_act", "gelu", "hidden_act"),
        ("recurrent_gemma", "hidden_activation", "gelu", "hidden_act"),
    ],
)
def test_activation_the_blocks_hard_code_is_rejected(tmp_path, name, field, value, match):
    model = random_source(name)
    setattr(model.config, field, value)
    model.save_pretrained(tmp_path / "source")
    with pytest.raises(UnsupportedCheckpoint, match=match):
        convert_checkpoint(tmp_path / "source", tmp_path / "out", quiet=True)

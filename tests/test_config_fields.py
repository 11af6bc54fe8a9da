"""Every field of `HybridConfig` does what it says or is rejected: none is silently ignored.

Each field is set to a value other than its default on a tiny model that has every block type; the model built from
the same seed must then differ observably (parameter shapes, outputs, the generation defaults), or the value must be
rejected with an error naming the field. A field added to the config without an entry here fails the first test.
"""

import dataclasses

import pytest
import torch
from transformers import PreTrainedConfig

from hybridzoo import HybridConfig, HybridForCausalLM
from hybridzoo.modeling import CACHE_NAME
from hybridzoo.modeling.blocks import block_fields
from tiny_models import tiny_config

PATTERN = "AGLMPRSUXD"  # every block type once (mamba2 last, so the layers before it keep their random init)
LONG = 20  # longer than the tiny sliding window and than the chunk sizes tried below

# field -> a value other than the default (for `tiny_config(PATTERN)`), chosen to be valid
CHANGED = {
    "vocab_size": 80,
    "hidden_size": 48,
    "intermediate_size": 32,
    "num_hidden_layers": 20,
    "block_types": ["attention", "gated_deltanet", "lstm", "mlstm", "rglru", "sliding_attention", "paragru", "mamba2"],
    "block_pattern": "GGLMPRSUXD",
    "hidden_act": "gelu",
    "max_position_embeddings": 16,  # read by dynamic RoPE scaling (checked with rope_type="dynamic")
    "initializer_range": 0.2,
    "rms_norm_eps": 1e-1,
    "use_cache": False,
    "pad_token_id": 5,
    "bos_token_id": 6,
    "eos_token_id": 7,
    "tie_word_embeddings": True,
    "num_attention_heads": 2,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
    "attention_bias": True,
    "attention_dropout": 0.5,
    "sliding_window": 9,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 4,
    "linear_value_head_dim": 4,
    "linear_conv_kernel_dim": 2,
    "linear_chunk_size": 4,
    "linear_allow_neg_eigval": True,
    "lstm_hidden_size": 16,
    "mlstm_num_heads": 2,
    "mlstm_qk_dim_factor": 0.25,
    "mlstm_v_dim_factor": 0.5,
    "mlstm_input_gate": "sigmoid",
    "mlstm_chunk_size": 4,
    "mlstm_gate_soft_cap": 2.0,
    "rglru_width": 48,
    "rglru_num_heads": 2,
    "rglru_conv_kernel_dim": 2,
    "rglru_chunk_size": 4,
    "slstm_num_heads": 2,
    "slstm_conv_kernel_dim": 0,
    "slstm_forget_gate": "exp",
    "pararnn_width": 48,
    "pararnn_num_heads": 2,
    "pararnn_conv_kernel_dim": 2,
    "rnn_solver": "sequential",  # same states to the Newton tolerance, different rounding (see tests/test_pararnn.py)
    "newton_max_iter": 0,  # every solve finishes sequentially (rounding differs; the fallback is counted)
    "newton_tol": 0.5,  # accepts a far-off first guess
    "attention_output_gate": True,
    "attention_qk_norm": True,
    "attention_out_bias": True,
    "rms_norm_zero_centered": True,
    "rms_norm_bias": True,
    "mlp_bias": True,
    "embedding_scale": 2.0,
    "final_logit_softcapping": 0.5,
    "mlstm_eps": 1.0,
    "mlstm_use_bias": True,
    "mamba_num_heads": 4,
    "mamba_head_dim": 4,
    "mamba_n_groups": 5,
    "mamba_d_state": 4,
    "mamba_conv_kernel": 2,
    "mamba_conv_bias": False,
    "mamba_proj_bias": True,
    "mamba_chunk_size": 4,
    "mamba_dt_min": 0.01,
    "mamba_dt_max": 0.5,
    "mamba_dt_init_floor": 0.05,
    "mamba_dt_min_limit": 0.05,
    "mamba_dt_max_limit": 0.01,
}
# fields that change how the same stored weights are read: compared with the base model's weights loaded into both
SAME_WEIGHTS = {"rms_norm_zero_centered"}


def _own_fields() -> list[str]:
    """HybridConfig's own dataclass fields plus every registered block's fields (declared on the block classes)."""
    inherited = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    own = [f.name for f in dataclasses.fields(HybridConfig) if f.name not in inherited]
    return own + list(block_fields())


def test_every_field_is_covered():
    assert sorted(CHANGED) == sorted(_own_fields())


def _config(**overrides) -> HybridConfig:
    if "block_types" in overrides:
        return tiny_config(None, num_layers=len(overrides["block_types"]), **overrides)
    pattern = overrides.pop("block_pattern", PATTERN)
    return tiny_config(pattern, num_layers=overrides.pop("num_hidden_layers", len(PATTERN)), **overrides)


def _observe(config: HybridConfig, train: bool = False) -> dict:
    """What a user can observe of a model: parameter shapes, logits, cache, generation defaults."""
    torch.manual_seed(0)
    model = HybridForCausalLM(config).train(train)
    input_ids = torch.randint(8, 64, (2, LONG), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    with torch.no_grad():
        out = model(input_ids)
    return {
        "shapes": {name: tuple(p.shape) for name, p in model.named_parameters()},
        "logits": out.logits,
        "cache": getattr(out, CACHE_NAME) is not None,
        "generation": model.generation_config.to_dict(),
        "padding_idx": model.model.embed_tokens.padding_idx,
    }


def _differs(a: dict, b: dict) -> bool:
    if a["shapes"] != b["shapes"] or a["logits"].shape != b["logits"].shape:
        return True
    return (
        not torch.equal(a["logits"], b["logits"])
        or a["cache"] != b["cache"]
        or a["generation"] != b["generation"]
        or a["padding_idx"] != b["padding_idx"]
    )


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_field_changes_the_model(field):
    base, changed = {}, {field: CHANGED[field]}
    if field == "max_position_embeddings":  # only a scaled RoPE reads it
        rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
        base, changed = {"rope_parameters": dict(rope)}, {"rope_parameters": dict(rope), field: CHANGED[field]}
    train = field == "attention_dropout"  # dropout acts in training mode only
    if field in SAME_WEIGHTS:
        torch.manual_seed(0)
        base_model, changed_model = HybridForCausalLM(_config(**base)), HybridForCausalLM(_config(**changed))
        changed_model.load_state_dict(base_model.state_dict())
        input_ids = torch.randint(8, 64, (2, LONG), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert not torch.equal(base_model(input_ids).logits, changed_model(input_ids).logits), field
        return
    assert _differs(_observe(_config(**base), train), _observe(_config(**changed), train)), field


def test_partial_rotary_factor_rotates_part_of_each_head_like_qwen3_next():
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding
    from transformers.models.qwen3_next.modeling_qwen3_next import apply_rotary_pos_emb as reference_rotary

    from hybridzoo.modeling.layers import HybridRotaryEmbedding, apply_rotary_pos_emb

    config = tiny_config("A", partial_rotary_factor=0.5, head_dim=16)
    reference_config = Qwen3NextConfig(
        hidden_size=32, num_attention_heads=4, head_dim=16, partial_rotary_factor=0.5, rope_theta=10000.0
    )
    q, k = torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 16)
    position_ids = torch.arange(7)[None].expand(2, 7)
    cos, sin = HybridRotaryEmbedding(config)(q, position_ids)
    ref_cos, ref_sin = Qwen3NextRotaryEmbedding(reference_config)(q, position_ids)
    assert cos.shape[-1] == 8
    torch.testing.assert_close((cos, sin), (ref_cos, ref_sin))
    torch.testing.assert_close(apply_rotary_pos_emb(q, k, cos, sin), reference_rotary(q, k, ref_cos, ref_sin))
    # a scaled RoPE type with a partial factor works too (it used to crash)
    scaled = tiny_config("A", partial_rotary_factor=0.5, rope_parameters={"rope_type": "linear", "factor": 2.0})
    HybridForCausalLM(scaled)(torch.randint(3, 64, (1, 5)))


@pytest.mark.parametrize("factor", [0.0, 1.5, 0.1])
def test_partial_rotary_factor_out_of_range_is_rejected(factor):
    with pytest.raises(Exception, match="partial_rotary_factor"):
        tiny_config("A", partial_rotary_factor=factor)

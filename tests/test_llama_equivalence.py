"""An all-attention hybrid is a Llama: loaded with a `LlamaForCausalLM`'s weights it gives the same logits."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hybridzoo import HybridConfig, HybridForCausalLM

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    pad_token_id=0,
)


def _llama_to_hybrid(state_dict: dict) -> dict:
    renames = {".self_attn.": ".mixer.", ".post_attention_layernorm.": ".post_mixer_layernorm."}
    converted = {}
    for key, value in state_dict.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        converted[key] = value
    return converted


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_all_attention_hybrid_matches_llama(attn_implementation):
    llama = LlamaForCausalLM(LlamaConfig(**SIZES, rope_theta=10000.0)).eval()
    hybrid_config = HybridConfig(
        **SIZES, block_pattern="A", rope_parameters={"rope_type": "default", "rope_theta": 1e4}
    )
    hybrid = HybridForCausalLM(hybrid_config).eval()
    missing, unexpected = hybrid.load_state_dict(_llama_to_hybrid(llama.state_dict()), strict=True)
    assert not missing and not unexpected
    llama.set_attn_implementation(attn_implementation)
    hybrid.set_attn_implementation(attn_implementation)

    input_ids = torch.randint(1, 64, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    input_ids[1, :4] = 0
    with torch.no_grad():
        expected = llama(input_ids, attention_mask=attention_mask).logits
        actual = hybrid(input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=1e-5)

    generated = hybrid.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False)
    reference = llama.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(generated, reference)

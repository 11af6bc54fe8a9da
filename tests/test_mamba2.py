"""The `mamba2` block against transformers' `Mamba2Mixer` (pure-torch path on CPU) with the same weights: prefill,
token by token through each side's cache, prefix + multi-token continuation, left padding, gradients. Grouped B/C
(G = 2) and head_dim 8 (!= 64) throughout. Whole models (`Mamba2ForCausalLM`, `BambaForCausalLM`: logits, cached
decode, greedy generation, gradients) are checked through the real converter in tests/test_convert.py."""


import pytest
import torch
import transformers
from transformers import DynamicCache, Mamba2Config
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

from hybridzoo import HybridConfig
from hybridzoo.modeling.block_mamba2 import HybridMamba2
from tiny_models import random_linear_grads

transformers.logging.set_verbosity_error()  # "mamba_ssm is not installed, falling back to torch" on every call

HIDDEN, HEADS, HEAD_DIM, GROUPS, D_STATE = 32, 8, 8, 2, 16


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_config(**overrides) -> Mamba2Config:
    fields = dict(
        hidden_size=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM, expand=HEADS * HEAD_DIM // HIDDEN, n_groups=GROUPS,
        state_size=D_STATE, conv_kernel=4, chunk_size=8, num_hidden_layers=2, vocab_size=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    fields.update(overrides)
    return Mamba2Config(**fields)


def hybrid_config(reference: Mamba2Config, **overrides) -> HybridConfig:
    """The HybridConfig with the same Mamba-2 layer (and, for the model test, the same model: no MLP, tied or not)."""
    low, high = reference.time_step_limit
    fields = dict(
        vocab_size=reference.vocab_size,
        hidden_size=reference.hidden_size,
        intermediate_size=0,
        num_hidden_layers=reference.num_hidden_layers,
        block_pattern="D",
        mamba_num_heads=reference.num_heads,
        mamba_head_dim=reference.head_dim,
        mamba_n_groups=reference.n_groups,
        mamba_d_state=reference.state_size,
        mamba_conv_kernel=reference.conv_kernel,
        mamba_conv_bias=reference.use_conv_bias,
        mamba_proj_bias=reference.use_bias,
        mamba_dt_min_limit=low,
        mamba_dt_max_limit=None if high == float("inf") else high,
        rms_norm_eps=reference.layer_norm_epsilon,
        tie_word_embeddings=reference.tie_word_embeddings,
        pad_token_id=reference.pad_token_id,
        bos_token_id=reference.bos_token_id,
        eos_token_id=reference.eos_token_id,
    )
    fields.update(overrides)
    return HybridConfig(**fields)


def randomise_(mixer: torch.nn.Module) -> None:
    """Move the per-head parameters away from their structured init, so that a mixed-up head or group shows."""
    with torch.no_grad():
        mixer.A_log.uniform_(-1, 2)
        mixer.dt_bias.normal_()
        mixer.D.normal_()
        mixer.norm.weight.normal_()
        mixer.conv1d.bias.normal_()


def layer_pair(dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    reference = reference_config(**overrides)
    mixer = Mamba2Mixer(reference, 0).to(dtype).eval()
    randomise_(mixer)
    block = HybridMamba2(hybrid_config(reference)).to(dtype).eval()
    assert not block.load_state_dict(mixer.state_dict()).missing_keys  # the same parameter names, one to one
    return mixer, block


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(actual, expected, atol=tol * max(1.0, expected.abs().max().item()), rtol=tol)


def test_prefill_and_gradients_equal():
    mixer, block = layer_pair()
    x = torch.randn(2, 45, HIDDEN)  # not a multiple of either chunk size (transformers 8, ours 64)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, (y, _) = mixer(x_ref), block(x_ours)
    close(y, y_ref)
    names = [name for name, _ in mixer.named_parameters()]
    ours = dict(block.named_parameters())
    grads_ref = random_linear_grads([y_ref], [x_ref, *mixer.parameters()])
    grads = random_linear_grads([y], [x_ours, *(ours[name] for name in names)])
    for name, grad, grad_ref in zip(["input", *names], grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, atol=1e-4 * grad_ref.abs().max().item(), rtol=1e-4, msg=name)


def test_dt_limits_are_applied_like_transformers():
    mixer, block = layer_pair(time_step_limit=(0.05, 0.3))
    assert block.dt_limit == (0.05, 0.3)
    x = torch.randn(2, 20, HIDDEN)
    with torch.no_grad():
        close(block(x)[0], mixer(x))


def test_token_by_token_and_continuation_through_both_caches():
    """Prefill 10, continue with 7 tokens at once, then one token at a time: outputs and final states equal."""
    mixer, block = layer_pair()
    x = torch.randn(2, 24, HIDDEN)
    cache = DynamicCache(config=mixer_config(mixer))
    pieces = [(0, 10), (10, 17)] + [(t, t + 1) for t in range(17, 24)]
    state, ours, theirs = None, [], []
    with torch.no_grad():
        for lo, hi in pieces:
            theirs.append(mixer(x[:, lo:hi], cache=cache))
            y, state = block(x[:, lo:hi], state)
            ours.append(y)
        full_ref = mixer(x)
    close(torch.cat(ours, 1), torch.cat(theirs, 1))
    close(torch.cat(ours, 1), full_ref)
    conv_state, ssm_state = state
    close(ssm_state, cache.layers[0].recurrent_states[0])
    # transformers keeps K inputs [B, C, K]; the block keeps the K - 1 the next token needs, [B, K - 1, C]
    close(conv_state, cache.layers[0].conv_states[0][..., 1:].transpose(1, 2))


def mixer_config(mixer: Mamba2Mixer) -> Mamba2Config:
    return reference_config(num_hidden_layers=1)


def test_left_padding_equals_transformers_and_each_row_alone():
    mixer, block = layer_pair()
    x = torch.randn(3, 12, HIDDEN)
    lengths = [12, 5, 9]
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, 12 - n :] = True
    with torch.no_grad():
        y, state = block(x, mask=mask)
        y_ref = mixer(x, attention_mask=mask.long())
        for row, n in enumerate(lengths):
            close(y[row, 12 - n :], y_ref[row, 12 - n :])
            alone, alone_state = block(x[row : row + 1, 12 - n :])
            close(y[row : row + 1, 12 - n :], alone)
            close(state[1][row : row + 1], alone_state[1])
            close(state[0][row : row + 1], alone_state[0])


def test_reset_equals_separate_documents():
    """A document start clears the SSM state and the conv window: a packed row equals its documents run alone."""
    _, block = layer_pair()
    x = torch.randn(1, 30, HIDDEN)
    starts = [0, 11, 13, 22]
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, starts[1:]] = True
    with torch.no_grad():
        y, state = block(x, reset=reset)
        bounds = starts + [30]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            alone, alone_state = block(x[:, lo:hi])
            close(y[:, lo:hi], alone)
        close(state[1], alone_state[1])
        close(state[0], alone_state[0])


def test_float64_chunked_block_equals_token_loop():
    """In float64 the chunked prefill and the token-by-token path agree to 1e-10, gradients included."""
    _, block = layer_pair(dtype=torch.float64)
    x = torch.randn(2, 40, HIDDEN, dtype=torch.float64, requires_grad=True)
    y_chunk, state_chunk = block(x)
    state, steps = None, []
    for t in range(40):
        y_t, state = block(x[:, t : t + 1], state)
        steps.append(y_t)
    y_steps = torch.cat(steps, 1)
    torch.testing.assert_close(y_chunk, y_steps, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state_chunk[1], state[1], atol=1e-10, rtol=1e-10)
    params = [x, *block.parameters()]
    grads_chunk, grads_steps = random_linear_grads([y_chunk], params), random_linear_grads([y_steps], params)
    for g_chunk, g_steps in zip(grads_chunk, grads_steps, strict=True):
        torch.testing.assert_close(g_chunk, g_steps, atol=1e-10, rtol=1e-10)


def test_config_errors_name_the_field():
    with pytest.raises(Exception, match="mamba_n_groups"):
        HybridConfig(hidden_size=32, num_hidden_layers=1, block_pattern="D", mamba_num_heads=6, mamba_n_groups=4)
    with pytest.raises(Exception, match="mamba_dt_max_limit"):
        HybridConfig(hidden_size=32, num_hidden_layers=1, block_pattern="D", mamba_dt_max_limit=0.0)
    with pytest.raises(Exception, match="mamba_dt_min"):
        HybridConfig(hidden_size=32, num_hidden_layers=1, block_pattern="D", mamba_dt_min=0.5, mamba_dt_max=0.1)
    config = HybridConfig(hidden_size=64, num_hidden_layers=1, block_pattern="D", mamba_head_dim=16)
    assert HybridMamba2(config).num_heads == 8  # None: Mamba-2's expand 2, inner width 2 * hidden

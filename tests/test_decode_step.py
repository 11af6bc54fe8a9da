"""The no-autograd fast paths of decoding equal the general forward: the single-token steps of the Gated DeltaNet,
attention, Mamba-2, mLSTM and RG-LRU blocks and the gated MLP's fused GEMM; the weights they keep in derived form
follow every change of the weights (and of the settings they read), and wrapped or hooked modules are never
bypassed."""

import pytest
import torch
from torch import nn

from hybridzoo import HybridForCausalLM
from hybridzoo.modeling.block_gated_deltanet import HybridGatedDeltaNet
from hybridzoo.modeling.block_mamba2 import HybridMamba2
from hybridzoo.modeling.block_mlstm import HybridMLSTM
from hybridzoo.modeling.block_rglru import HybridRGLRU
from hybridzoo.modeling.layers import HybridMLP, plain_linears
from tiny_models import tiny_config


def full_and_stepped(block: HybridGatedDeltaNet, x: torch.Tensor, prompt: int):
    """The block over all of `x` at once, and over `x[:, :prompt]` then one token at a time (the decode step)."""
    with torch.no_grad():
        full, full_state = block(x)
        first, state = block(x[:, :prompt])
        pieces = [first]
        for t in range(prompt, x.shape[1]):
            y, state = block(x[:, t : t + 1], state)
            pieces.append(y)
    return (full, full_state), (torch.cat(pieces, dim=1), state)


@pytest.mark.parametrize("neg_eigval", [False, True])
def test_decode_step_equals_forward(neg_eigval):
    torch.manual_seed(0)
    block = HybridGatedDeltaNet(tiny_config("G", linear_allow_neg_eigval=neg_eigval)).eval()
    (full, (full_conv, full_matrix)), (stepped, state) = full_and_stepped(block, torch.randn(3, 7, 32), prompt=4)
    torch.testing.assert_close(stepped, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(state[0], full_conv)
    torch.testing.assert_close(state[1], full_matrix, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_decode_step_equals_forward_in_other_dtypes(dtype):
    """float64 keeps float64 throughout (the step used to mix in float32 and fail); bfloat16 rounds as `forward`."""
    torch.manual_seed(0)
    block = HybridGatedDeltaNet(tiny_config("G", linear_num_value_heads=8)).eval().to(dtype)
    x = torch.randn(2, 6, 32, dtype=dtype)
    (full, (_, full_matrix)), (stepped, state) = full_and_stepped(block, x, prompt=4)
    assert state[1].dtype == full_matrix.dtype
    tolerance = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(stepped, full, **tolerance)
    torch.testing.assert_close(state[1], full_matrix, **tolerance)


def test_kept_projection_weight_follows_weight_changes():
    torch.manual_seed(0)
    block = HybridGatedDeltaNet(tiny_config("G")).eval()
    x = torch.randn(1, 5, 32)

    def step_output():
        with torch.no_grad():
            _, state = block(x[:, :4])
            return block(x[:, 4:], state)[0]

    def reference():  # the autograd path concatenates the current weights every call
        _, state = block(x[:, :4])
        return block(x[:, 4:], tuple(s.detach() for s in state))[0].detach()

    torch.testing.assert_close(step_output(), reference())
    with torch.no_grad():
        block.v_proj.weight.mul_(2.0)  # in place, like an optimizer step
    torch.testing.assert_close(step_output(), reference())
    block.a_proj.weight.data = torch.randn_like(block.a_proj.weight)  # swapped storage, like module.to()
    torch.testing.assert_close(step_output(), reference())
    # the kept conv taps and decay constants follow their parameters too
    with torch.no_grad():
        block.A_log.add_(0.5)
        block.dt_bias.mul_(-1.0)
    torch.testing.assert_close(step_output(), reference())
    block.conv1d.weight.data = torch.randn_like(block.conv1d.weight)
    torch.testing.assert_close(step_output(), reference())
    # the output norm's weight is folded into o_proj's in the step: both followed
    with torch.no_grad():
        block.norm.weight.copy_(torch.rand_like(block.norm.weight) + 0.5)
    torch.testing.assert_close(step_output(), reference())
    block.o_proj.weight.data = torch.randn_like(block.o_proj.weight)
    torch.testing.assert_close(step_output(), reference())
    block.norm.variance_epsilon = 0.3  # a setting the kept form also depends on
    torch.testing.assert_close(step_output(), reference())


@pytest.mark.parametrize("hooked", ["o_proj", "norm", "q_proj"])
def test_decode_step_runs_hooked_modules(hooked):
    """A forward hook (what PEFT and accelerate attach) on a module the step would otherwise fold away still runs."""
    torch.manual_seed(0)
    block = HybridGatedDeltaNet(tiny_config("G")).eval()
    x = torch.randn(2, 6, 32)
    calls = []

    def double(module, args, output):
        calls.append(module)
        return output * 2

    getattr(block, hooked).register_forward_hook(double)
    (full, _), (stepped, _) = full_and_stepped(block, x, prompt=4)
    assert len(calls) == 4  # the prompt's forward, then each of the three single-token steps
    torch.testing.assert_close(stepped, full, atol=1e-6, rtol=1e-5)


def mlp_config(**overrides):
    return tiny_config("G", **overrides)


def test_fused_mlp_equals_the_three_projections():
    torch.manual_seed(0)
    mlp = HybridMLP(mlp_config())
    x = torch.randn(3, 5, 32)

    def reference():  # with autograd on: the three nn.Linear calls
        return mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).detach()

    for change in (None, "in place", "swapped"):
        if change == "in place":
            with torch.no_grad():
                mlp.up_proj.weight.mul_(-1.5)  # like an optimizer step
        elif change == "swapped":
            mlp.down_proj.weight.data = torch.randn_like(mlp.down_proj.weight)  # like module.to()
        with torch.no_grad():
            fused = mlp(x)
        assert "_derived_from_weights" in mlp.__dict__  # the fused path ran
        torch.testing.assert_close(fused, reference(), atol=1e-6, rtol=1e-5)


def test_fused_mlp_is_skipped_where_it_must_not_run():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32)
    large = HybridMLP(mlp_config())
    large.fused_max_weights = 3 * 32 * 48 - 1  # one weight over the limit: no copy kept
    with_bias = HybridMLP(mlp_config(mlp_bias=True))
    hooked = HybridMLP(mlp_config())
    hooked.gate_proj.register_forward_hook(lambda module, args, output: output * 2)
    for mlp in (large, with_bias, hooked):
        reference = mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).detach()
        with torch.no_grad():
            torch.testing.assert_close(mlp(x), reference)
        assert "_derived_from_weights" not in mlp.__dict__


def test_plain_linears_sees_wrappers():
    linear = nn.Linear(4, 4)
    assert plain_linears([linear])
    hooked = nn.Linear(4, 4)
    hooked.register_forward_pre_hook(lambda module, args: None)
    replaced = nn.Linear(4, 4)
    replaced.forward = lambda x: x  # how accelerate's offloading hooks wrap a module
    subclass = type("LoraLinear", (nn.Linear,), {})(4, 4)
    for module in (hooked, replaced, subclass):
        assert not plain_linears([linear, module])


def test_large_blocks_keep_no_weight_copies(monkeypatch):
    """Above `FUSED_MAX_WEIGHTS` the step keeps no fused projections (their decoding is bound by reading the weights,
    a copy would only double them) and still equals the forward."""
    import hybridzoo.modeling.block_gated_deltanet as gdn_module

    monkeypatch.setattr(gdn_module, "FUSED_MAX_WEIGHTS", 32 * 8 - 1)  # under both the input and output projections
    torch.manual_seed(0)
    block = HybridGatedDeltaNet(tiny_config("G")).eval()
    (full, _), (stepped, _) = full_and_stepped(block, torch.randn(2, 6, 32), prompt=4)
    kept = block._kept_tensors()
    assert kept.projection is None and kept.output_projection is None
    torch.testing.assert_close(stepped, full, atol=1e-6, rtol=1e-5)


ATTENTION_VARIANTS = {
    "llama": {},
    "no grouping": {"num_key_value_heads": 4},
    "qwen3-next options": {  # output gate, zero-centred q/k norms, a quarter of each head rotated
        "attention_output_gate": True,
        "attention_qk_norm": True,
        "rms_norm_zero_centered": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    },
    "biases": {"attention_bias": True, "attention_out_bias": True},
}


def logits_step_by_step(model, prompt: torch.Tensor, steps: int, fast: bool) -> torch.Tensor:
    """Logits of the prompt's prefill, then of `steps` given tokens fed one at a time through the cache; without
    autograd (`fast`: the decode steps' fast paths run) or with it (the general paths)."""
    context = torch.no_grad() if fast else torch.enable_grad()
    tokens = torch.arange(3, 3 + steps).view(1, -1).expand(prompt.shape[0], -1)
    with context:
        out = model(prompt, use_cache=True)
        logits, cache = [out.logits[:, -1:].detach()], out.past_key_values
        for t in range(steps):
            out = model(tokens[:, t : t + 1], cache=cache, use_cache=True)
            logits.append(out.logits.detach())
            cache = out.past_key_values
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("variant", sorted(ATTENTION_VARIANTS))
@pytest.mark.parametrize("pattern", ["AA", "SA"])
def test_attention_decode_step_equals_forward(variant, pattern):
    """The attention block's single-token step (one fused GEMM, q/k norms and RoPE in one pass, SDPA called directly)
    against its general forward. The sliding-window layer (window 4) takes the step while its mask is None, within
    the window, and the general path once a mask limits it: the prompt starts inside the window and decoding leaves
    it."""
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(pattern, **ATTENTION_VARIANTS[variant])).eval()
    with torch.no_grad():  # non-trivial norm weights and biases
        for name, parameter in model.named_parameters():
            if "norm" in name or "bias" in name:
                parameter.normal_(0.0, 0.3)
    prompt = torch.randint(3, 64, (2, 2))
    fast = logits_step_by_step(model, prompt, 6, fast=True)
    assert all("_derived_from_weights" in layer.mixer.__dict__ for layer in model.model.layers)  # the step ran
    torch.testing.assert_close(fast, logits_step_by_step(model, prompt, 6, fast=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hooked", ["q_proj", "o_proj", "q_norm"])
def test_attention_decode_step_is_skipped_for_hooked_modules(hooked):
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config("A", **ATTENTION_VARIANTS["qwen3-next options"])).eval()
    attention = model.model.layers[0].mixer
    getattr(attention, hooked).register_forward_hook(lambda module, args, output: output * 2)
    prompt = torch.randint(3, 64, (1, 6))
    fast = logits_step_by_step(model, prompt, 3, fast=True)
    assert "_derived_from_weights" not in attention.__dict__
    torch.testing.assert_close(fast, logits_step_by_step(model, prompt, 3, fast=False), atol=1e-5, rtol=1e-5)


MAMBA2_VARIANTS = {
    "grouped B, C": {},  # tiny_config: 10 heads of 6 sharing B, C in 2 groups
    "one group, biases, dt limits": {
        "mamba_n_groups": 1,
        "mamba_proj_bias": True,
        "mamba_dt_min_limit": 0.01,
        "mamba_dt_max_limit": 0.05,
    },
    "no conv bias": {"mamba_conv_bias": False},
}


def stepped_like_full(block, x: torch.Tensor, prompt: int):
    """(outputs, state) of the block over all of `x`, and over `x[:, :prompt]` then one token at a time."""
    with torch.no_grad():
        full = block(x)
        first, state = block(x[:, :prompt])
        pieces = [first]
        for t in range(prompt, x.shape[1]):
            y, state = block(x[:, t : t + 1], state)
            pieces.append(y)
    return full, (torch.cat(pieces, dim=1), state)


@pytest.mark.parametrize("variant", sorted(MAMBA2_VARIANTS))
def test_mamba2_decode_step_equals_forward(variant):
    torch.manual_seed(0)
    block = HybridMamba2(tiny_config("D", **MAMBA2_VARIANTS[variant])).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, D away from 1
        for name, parameter in block.named_parameters():
            if name in ("norm.weight", "D") or name.endswith("bias") and name != "dt_bias":
                parameter.normal_(1.0 if name == "D" else 0.0, 0.5)
    (full, (full_conv, full_ssm)), (stepped, (conv, ssm)) = stepped_like_full(block, torch.randn(2, 9, 32), prompt=5)
    assert "_derived_from_weights" in block.__dict__  # the step ran
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv, full_conv)
    torch.testing.assert_close(ssm, full_ssm, atol=1e-5, rtol=1e-5)
    block.norm.variance_epsilon = 0.3  # a setting the kept form depends on: rebuilt
    (full, _), (stepped, _) = stepped_like_full(block, torch.randn(2, 7, 32), prompt=5)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


MLSTM_VARIANTS = {
    "exp gate (xLSTM-7B)": {},
    "sigmoid gate": {"mlstm_input_gate": "sigmoid"},
    "biases, no soft cap": {"mlstm_use_bias": True, "mlstm_gate_soft_cap": None},
}


@pytest.mark.parametrize("variant", sorted(MLSTM_VARIANTS))
def test_mlstm_decode_step_equals_forward(variant):
    torch.manual_seed(0)
    block = HybridMLSTM(tiny_config("M", **MLSTM_VARIANTS[variant])).eval()
    with torch.no_grad():  # gates that write and forget noticeably, a non-trivial head norm
        block.igate_proj.bias.normal_(0.0, 1.0)
        block.fgate_proj.bias.normal_(2.0, 1.0)
        for name, parameter in block.norm.named_parameters():
            parameter.normal_(1.0 if name == "weight" else 0.0, 0.5)
    (full, full_state), (stepped, state) = stepped_like_full(block, torch.randn(2, 9, 32), prompt=5)
    assert "_derived_from_weights" in block.__dict__  # the step ran
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    for got, expected in zip(state, full_state, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    block.norm.variance_epsilon = 0.3  # a setting the kept form depends on: rebuilt
    (full, _), (stepped, _) = stepped_like_full(block, torch.randn(2, 7, 32), prompt=5)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"rglru_num_heads": 2, "rglru_conv_kernel_dim": 2}])
def test_rglru_decode_step_equals_forward(overrides):
    torch.manual_seed(0)
    block = HybridRGLRU(tiny_config("R", **overrides)).eval()
    with torch.no_grad():  # gate biases away from zero
        block.a_gate_bias.normal_(0.0, 1.0)
        block.x_gate_bias.normal_(0.0, 1.0)
    (full, (full_conv, full_h)), (stepped, (conv, h)) = stepped_like_full(block, torch.randn(3, 9, 32), prompt=5)
    assert "_derived_from_weights" in block.__dict__  # the step ran
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv, full_conv)
    torch.testing.assert_close(h, full_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("block_class", "pattern", "hooked"),
    [(HybridMamba2, "D", name) for name in ("in_proj", "out_proj", "norm")]
    + [(HybridMLSTM, "M", name) for name in ("q_proj", "fgate_proj", "norm", "o_proj")]
    + [(HybridRGLRU, "R", name) for name in ("linear_y", "linear_x", "out_proj")],
)
def test_recurrent_decode_steps_are_skipped_for_hooked_modules(block_class, pattern, hooked):
    """A forward hook (what PEFT and accelerate attach) on a module the Mamba-2, mLSTM or RG-LRU step would fold
    away keeps the general path, and the hook runs."""
    torch.manual_seed(0)
    block = block_class(tiny_config(pattern)).eval()
    getattr(block, hooked).register_forward_hook(lambda module, args, output: output * 2)
    (full, _), (stepped, _) = stepped_like_full(block, torch.randn(2, 7, 32), prompt=5)
    assert "_derived_from_weights" not in block.__dict__
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)

"""The `mlstm` op and block: the chunkwise and step forms against a literal loop of the published equations."""

import pytest
import torch

from hybridzoo import HybridConfig, HybridForCausalLM
from hybridzoo.modeling import CACHE_NAME
from hybridzoo.modeling.block_mlstm import HybridMLSTM
from hybridzoo.modeling.ops_mlstm import chunk_mlstm, mlstm, naive_recurrent_mlstm, recurrent_mlstm
from tiny_models import tiny_config

B, H, DK, DV = 2, 2, 4, 3
F64 = torch.float64


def _inputs(length: int, dtype=F64, gate_scale: float = 3.0):
    """q, k, v, input- and forget-gate pre-activations and a random initial state (C, n, m)."""
    q, k = torch.randn(B, length, H, DK, dtype=dtype), torch.randn(B, length, H, DK, dtype=dtype)
    v = torch.randn(B, length, H, DV, dtype=dtype)
    i = torch.randn(B, length, H, dtype=dtype) * gate_scale
    f = torch.randn(B, length, H, dtype=dtype) * 2 + 2
    state = (torch.randn(B, H, DK, DV, dtype=dtype), torch.randn(B, H, DK, dtype=dtype), torch.randn(B, H, dtype=dtype))
    return (q, k, v, i, f), state


def _masks(length: int, kind: str):
    """`mask` (random pads, a fully padded stretch) and/or `reset` (random document starts) for a scenario."""
    mask = reset = None
    if "mask" in kind:
        mask = torch.rand(B, length) > 0.3
        mask[0, 2:11] = False  # longer than a chunk of 4 or 8: whole chunks of padding
    if "reset" in kind:
        reset = torch.rand(B, length) > 0.8
        reset[1, 0] = True
    return mask, reset


def _run(fn, inputs, state, mask, reset, input_gate, **kwargs):
    """Outputs, final state and gradients of a fixed random loss w.r.t. every input and the initial state."""
    leaves = [x.clone().requires_grad_() for x in (*inputs, *state)]
    h, final = fn(*leaves[:5], tuple(leaves[5:]), mask, reset, input_gate, **kwargs)
    generator = torch.Generator().manual_seed(1)
    loss = 0
    for tensor in (h if mask is None else h * mask[..., None, None], *final):
        loss = loss + (tensor * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)).sum()
    loss.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return h.detach(), [s.detach() for s in final], grads


def _assert_same(result, reference, mask, atol=1e-9, rtol=1e-7):
    (h, state, grads), (ref_h, ref_state, ref_grads) = result, reference
    if mask is not None:  # outputs at padded steps are not defined
        h, ref_h = h[mask], ref_h[mask]
    torch.testing.assert_close(h, ref_h, atol=atol, rtol=rtol)
    for name, got, want in zip("Cnm", state, ref_state, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=f"state {name}")
    for name, got, want in zip(["q", "k", "v", "i", "f", "C0", "n0", "m0"], grads, ref_grads, strict=True):
        assert torch.isfinite(got).all(), f"non-finite gradient for {name}"
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=f"gradient of {name}")


SCENARIOS = ["plain", "reset", "mask", "mask+reset"]


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("kind", SCENARIOS)
@pytest.mark.parametrize("length, chunk_sizes", [(29, [4, 8, 64]), (16, [1, 8])])
def test_chunk_equals_naive_loop(input_gate, kind, length, chunk_sizes):
    """Lengths that are and are not multiples of the chunk, chunks longer than the sequence and of one token."""
    inputs, state = _inputs(length)
    mask, reset = _masks(length, kind)
    reference = _run(naive_recurrent_mlstm, inputs, state, mask, reset, input_gate)
    for chunk_size in chunk_sizes:
        result = _run(chunk_mlstm, inputs, state, mask, reset, input_gate, chunk_size=chunk_size)
        _assert_same(result, reference, mask)


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("kind", SCENARIOS)
def test_recurrent_equals_naive_loop(input_gate, kind):
    inputs, state = _inputs(11)
    mask, reset = _masks(11, kind)
    reference = _run(naive_recurrent_mlstm, inputs, state, mask, reset, input_gate)
    _assert_same(_run(recurrent_mlstm, inputs, state, mask, reset, input_gate), reference, mask)


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("fn", [chunk_mlstm, recurrent_mlstm, naive_recurrent_mlstm])
def test_padded_steps_are_identity_transitions(input_gate, fn):
    """A row with pads anywhere gives, at its real steps and in its final state, the result of the row without pads."""
    length = 19
    inputs, state = _inputs(length)
    mask, _ = _masks(length, "mask")
    mask[1, -3:] = False  # right padding too
    h, final = fn(*inputs, state, mask, None, input_gate)
    for row in range(B):
        real = mask[row]
        row_inputs = [x[row : row + 1, real] for x in inputs]
        row_state = tuple(s[row : row + 1] for s in state)
        row_h, row_final = naive_recurrent_mlstm(*row_inputs, row_state, input_gate=input_gate)
        torch.testing.assert_close(h[row, real], row_h[0])
        for got, want in zip(final, row_final, strict=True):
            torch.testing.assert_close(got[row], want[0])


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_reset_starts_each_document_from_a_fresh_state(input_gate):
    inputs, state = _inputs(20)
    reset = torch.zeros(B, 20, dtype=torch.bool)
    reset[:, 7] = reset[:, 15] = True
    h, final = chunk_mlstm(*inputs, state, None, reset, input_gate, chunk_size=4)
    pieces, carried = [], state
    for start, stop in [(0, 7), (7, 15), (15, 20)]:
        piece_h, carried = naive_recurrent_mlstm(
            *[x[:, start:stop] for x in inputs], carried if start == 0 else None, input_gate=input_gate
        )
        pieces.append(piece_h)
    torch.testing.assert_close(h, torch.cat(pieces, dim=1))
    for got, want in zip(final, carried, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_split_and_carry_equals_one_call(input_gate):
    inputs, state = _inputs(30)
    h, final = chunk_mlstm(*inputs, state, input_gate=input_gate, chunk_size=8)
    pieces, carried = [], state
    for start, stop, mode in [(0, 13, "chunk"), (13, 14, "recurrent"), (14, 17, "recurrent"), (17, 30, "chunk")]:
        piece_h, carried = mlstm(
            *[x[:, start:stop] for x in inputs], carried, input_gate=input_gate, chunk_size=8, mode=mode
        )
        pieces.append(piece_h)
    torch.testing.assert_close(torch.cat(pieces, dim=1), h)
    for got, want in zip(carried, final, strict=True):
        torch.testing.assert_close(got, want)


def test_float32_and_extreme_gates_stay_finite_and_close_to_float64():
    """Input-gate pre-activations of +-40 (exp(40) overflows float32 without the max-state) and bf16 inputs."""
    inputs, state = _inputs(40, gate_scale=40.0)
    reference, ref_state = naive_recurrent_mlstm(*inputs, state)
    h, final = chunk_mlstm(*[x.float() for x in inputs], tuple(s.float() for s in state), chunk_size=16)
    assert h.dtype == torch.float32 and all(s.dtype == torch.float32 for s in final)
    torch.testing.assert_close(h.double(), reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final[0].double(), ref_state[0], atol=1e-4, rtol=1e-4)
    h_bf16, final_bf16 = mlstm(*[x.bfloat16() for x in inputs], tuple(s.float() for s in state), chunk_size=16)
    assert h_bf16.dtype == torch.bfloat16 and final_bf16[0].dtype == torch.float32
    assert torch.isfinite(h_bf16).all()


def test_bad_options_are_refused():
    inputs, _ = _inputs(3)
    with pytest.raises(ValueError, match="input_gate"):
        mlstm(*inputs, input_gate="relu")
    with pytest.raises(ValueError, match="mode"):
        mlstm(*inputs, mode="parallel")


# --- the block


def _block(input_gate: str = "exp", chunk_size: int = 4) -> HybridMLSTM:
    config = tiny_config("M", mlstm_input_gate=input_gate, mlstm_chunk_size=chunk_size)
    block = HybridMLSTM(config).double()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(0, 0.5)
    return block


def test_block_init_sets_xlstm_gate_biases():
    block = HybridMLSTM(tiny_config("M", mlstm_num_heads=4))
    block.init_custom_parameters()
    torch.testing.assert_close(block.igate_proj.bias, torch.full((4,), -10.0))
    torch.testing.assert_close(block.fgate_proj.bias, torch.tensor([3.0, 4.0, 5.0, 6.0]))
    assert block.state_shapes() == {"C": (4, 4, 8), "n": (4, 4), "m": (4,)}


def test_block_matches_the_xlstm_layer_equations():
    """q, k, v, soft-capped gates -> mLSTM loop -> per-head LayerNorm -> sigmoid output gate -> out projection."""
    block = _block()
    x = torch.randn(2, 9, 32, dtype=F64)
    heads = block.num_heads

    def split(t):
        return t.view(2, 9, heads, -1)

    cap = block.gate_soft_cap
    h, _ = naive_recurrent_mlstm(
        split(block.q_proj(x)),
        split(block.k_proj(x)),
        split(block.v_proj(x)),
        cap * torch.tanh(block.igate_proj(x) / cap),
        cap * torch.tanh(block.fgate_proj(x) / cap),
    )
    normed = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=block.norm.variance_epsilon).flatten(-2)
    expected = block.o_proj(block.norm.weight * normed * torch.sigmoid(block.ogate_proj(x)))
    torch.testing.assert_close(block(x)[0], expected)


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_block_full_forward_equals_prefill_then_token_by_token(input_gate):
    block = _block(input_gate)
    x = torch.randn(2, 15, 32, dtype=F64)
    y_full, state_full = block(x)
    y_prefill, state = block(x[:, :9])
    pieces = [y_prefill]
    for t in range(9, 15):
        y_t, state = block(x[:, t : t + 1], state)
        pieces.append(y_t)
    torch.testing.assert_close(torch.cat(pieces, dim=1), y_full)
    for got, want in zip(state, state_full, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_block_left_padded_batch_equals_each_row_alone(input_gate):
    block = _block(input_gate)
    lengths = [11, 4, 7]
    x = torch.randn(3, 11, 32, dtype=F64)
    mask = torch.arange(11) >= (11 - torch.tensor(lengths))[:, None]
    y, state = block(x, mask=mask)
    for row, n in enumerate(lengths):
        y_row, state_row = block(x[row : row + 1, 11 - n :])
        torch.testing.assert_close(y[row, 11 - n :], y_row[0])
        for got, want in zip(state, state_row, strict=True):
            torch.testing.assert_close(got[row], want[0])


def test_block_reset_restarts_from_a_fresh_state():
    block = _block()
    x = torch.randn(1, 12, 32, dtype=F64)
    reset = torch.zeros(1, 12, dtype=torch.bool)
    reset[0, 5] = True
    y, _ = block(x, reset=reset)
    torch.testing.assert_close(y, torch.cat([block(x[:, :5])[0], block(x[:, 5:])[0]], dim=1))


# --- the block inside the model and the config


@pytest.mark.parametrize("pattern, input_gate", [("M", "exp"), ("MA", "sigmoid")])
def test_model_split_forward_and_generate(pattern, input_gate):
    model = HybridForCausalLM(tiny_config(pattern, mlstm_input_gate=input_gate, mlstm_chunk_size=4)).eval()
    input_ids = torch.randint(3, 64, (2, 11))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        first = model(input_ids[:, :6], use_cache=True)
        second = model(input_ids[:, 6:], **{CACHE_NAME: getattr(first, CACHE_NAME)}, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, atol=2e-5, rtol=1e-4)
    generated = model.generate(input_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    without_cache = model.generate(input_ids, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    torch.testing.assert_close(generated, without_cache)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mlstm_input_gate="relu"), "mlstm_input_gate"),
        (dict(mlstm_chunk_size=0), "mlstm_chunk_size"),
        (dict(mlstm_gate_soft_cap=-1.0), "mlstm_gate_soft_cap"),
        (dict(mlstm_num_heads=3), "mlstm_num_heads"),
        (dict(mlstm_qk_dim_factor=0.0), "mlstm_qk_dim_factor"),
    ],
)
def test_config_refuses_bad_mlstm_fields(overrides, field):
    with pytest.raises(Exception, match=field):  # transformers wraps the ValueError in a strict-dataclass error
        tiny_config("M", **overrides)


def test_config_defaults():
    config = HybridConfig(block_pattern="MA", num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    assert config.mlstm_num_heads == 4 and config.mlstm_input_gate == "exp" and config.mlstm_gate_soft_cap == 15.0

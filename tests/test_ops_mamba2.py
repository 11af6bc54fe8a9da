"""The Mamba-2 SSD ops against the literal token loop (float64 and float32, outputs and gradients) and against
transformers' own pure-torch chunk scan."""

import pytest
import torch

try:
    from hybridzoo.modeling import ops_mamba2 as ops
except ImportError:
    from modeling import ops_mamba2 as ops

# grouped B/C (G = 2 groups of 3 heads) and an odd head dim: where published implementations have had bugs
BATCH, HEADS, HEAD_DIM, GROUPS, D_STATE = 2, 6, 5, 2, 4
NAMES = ["x", "dt", "A", "B", "C", "h0"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core box OpenMP hand-offs can cost 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(
    length,
    batch=BATCH,
    heads=HEADS,
    head_dim=HEAD_DIM,
    groups=GROUPS,
    d_state=D_STATE,
    dtype=torch.float64,
    state=True,
    seed=0,
):
    """dt from tiny to ~2 and A from -0.1 to -8: decays per step from ~1 to ~1e-7."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, head_dim, generator=gen, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(batch, length, heads, generator=gen, dtype=dtype) * 2 - 1)
    A = -torch.empty(heads, dtype=dtype).uniform_(0.1, 8, generator=gen)
    B = torch.randn(batch, length, groups, d_state, generator=gen, dtype=dtype)
    C = torch.randn(batch, length, groups, d_state, generator=gen, dtype=dtype)
    h0 = torch.randn(batch, heads, head_dim, d_state, generator=gen, dtype=dtype) if state else None
    return [x, dt, A, B, C, h0]


def outputs_and_grads(fn, inputs, reset=None, **kwargs):
    """Run `fn`, backprop a fixed random linear function of (y, final state); return y, state and the input grads."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    x, dt, A, B, C, h0 = leaves
    y, state = fn(x, dt, A, B, C, initial_state=h0, reset=reset, **kwargs)
    gen = torch.Generator().manual_seed(123)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return y.detach(), state.detach(), grads


def assert_same(result, expected, atol=1e-10, rtol=1e-10):
    y, state, grads = result
    y_ref, state_ref, grads_ref = expected
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(state, state_ref, atol=atol, rtol=rtol)
    for name, grad, grad_ref in zip(NAMES, grads, grads_ref, strict=False):
        torch.testing.assert_close(grad, grad_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


def chunk_fn(chunk_size):
    return lambda *args, **kwargs: ops.chunk_ssd(*args, chunk_size=chunk_size, **kwargs)


def test_naive_loop_is_the_equation():
    """The oracle itself against the recurrence written per head and per group by hand (one row, float64)."""
    x, dt, A, B, C, h0 = make_inputs(5, batch=1)
    y, state = ops.naive_ssd(x, dt, A, B, C, initial_state=h0)
    per_group = HEADS // GROUPS
    for h in range(HEADS):
        g = h // per_group  # repeat_interleave: heads 0-2 read group 0, heads 3-5 group 1
        s = h0[0, h].clone()
        for t in range(5):
            s = torch.exp(dt[0, t, h] * A[h]) * s + dt[0, t, h] * torch.outer(x[0, t, h], B[0, t, g])
            torch.testing.assert_close(y[0, t, h], s @ C[0, t, g], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(state[0, h], s, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("length", [1, 7, 33, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_and_recurrent_match_naive(length, with_state):
    inputs = make_inputs(length, state=with_state)
    expected = outputs_and_grads(ops.naive_ssd, inputs)
    for chunk_size in (1, 4, 16, 64):  # 16 and 64 do not divide 33 or 100: the padded tail is exercised
        assert_same(outputs_and_grads(chunk_fn(chunk_size), inputs), expected)
    assert_same(outputs_and_grads(ops.recurrent_ssd, inputs), expected)


@pytest.mark.parametrize("groups, heads, head_dim, d_state", [(1, 4, 3, 8), (4, 4, 7, 2), (3, 12, 24, 16)])
def test_group_and_head_shapes(groups, heads, head_dim, d_state):
    """One group for all heads, one group per head, and several heads per group with head_dim 24 (!= 64)."""
    inputs = make_inputs(21, heads=heads, head_dim=head_dim, groups=groups, d_state=d_state)
    expected = outputs_and_grads(ops.naive_ssd, inputs)
    assert_same(outputs_and_grads(chunk_fn(8), inputs), expected)
    assert_same(outputs_and_grads(ops.recurrent_ssd, inputs), expected)


def test_float32_matches_float64_reference():
    """float32 inputs: outputs and gradients within 1e-4 (relative) of the float64 loop, at T = 300."""
    inputs = make_inputs(300, seed=3)
    expected = outputs_and_grads(ops.naive_ssd, inputs)
    inputs32 = [t.float() for t in inputs]
    for fn in (chunk_fn(64), ops.recurrent_ssd, ops.ssd):
        y, state, grads = outputs_and_grads(fn, inputs32)
        assert y.dtype == torch.float32 and state.dtype == torch.float32
        assert_same((y.double(), state.double(), [g.double() for g in grads]), expected, atol=1e-4, rtol=1e-4)


def reset_mask(length, positions_per_row):
    reset = torch.zeros(len(positions_per_row), length, dtype=torch.bool)
    for row, positions in enumerate(positions_per_row):
        reset[row, [p for p in positions if p < length]] = True
    return reset


# row 0: reset at t=0 (drops the initial state), inside a chunk and twice in a row; row 1: at chunk edges of 4/16
RESETS = [[0, 5, 6, 21], [4, 16, 32, 33, 47]]


@pytest.mark.parametrize("length", [9, 50])
def test_resets_match_naive(length):
    inputs = make_inputs(length)
    reset = reset_mask(length, RESETS)
    expected = outputs_and_grads(ops.naive_ssd, inputs, reset=reset)
    for chunk_size in (4, 16, 64):
        assert_same(outputs_and_grads(chunk_fn(chunk_size), inputs, reset=reset), expected)
    assert_same(outputs_and_grads(ops.recurrent_ssd, inputs, reset=reset), expected)


def test_reset_equals_separate_documents():
    """A packed row with resets computes each document as if it were alone, from a zero state."""
    x, dt, A, B, C, h0 = make_inputs(40, batch=1)
    starts = [0, 13, 16, 29]  # reset at t=0 too: the initial state must not leak in
    reset = reset_mask(40, [starts])
    for fn in (ops.naive_ssd, ops.recurrent_ssd, chunk_fn(8)):
        y, state = fn(x, dt, A, B, C, initial_state=h0, reset=reset)
        bounds = starts + [40]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            y_doc, state_doc = ops.naive_ssd(x[:, lo:hi], dt[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi])
            torch.testing.assert_close(y[:, lo:hi], y_doc, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(state, state_doc, atol=1e-10, rtol=1e-10)


def test_zero_dt_steps_are_identity():
    """dt = 0 at a token leaves the state untouched: real tokens see the same outputs, the final state is the same."""
    length = 37
    x, dt, A, B, C, h0 = make_inputs(length)
    real = torch.ones(length, dtype=torch.bool)
    real[[0, 1, 9, 10, 11, 36]] = False  # leading, middle (straddling a chunk edge of 8), trailing
    real[16:24] = False  # one whole chunk of 8
    dt_padded = torch.where(real[None, :, None], dt, torch.zeros_like(dt))
    y_ref, state_ref = ops.naive_ssd(x[:, real], dt[:, real], A, B[:, real], C[:, real], initial_state=h0)
    for fn in (ops.naive_ssd, ops.recurrent_ssd, chunk_fn(8), ops.ssd):
        y, state = fn(x, dt_padded, A, B, C, initial_state=h0)
        torch.testing.assert_close(y[:, real], y_ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(state, state_ref, atol=1e-10, rtol=1e-10)


def test_prefix_then_continuation_equals_whole():
    x, dt, A, B, C, h0 = make_inputs(45)
    y_all, state_all = ops.naive_ssd(x, dt, A, B, C, initial_state=h0)
    for split in (1, 20, 44):
        first = [t[:, :split] for t in (x, dt)] + [A] + [t[:, :split] for t in (B, C)]
        rest = [t[:, split:] for t in (x, dt)] + [A] + [t[:, split:] for t in (B, C)]
        y1, state = ops.ssd(*first, initial_state=h0)
        y2, state = ops.ssd(*rest, initial_state=state)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(state, state_all, atol=1e-10, rtol=1e-10)


def test_token_by_token_equals_whole():
    x, dt, A, B, C, h0 = make_inputs(12)
    y_all, state_all = ops.chunk_ssd(x, dt, A, B, C, initial_state=h0, chunk_size=4)
    state, outputs = h0, []
    for t in range(12):
        y_t, state = ops.ssd(x[:, t : t + 1], dt[:, t : t + 1], A, B[:, t : t + 1], C[:, t : t + 1], state)
        outputs.append(y_t)
    torch.testing.assert_close(torch.cat(outputs, 1), y_all, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state, state_all, atol=1e-10, rtol=1e-10)


def test_matches_transformers_chunk_scan():
    """transformers' `mamba2_chunk_scan` (its pure-torch fallback, float32 inside) with D = 0 and dt passed through."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    x, dt, A, B, C, h0 = (t.float() for t in make_inputs(50, seed=5))
    y_ref, state_ref = mamba2_chunk_scan(x, dt, A, B, C, chunk_size=16, initial_states=h0, return_final_states=True)
    y, state = ops.chunk_ssd(x, dt, A, B, C, initial_state=h0, chunk_size=8)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)


def test_empty_input_and_bad_shapes():
    x, dt, A, B, C, h0 = make_inputs(0)
    for fn in (ops.naive_ssd, ops.recurrent_ssd, ops.chunk_ssd, ops.ssd):
        y, state = fn(x, dt, A, B, C, initial_state=h0)
        assert y.shape == (BATCH, 0, HEADS, HEAD_DIM)
        torch.testing.assert_close(state, h0)
    x, dt, A, B, C, _ = make_inputs(4)
    with pytest.raises(ValueError, match="G dividing H"):
        ops.chunk_ssd(x, dt, A, B[:, :, :1].expand(-1, -1, 4, -1), C[:, :, :1].expand(-1, -1, 4, -1))
    with pytest.raises(ValueError, match="dt must be"):
        ops.chunk_ssd(x, dt[..., :2], A, B, C)


def test_autocast_keeps_float32():
    """Under bf16 autocast the scan still accumulates in float32 (its matmuls would otherwise run in bf16)."""
    x, dt, A, B, C, h0 = (t.float() for t in make_inputs(40))
    y_ref, _ = ops.ssd(x, dt, A, B, C, initial_state=h0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = ops.ssd(x, dt, A, B, C, initial_state=h0)
    assert state.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_mamba_ssm_adapter_with_a_stand_in_kernel():
    """The CUDA path's argument mapping (resets -> `seq_idx`, dtypes, state layout), run on CPU against a stand-in with
    `mamba_chunk_scan_combined`'s documented semantics: the carried state is zeroed where `seq_idx` changes, and
    `initial_states` is the state before the first token."""
    calls = []

    def stand_in(x, dt, A, B, C, chunk_size, initial_states=None, seq_idx=None, return_final_states=False):
        calls.append((chunk_size, x.dtype, dt.dtype, seq_idx))
        assert return_final_states and dt.dtype == torch.float32 and B.dtype == x.dtype
        reset = None
        if seq_idx is not None:
            previous = torch.nn.functional.pad(seq_idx, (1, 0))[:, :-1]
            reset = seq_idx != previous
        return ops.naive_ssd(x, dt, A, B, C, initial_state=initial_states, reset=reset)

    x, dt, A, B, C, h0 = (t.float() for t in make_inputs(30))
    reset = reset_mask(30, RESETS)
    y, state = ops._mamba_ssm_ssd(stand_in, x, dt, A, B, C, None, reset, None)
    y_ref, state_ref = ops.naive_ssd(x, dt, A, B, C, reset=reset)
    torch.testing.assert_close((y, state), (y_ref, state_ref))
    y, state = ops._mamba_ssm_ssd(stand_in, x, dt, A, B, C, h0, None, 128)
    torch.testing.assert_close((y, state), ops.naive_ssd(x, dt, A, B, C, initial_state=h0))
    assert [c[0] for c in calls] == [ops.GPU_CHUNK_SIZE, 128] and calls[1][3] is None

"""The gated delta rule ops against the literal token loop (float64, outputs and gradients) and against transformers."""

import pytest
import torch
from torch.nn import functional as F

try:
    from hybridzoo.modeling import ops_gated_delta as ops
except ImportError:
    from modeling import ops_gated_delta as ops

chunk_gated_delta_rule = ops.chunk_gated_delta_rule
gated_delta_rule = ops.gated_delta_rule
naive_recurrent_gated_delta_rule = ops.naive_recurrent_gated_delta_rule
recurrent_gated_delta_rule = ops.recurrent_gated_delta_rule

B, H, DK, DV = 2, 2, 8, 6


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core box OpenMP hand-offs can cost 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(length, batch=B, heads=H, dk=DK, dv=DV, dtype=torch.float64, state=True, seed=0):
    """q, k unit-norm; beta in (0, 2) (negative eigenvalues allowed); decays from very weak to strong."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, length, heads, dk, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(batch, length, heads, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(batch, length, heads, dv, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(batch, length, heads, generator=gen, dtype=dtype) * 2 + 2)
    beta = 2 * torch.rand(batch, length, heads, generator=gen, dtype=dtype)
    h0 = 0.5 * torch.randn(batch, heads, dk, dv, generator=gen, dtype=dtype) if state else None
    return [q, k, v, g, beta, h0]


def outputs_and_grads(fn, inputs, reset=None, **kwargs):
    """Run `fn`, backprop a random linear function of (o, final state); return o, state and the input grads."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    q, k, v, g, beta, h0 = leaves
    o, state = fn(q, k, v, g, beta, initial_state=h0, reset=reset, **kwargs)
    gen = torch.Generator().manual_seed(123)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)).sum()
    used = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, used)
    return o.detach(), state.detach(), grads


def assert_same(result, expected, atol=1e-10, rtol=1e-8):
    o, state, grads = result
    o_ref, state_ref, grads_ref = expected
    torch.testing.assert_close(o, o_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(state, state_ref, atol=atol, rtol=rtol)
    for name, grad, grad_ref in zip(["q", "k", "v", "g", "beta", "h0"], grads, grads_ref, strict=False):
        torch.testing.assert_close(grad, grad_ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"d{n}: {m}")


def chunk_fn(chunk_size):
    return lambda *args, **kwargs: chunk_gated_delta_rule(*args, chunk_size=chunk_size, **kwargs)


@pytest.mark.parametrize("length", [1, 7, 33, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_naive(length, with_state):
    inputs = make_inputs(length, state=with_state)
    expected = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs)
    for chunk_size in (4, 16, 32):
        assert_same(outputs_and_grads(chunk_fn(chunk_size), inputs), expected)


def reset_mask(length, positions_per_row):
    reset = torch.zeros(len(positions_per_row), length, dtype=torch.bool)
    for row, positions in enumerate(positions_per_row):
        reset[row, [p for p in positions if p < length]] = True
    return reset


# row 0: reset at t=0 (drops the initial state), inside a chunk and twice in a row; row 1: chunk boundaries of 4/16/32
RESETS = [[0, 5, 6, 21], [4, 16, 32, 33, 47]]


@pytest.mark.parametrize("length", [9, 50])
def test_chunk_and_recurrent_match_naive_with_resets(length):
    inputs = make_inputs(length)
    reset = reset_mask(length, RESETS)
    expected = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs, reset=reset)
    for chunk_size in (4, 16, 32):
        assert_same(outputs_and_grads(chunk_fn(chunk_size), inputs, reset=reset), expected)
    assert_same(outputs_and_grads(recurrent_gated_delta_rule, inputs, reset=reset), expected)


def test_reset_equals_separate_documents():
    """A packed row with resets computes each document as if it were alone, from a zero state."""
    q, k, v, g, beta, h0 = make_inputs(40, batch=1)
    starts = [0, 13, 16, 29]  # reset at t=0 too: the initial state must not leak in
    reset = reset_mask(40, [starts])
    for fn in (naive_recurrent_gated_delta_rule, recurrent_gated_delta_rule, chunk_fn(8)):
        o, state = fn(q, k, v, g, beta, initial_state=h0, reset=reset)
        bounds = starts + [40]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            o_doc, state_doc = naive_recurrent_gated_delta_rule(
                q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], beta[:, lo:hi]
            )
            torch.testing.assert_close(o[:, lo:hi], o_doc)
        torch.testing.assert_close(state, state_doc)


def test_pads_are_identity_steps():
    """beta = 0 and g = 0 leave the state untouched: same outputs at real tokens and same final state."""
    length = 37
    q, k, v, g, beta, h0 = make_inputs(length)
    real = torch.ones(length, dtype=torch.bool)
    real[[0, 1, 9, 10, 11, 36]] = False  # leading, middle (straddling a chunk edge of 8 / 4), trailing
    real[16:24] = False  # one whole chunk of 8
    g = torch.where(real[None, :, None], g, torch.zeros_like(g))
    beta = torch.where(real[None, :, None], beta, torch.zeros_like(beta))
    o_ref, state_ref = naive_recurrent_gated_delta_rule(
        q[:, real], k[:, real], v[:, real], g[:, real], beta[:, real], initial_state=h0
    )
    for fn in (naive_recurrent_gated_delta_rule, recurrent_gated_delta_rule, chunk_fn(4), chunk_fn(8), chunk_fn(64)):
        o, state = fn(q, k, v, g, beta, initial_state=h0)
        torch.testing.assert_close(o[:, real], o_ref)
        torch.testing.assert_close(state, state_ref)
    padded = [q, k, v, g, beta, h0]  # gradients with exact zeros in beta, too
    assert_same(outputs_and_grads(chunk_fn(8), padded), outputs_and_grads(naive_recurrent_gated_delta_rule, padded))


@pytest.mark.parametrize("length", [1, 5, 20])
def test_recurrent_matches_naive(length):
    inputs = make_inputs(length)
    assert_same(
        outputs_and_grads(recurrent_gated_delta_rule, inputs),
        outputs_and_grads(naive_recurrent_gated_delta_rule, inputs),
    )


def test_only_some_inputs_need_grad_and_state_unused():
    q, k, v, g, beta, _ = make_inputs(20)
    v = v.clone().requires_grad_()
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=8)
    (grad_v,) = torch.autograd.grad(o.sum(), [v])
    o_ref, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta)
    (grad_ref,) = torch.autograd.grad(o_ref.sum(), [v])
    torch.testing.assert_close(grad_v, grad_ref)


def test_split_sequence_carries_state():
    """Prefill in two pieces (chunked, then token by token through the dispatcher) equals one call."""
    q, k, v, g, beta, h0 = make_inputs(45)
    reset = reset_mask(45, [[30], [3, 41]])
    o_full, state_full = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, reset=reset, chunk_size=16)
    o1, state = chunk_gated_delta_rule(
        q[:, :27], k[:, :27], v[:, :27], g[:, :27], beta[:, :27], initial_state=h0, reset=reset[:, :27], chunk_size=16
    )
    pieces = [o1]
    for t in range(27, 45):
        window = slice(t, t + 1)
        o_t, state = gated_delta_rule(
            q[:, window],
            k[:, window],
            v[:, window],
            g[:, window],
            beta[:, window],
            initial_state=state,
            reset=reset[:, window],
        )
        pieces.append(o_t)
    torch.testing.assert_close(torch.cat(pieces, dim=1), o_full)
    torch.testing.assert_close(state, state_full)


@pytest.mark.parametrize("length", [1, ops.RECURRENT_MAX_LEN, ops.RECURRENT_MAX_LEN + 1, 70])
def test_dispatcher_on_cpu(length):
    inputs = make_inputs(length, dtype=torch.float32)
    q, k, v, g, beta, h0 = inputs
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    if length <= ops.RECURRENT_MAX_LEN:
        o_expected, state_expected = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    else:  # the CPU default chunk for these heads
        chunk = ops.default_chunk_size(k.shape[-1], v.shape[-1], cuda=False)
        o_expected, state_expected = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, chunk_size=chunk)
    assert torch.equal(o, o_expected) and torch.equal(state, state_expected)
    o_naive, state_naive = naive_recurrent_gated_delta_rule(
        *[x.double() for x in inputs[:5]], initial_state=h0.double()
    )
    torch.testing.assert_close(o.double(), o_naive, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(state.double(), state_naive, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("length", [3, 45])  # the token loop and the chunked form
def test_grouped_value_heads(length):
    """q/k with fewer heads than v (each serving H/Hk consecutive value heads) equal the naive loop on q/k repeated by
    hand, outputs and gradients (the q/k gradients summed over the value heads they serve), with resets."""
    q, k, v, g, beta, h0 = make_inputs(length, heads=6)
    q, k = q[:, :, :2], k[:, :, :2]  # 2 q/k heads for 6 value heads
    reset = torch.zeros(B, length, dtype=torch.bool)
    reset[0, length // 2] = True

    def repeated_by_hand(q, k, *rest, **kwargs):
        return naive_recurrent_gated_delta_rule(q.repeat_interleave(3, 2), k.repeat_interleave(3, 2), *rest, **kwargs)

    expected = outputs_and_grads(repeated_by_hand, [q, k, v, g, beta, h0], reset=reset)
    for fn in (gated_delta_rule, chunk_fn(16)):
        assert_same(outputs_and_grads(fn, [q, k, v, g, beta, h0], reset=reset), expected)
    with pytest.raises(ValueError, match="not a multiple"):
        gated_delta_rule(q[:, :, :1].expand(-1, -1, 4, -1), k[:, :, :1].expand(-1, -1, 4, -1), v, g, beta)


@pytest.mark.parametrize("tile_elements", [1, 3 * B * H * 8 * DV])  # one chunk per tile; three (the last one short)
def test_chunked_in_tiles(monkeypatch, tile_elements):
    """The training scan cut into tiles of chunks (state and its gradient carried from tile to tile) equals the naive
    loop, outputs and gradients, across document resets and a ragged last chunk."""
    monkeypatch.setattr(ops, "TILE_ELEMENTS", tile_elements)
    inputs = make_inputs(61)  # 8 chunks of 8, the last one 5 long
    reset = torch.zeros(B, 61, dtype=torch.bool)
    reset[0, 20] = reset[1, 33] = True
    expected = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs, reset=reset)
    assert_same(outputs_and_grads(chunk_fn(8), inputs, reset=reset), expected)
    with torch.no_grad():  # the inference path runs the same tiles, carrying only the state
        o, state = chunk_gated_delta_rule(*inputs[:5], initial_state=inputs[5], reset=reset, chunk_size=8)
    torch.testing.assert_close(o, expected[0], atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(state, expected[1], atol=1e-10, rtol=1e-8)


def test_default_chunk_size():
    # narrow heads take short chunks on CPU; GPU keeps fla's 64
    assert ops.default_chunk_size(16, 16, cuda=False) == 16
    assert ops.default_chunk_size(32, 64, cuda=False) == 32
    assert ops.default_chunk_size(128, 128, cuda=False) == 32
    assert ops.default_chunk_size(16, 16, cuda=True) == 64


def test_dtypes_and_scale():
    q, k, v, g, beta, h0 = make_inputs(40, dtype=torch.float32)
    args = [x.bfloat16() for x in (q, k, v)] + [g, beta]
    for fn in (recurrent_gated_delta_rule, chunk_fn(16), gated_delta_rule):
        o, state = fn(*args, initial_state=h0, scale=0.3)
        assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
        o_ref, state_ref = naive_recurrent_gated_delta_rule(*args, initial_state=h0, scale=0.3)
        torch.testing.assert_close(o, o_ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)
    o, state = chunk_gated_delta_rule(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0], initial_state=h0)
    assert o.shape == (B, 0, H, DV) and torch.equal(state, h0)


def test_strong_decay_stays_finite():
    q, k, v, g, beta, h0 = make_inputs(64, dtype=torch.float32)
    g = torch.full_like(g, -30.0)  # exp(-30 * 32) underflows inside a chunk
    inputs = [x.double() for x in (q, k, v, g, beta, h0)]
    expected = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs)
    result = outputs_and_grads(chunk_fn(32), [q, k, v, g, beta, h0])
    assert all(torch.isfinite(x).all() for x in (result[0], result[1], *result[2]))
    assert_same(
        [result[0].double(), result[1].double(), [x.double() for x in result[2]]], expected, atol=1e-5, rtol=1e-4
    )


def test_matches_transformers_reference():
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    # `__wrapped__` is the torch function even when the hub-kernel decorator bound fla at import time
    reference = getattr(hf.torch_chunk_gated_delta_rule, "__wrapped__", hf.torch_chunk_gated_delta_rule)
    inputs = make_inputs(150, heads=3, dk=16, dv=12, dtype=torch.float32)
    q, k, v, g, beta, h0 = inputs

    def transformers_fn(q, k, v, g, beta, initial_state=None, reset=None):
        return reference(
            q,
            k,
            v,
            g,
            beta,
            chunk_size=64,
            initial_state=initial_state,
            output_final_state=True,
            use_qk_l2norm_in_kernel=False,
        )

    expected = outputs_and_grads(transformers_fn, inputs)
    for fn in (chunk_fn(32), chunk_fn(64), gated_delta_rule):
        assert_same(outputs_and_grads(fn, inputs), expected, atol=2e-5, rtol=1e-4)


def test_fla_route_with_fake_kernels():
    """The CUDA/fla route (argument conversion, resets as varlen segments), with fake fla kernels that follow fla's
    API on CPU. fla itself needs a GPU."""
    calls = []

    def fake_kernel(name):
        def kernel(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
            assert output_final_state and q.dtype == k.dtype == v.dtype
            calls.append((name, cu_seqlens))
            if cu_seqlens is None:
                return naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state)
            assert q.shape[0] == 1 and initial_state.shape[0] == len(cu_seqlens) - 1
            outs, finals = [], []
            bounds = cu_seqlens.tolist()
            for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                window = slice(lo, hi)
                o, s = naive_recurrent_gated_delta_rule(
                    q[:, window],
                    k[:, window],
                    v[:, window],
                    g[:, window],
                    beta[:, window],
                    scale=scale,
                    initial_state=initial_state[i : i + 1],
                )
                outs.append(o)
                finals.append(s)
            return torch.cat(outs, dim=1), torch.cat(finals)

        return kernel

    kernels = (fake_kernel("chunk"), fake_kernel("recurrent"))

    def fla_fn(q, k, v, g, beta, initial_state=None, reset=None):
        return ops._fla_gated_delta_rule(kernels, q, k, v, g, beta, DK**-0.5, initial_state, reset)

    inputs = make_inputs(30, batch=3)
    reset = reset_mask(30, [[0, 7], [12, 13], []])
    reset_before = reset.clone()
    expected = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs, reset=reset)
    assert_same(outputs_and_grads(fla_fn, inputs, reset=reset), expected)
    assert calls[-1][0] == "chunk" and calls[-1][1].tolist() == [0, 7, 30, 42, 43, 60, 90]
    assert torch.equal(reset, reset_before)
    # no resets: one batched call; the recurrent kernel only for short inference calls (it has no backward)
    assert_same(outputs_and_grads(fla_fn, inputs), outputs_and_grads(naive_recurrent_gated_delta_rule, inputs))
    assert calls[-1] == ("chunk", None)
    with torch.no_grad():
        o, state = fla_fn(*inputs[:5], initial_state=inputs[5])
    assert calls[-1] == ("recurrent", None)
    o_ref, state_ref = naive_recurrent_gated_delta_rule(*inputs[:5], initial_state=inputs[5])
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(state, state_ref)


def test_fla_is_only_tried_on_cuda():
    """On CPU tensors the dispatcher never imports fla (its kernels crash on machines without a GPU)."""
    q, k, v, g, beta, h0 = make_inputs(20, dtype=torch.float32)
    gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    if not torch.cuda.is_available():
        assert not ops.fla_available() and not ops._FLA_TRIED

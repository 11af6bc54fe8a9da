"""The `paragru` and `paralstm` blocks: the Newton and sequential solvers agree, decoding step by step equals the full
run, padding and document resets match separate runs, and the model-level statistics are observable."""

import pytest
import torch

from hybridzoo import HybridForCausalLM
from hybridzoo.modeling.block_pararnn import HybridParaGRU, HybridParaLSTM
from tiny_models import assert_all_close, random_linear_grads, tiny_config

BLOCKS = {"paragru": HybridParaGRU, "paralstm": HybridParaLSTM}


def _block(name, **overrides):
    config = tiny_config("A", pararnn_num_heads=2, **overrides)
    torch.manual_seed(0)
    block = BLOCKS[name](config).double()
    with torch.no_grad():  # stronger recurrence than the init: Newton needs several iterations
        block.recurrent_weight.mul_(8.0)
    return block


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_newton_and_sequential_solvers_agree_with_padding_and_resets(name):
    newton, sequential = _block(name), _block(name, rnn_solver="sequential")
    x = torch.randn(3, 40, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[0, :5] = False
    mask[2, -6:] = False
    reset = torch.zeros(3, 40, dtype=torch.bool)
    reset[1, 17] = reset[0, 29] = True
    y, state = newton(x, mask=mask, reset=reset)
    y_ref, state_ref = sequential(x, mask=mask, reset=reset)
    assert newton.last_newton_stats.converged and newton.last_newton_stats.iterations >= 2
    assert sequential.last_newton_stats is None  # the sequential solver never ran Newton
    assert_all_close((y, *state), (y_ref, *state_ref))
    wrt_newton = [x, *newton.parameters()]
    wrt_sequential = [x, *sequential.parameters()]
    assert_all_close(random_linear_grads([y], wrt_newton), random_linear_grads([y_ref], wrt_sequential))


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_step_by_step_decoding_equals_the_full_run(name):
    block = _block(name)
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    with torch.no_grad():
        full, final = block(x)
        y, state = block(x[:, :9])  # prefill (Newton), then one token at a time (cell steps)
        pieces = [y]
        for t in range(9, 23):
            y, state = block(x[:, t : t + 1], state)
            pieces.append(y)
    assert_all_close((torch.cat(pieces, dim=1), *state), (full, *final))


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_reset_equals_separate_documents(name):
    block = _block(name)
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    reset = torch.zeros(1, 30, dtype=torch.bool)
    reset[0, 12] = True
    with torch.no_grad():
        packed, _ = block(x, reset=reset)
        first, _ = block(x[:, :12])
        second, _ = block(x[:, 12:])
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1))


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_non_converging_block_falls_back_and_counts_it(name):
    block = _block(name, newton_max_iter=0)
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    reference = _block(name, rnn_solver="sequential")
    with pytest.warns(UserWarning, match="did not converge"), torch.no_grad():
        y, _ = block(x)
    assert block.newton_totals["fallbacks"] == 1 and not block.last_newton_stats.converged
    with torch.no_grad():
        torch.testing.assert_close(y, reference(x)[0])


@pytest.mark.parametrize("pattern", ["U", "P", "PPPA"])
def test_model_solvers_agree_and_train(pattern):
    input_ids = torch.randint(3, 64, (2, 33))
    outputs = {}
    for solver in ("newton", "sequential"):
        torch.manual_seed(0)
        model = HybridForCausalLM(tiny_config(pattern, num_layers=4, rnn_solver=solver, pararnn_num_heads=2))
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        outputs[solver] = (out.logits, [p.grad for p in model.parameters()])
    torch.testing.assert_close(outputs["newton"][0], outputs["sequential"][0], atol=1e-5, rtol=1e-4)
    for a, b in zip(outputs["newton"][1], outputs["sequential"][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("pattern", ["U", "P"])
def test_model_keeps_pararnn_initialisation(pattern):
    torch.manual_seed(0)
    config = tiny_config(pattern * 2, pararnn_width=64, pararnn_num_heads=2)
    model = HybridForCausalLM(config)
    for layer in model.model.layers:
        block = layer.mixer
        torch.testing.assert_close(block.gate_bias[0], -torch.linspace(0.0, 1.0, 64))
        assert torch.count_nonzero(block.gate_bias[1:]) == 0
        expected_std = 2.0 / (5 * 64) ** 0.5  # not transformers' generic normal(0, initializer_range = 0.02)
        assert abs(block.recurrent_weight.std().item() - expected_std) < 0.25 * expected_std
        bound = (6.0 / 64) ** 0.5  # uniform(+-sqrt(6 / (d + d))), head dim d = 32
        assert block.gate_weight.abs().max() <= bound and block.gate_weight.std() > 0.8 * bound / 3**0.5


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"rnn_solver": "jacobi"}, "rnn_solver"),
        ({"newton_max_iter": -1}, "newton_max_iter"),
        ({"newton_tol": 0.0}, "newton_tol"),
        ({"pararnn_conv_kernel_dim": -1}, "pararnn_conv_kernel_dim"),
        ({"pararnn_width": 30, "pararnn_num_heads": 4}, "pararnn_width"),
    ],
)
def test_bad_fields_are_rejected_by_name(overrides, field):
    with pytest.raises(Exception, match=field):  # transformers wraps the ValueError in its validation error
        tiny_config("UP", **overrides)

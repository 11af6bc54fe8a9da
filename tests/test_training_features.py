"""Training-side features: gradient checkpointing, half precision, recorded outputs, sequence classification."""

import pytest
import torch

from hybridzoo import HybridForCausalLM, HybridForSequenceClassification
from tiny_models import ALL_PATTERNS, PAD, tiny_config


@pytest.mark.parametrize("pattern", ["GLSA"])
def test_gradient_checkpointing_gives_the_same_gradients(pattern):
    model = HybridForCausalLM(tiny_config(pattern))
    input_ids = torch.randint(3, 64, (2, 12))

    def gradients():
        model.zero_grad()
        model(input_ids, labels=input_ids, use_cache=False).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(dtype):
    model = HybridForCausalLM(tiny_config("GLSA")).eval()
    input_ids = torch.randint(3, 64, (2, 10))
    with torch.no_grad():
        reference = model(input_ids).logits
        half = model.to(dtype)(input_ids).logits
    assert half.dtype == dtype
    assert (half.float() - reference).abs().max() < 0.05 * reference.abs().max()
    generated = model.generate(input_ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert generated.shape == (2, 13)


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_bf16_autocast_training_matches_float32(pattern):
    """The recipes' bf16 mode runs forward and backward under CPU autocast; every block must survive it (the recurrent
    ops keep their state in float32) and give the float32 loss and gradients up to bf16 rounding."""
    seq_len = 40  # longer than the chunk size, so the chunked forms and their backward run
    model = HybridForCausalLM(tiny_config(pattern))
    input_ids = torch.randint(3, 64, (2, seq_len))
    reference = model(input_ids, labels=input_ids).loss
    reference.backward()
    reference_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    reference_grads = torch.cat([g.flatten() for g in reference_grads])
    assert torch.isfinite(grads).all()
    assert torch.nn.functional.cosine_similarity(grads, reference_grads, dim=0) > 0.95


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_every_block_trains(pattern):
    model = HybridForCausalLM(tiny_config(pattern))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    input_ids = torch.randint(3, 64, (4, 12))
    losses = []
    for _ in range(5):
        loss = model(input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_hidden_states_and_attentions_are_recorded():
    model = HybridForCausalLM(tiny_config("GLSA")).eval()
    model.set_attn_implementation("eager")
    out = model(torch.randint(3, 64, (1, 6)), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert len(out.attentions) == 2  # one per attention block (sliding and full)
    assert out.attentions[0].shape == (1, 4, 6, 6)


def test_sequence_classification_pools_the_last_real_token():
    model = HybridForSequenceClassification(tiny_config("GLSA", num_labels=3)).eval()
    tokens = torch.randint(3, 64, (5,))
    padded = torch.cat([torch.full((3,), PAD), tokens])[None]
    mask = torch.cat([torch.zeros(3), torch.ones(5)]).long()[None]
    with torch.no_grad():
        alone = model(tokens[None]).logits
        left_padded = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(left_padded, alone, atol=1e-5, rtol=1e-5)
    loss = model(tokens[None], labels=torch.tensor([2])).loss
    assert loss.ndim == 0 and loss > 0


@pytest.mark.parametrize("block_name", ["gated_deltanet", "attention_free_model"])
def test_torch_compile_traces_without_graph_breaks(block_name):
    """Dynamo traces the Gated DeltaNet block whole (fullgraph=True) for prefill and for a decode step."""
    from hybridzoo.modeling.blocks import BLOCK_CLASSES

    if block_name == "attention_free_model":
        model = HybridForCausalLM(tiny_config("GGGA")).eval()
        input_ids = torch.randint(3, 64, (2, 20))
        compiled = torch.compile(model, backend="eager")
        torch.testing.assert_close(compiled(input_ids).logits, model(input_ids).logits)
        return
    block = BLOCK_CLASSES[block_name](tiny_config("G"), 0)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    x = torch.randn(2, 20, 32)
    y, state = compiled(x)
    expected_y, expected_state = block(x)
    torch.testing.assert_close(y, expected_y)
    step, _ = compiled(x[:, :1], state)
    torch.testing.assert_close(step, block(x[:, :1], expected_state)[0])


def test_torch_compile_traces_inference_without_graph_breaks():
    """Without autograd the norms, the MLP and the Gated DeltaNet step run on weights kept in derived form; a compiled
    graph derives them in the graph instead of tracing the cache's data pointers: whole model and decode step, no
    graph break (fullgraph=True), the same outputs as eager."""
    from hybridzoo.modeling.blocks import BLOCK_CLASSES

    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config("GGGA")).eval()
    block = BLOCK_CLASSES["gated_deltanet"](tiny_config("G"), 0).eval()
    input_ids, x = torch.randint(3, 64, (2, 20)), torch.randn(2, 20, 32)
    with torch.no_grad():
        logits = torch.compile(model, backend="eager", fullgraph=True)(input_ids, use_cache=False).logits
        torch.testing.assert_close(logits, model(input_ids, use_cache=False).logits)
        compiled = torch.compile(block, backend="eager", fullgraph=True)
        _, state = block(x)
        torch.testing.assert_close(compiled(x[:, :1], state)[0], block(x[:, :1], state)[0])

"""The chunked LM head + cross-entropy equals `F.cross_entropy(lm_head(h))` (loss and gradients), alone and inside
`HybridForCausalLM`, where it is the training default and `logits` is then None."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from hybridzoo import HybridForCausalLM
from hybridzoo.modeling.ops_cross_entropy import chunked_linear_cross_entropy, shift_labels_for_causal_lm
from tiny_models import tiny_config


def _inputs(dtype: torch.dtype, bias: bool, tokens: int = 37, hidden: int = 16, vocab: int = 50):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, tokens, hidden, generator=gen, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=gen, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (2, tokens), generator=gen)
    labels[0, :5] = -100
    labels[1, 10:14] = -100
    return h, w, b, labels


def _loss_and_grads(loss_fn, h, w, b):
    leaves = [x for x in (h, w, b) if x is not None]
    loss = loss_fn()
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_tokens", [5, 1000])
@pytest.mark.parametrize("num_items", [None, 91, torch.tensor(91)])  # transformers' Trainer passes a tensor
def test_matches_plain_cross_entropy(dtype, bias, chunk_tokens, num_items):
    h, w, b, labels = _inputs(dtype, bias)

    def plain():
        logits = F.linear(h, w, b).float() if dtype == torch.float32 else F.linear(h, w, b)
        reduction = "mean" if num_items is None else "sum"
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction=reduction)
        return loss if num_items is None else loss / num_items

    def chunked():
        return chunked_linear_cross_entropy(h, w, labels, bias=b, num_items_in_batch=num_items,
                                            chunk_tokens=chunk_tokens)

    expected, actual = _loss_and_grads(plain, h, w, b), _loss_and_grads(chunked, h, w, b)
    tolerance = {} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for x, y in zip(actual, expected, strict=True):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, **tolerance)


def test_no_grad_and_all_ignored():
    h, w, _, labels = _inputs(torch.float64, bias=False)
    with torch.no_grad():
        expected = F.cross_entropy(F.linear(h, w).flatten(0, 1), labels.flatten())
        torch.testing.assert_close(chunked_linear_cross_entropy(h, w, labels, chunk_tokens=4), expected)
    ignored = torch.full_like(labels, -100)
    assert torch.isnan(chunked_linear_cross_entropy(h, w, ignored))  # like F.cross_entropy's mean over nothing
    with pytest.raises(ValueError, match="labels must have the shape"):
        chunked_linear_cross_entropy(h, w, labels[:, :-1])


def test_autocast_matches_plain_head():
    h, w, _, labels = _inputs(torch.float32, bias=False, hidden=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _loss_and_grads(lambda: F.cross_entropy(F.linear(h, w).float().flatten(0, 1), labels.flatten()),
                                   h, w, None)
        actual = _loss_and_grads(lambda: chunked_linear_cross_entropy(h, w, labels, chunk_tokens=16), h, w, None)
    for x, y in zip(actual, expected, strict=True):
        assert x.dtype == y.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=2e-2, atol=2e-3)  # bf16 GEMMs in both, summed in different orders


def _model_loss_and_grads(model, **inputs):
    out = model(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, [out.loss.detach(), *torch.autograd.grad(out.loss, params)]


@pytest.mark.parametrize("pattern", ["GGGA", "LA"])
def test_model_training_loss_is_chunked_and_equal(pattern):
    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(pattern))
    input_ids = torch.randint(3, 64, (2, 11))
    labels = input_ids.clone()
    labels[0, :3] = -100

    model.eval()  # the plain path: logits, then transformers' ForCausalLMLoss
    plain, expected = _model_loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert plain.logits is not None
    reference = F.cross_entropy(plain.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(plain.loss, reference)

    model.train()  # the default in training: chunked, no logits (no dropout in these models, so same function)
    chunked, actual = _model_loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert chunked.logits is None
    for x, y in zip(actual, expected, strict=True):
        torch.testing.assert_close(x, y)

    # transformers' gradient-accumulation arguments: num_items_in_batch and pre-shifted labels
    shifted = shift_labels_for_causal_lm(labels)
    for kwargs in ({"labels": labels, "num_items_in_batch": 7}, {"labels": labels, "shift_labels": shifted}):
        model.eval()
        _, expected = _model_loss_and_grads(model, input_ids=input_ids, **kwargs)
        model.train()
        _, actual = _model_loss_and_grads(model, input_ids=input_ids, **kwargs)
        for x, y in zip(actual, expected, strict=True):
            torch.testing.assert_close(x, y)


def test_model_logits_when_asked():
    model = HybridForCausalLM(tiny_config("GA")).train()
    input_ids = torch.randint(3, 64, (1, 9))
    out = model(input_ids=input_ids, labels=input_ids, skip_logits=False)
    assert out.logits is not None and out.logits.shape == (1, 9, 64)
    assert model(input_ids=input_ids).logits is not None  # no labels: logits as always
    model.eval()
    assert model(input_ids=input_ids, labels=input_ids, skip_logits=True).logits is None
    assert model(input_ids=input_ids, labels=input_ids).logits is not None  # eval default: logits for metrics


def test_soft_capped_logits_keep_the_plain_loss():
    model = HybridForCausalLM(tiny_config("GA", final_logit_softcapping=0.5))
    input_ids = torch.randint(3, 64, (1, 9))
    model.eval()
    expected = model(input_ids=input_ids, labels=input_ids).loss
    model.train()
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits is not None  # the chunked head has no soft-capping: the plain path runs
    torch.testing.assert_close(out.loss, expected)


def test_scaled_upstream_gradient_and_kept_graph():
    """The gradients are handed on untouched only for an upstream gradient of exactly 1: a loss scaled or summed with
    others, and a second backward through a kept graph, still get the plain path's gradients."""
    h, w, b, labels = _inputs(torch.float64, bias=True)
    leaves = [h, w, b]

    def plain():
        return F.cross_entropy(F.linear(h, w, b).flatten(0, 1), labels.flatten(), ignore_index=-100)

    def chunked():
        return chunked_linear_cross_entropy(h, w, labels, bias=b, chunk_tokens=8)

    for combine in (lambda loss: 3.0 * loss, lambda loss: loss + (h**2).sum()):
        expected = torch.autograd.grad(combine(plain()), leaves)
        actual = torch.autograd.grad(combine(chunked()), leaves)
        for x, y in zip(actual, expected, strict=True):
            torch.testing.assert_close(x, y)

    loss = chunked()
    loss.backward(retain_graph=True)
    once = [x.grad.clone() for x in leaves]
    loss.backward()  # accumulates: the stored gradients must not have been consumed in place by the first call
    for x, first in zip(leaves, once, strict=True):
        torch.testing.assert_close(x.grad, 2 * first)
    expected = torch.autograd.grad(plain(), leaves)
    for first, y in zip(once, expected, strict=True):
        torch.testing.assert_close(first, y)
